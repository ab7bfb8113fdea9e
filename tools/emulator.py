"""An emulated arm64 Raspberry Pi for tests: Debian bookworm arm64 under qemu user mode,
reachable over ssh on loopback.

    python -m edgecl.tools.emulator build            # (re)build the cached root file system
    python -m edgecl.tools.emulator run [--port N]   # start it; prints the ssh:// URL; Ctrl-C stops

    from edgecl.tools.emulator import Emulator
    with Emulator(profile="rpi4") as emu:             # builds (or reuses) the rootfs, starts sshd
        emu.url        # ssh://root@127.0.0.1:PORT
        emu.identity   # the throwaway private key
        emu.ssh("uname -m")                          # 'aarch64'

How (needs root; everything on loopback, nothing else on the network):

1. Host packages, installed with apt-get when missing: qemu-user-static, binfmt-support,
   rsync, openssh-client. binfmt_misc is mounted and ``qemu-aarch64`` enabled (flag F:
   the interpreter is opened once, so it runs inside a chroot without a copy there).
2. Root file system: a private apt directory for arm64 (its own apt.conf, sources and
   empty dpkg status) downloads the .debs of ``PACKAGES`` and their dependencies, and
   ``dpkg -x`` unpacks each (no maintainer script, nothing emulated runs; ~10 s with a
   warm .deb cache). Then a few files are written: passwd/group/shadow, root's
   authorized_keys, sshd_config (key-only, loopback, ``SetEnv QEMU_CPU``), a marker
   ``/etc/edgecl-emulator.json`` that the runtime reads (``profiles.detect``), and an
   aarch64 ``/proc/cpuinfo`` for the chosen core (onnxruntime aborts on the host's x86 one).
   The tree lives in ``$EDGECL_CACHE/emulator/rootfs-<recipe hash>`` (default
   ``~/.cache/edgecl``) and is reused until the recipe (package list, this build code)
   changes. The client key pair and the sshd host keys live next to it.
3. Each ``Emulator`` runs in its own mount namespace (``unshare --mount``): an overlay
   over the cached tree (so a test starts from a clean device and the cache stays
   pristine), /proc with the fake cpuinfo bound over it, /dev, optionally a small tmpfs
   (to simulate a full disk), then ``chroot ... /usr/sbin/sshd -D`` on 127.0.0.1:PORT
   with ``QEMU_CPU`` set (cortex-a72 for rpi4: qemu's default CPU advertises SVE and
   OpenBLAS then crawls). Stopping kills that process group; the mounts vanish with it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE_VERSION = 1
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = [
    "base-files", "bash", "dash", "coreutils", "libc-bin", "findutils", "grep", "sed", "tar", "gzip",
    "procps", "python3", "python3-venv", "openssh-server", "rsync", "ca-certificates", "libstdc++6",
    "libgcc-s1",
]
HOST_TOOLS = {  # command -> Debian package (host side)
    "qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support",
    "rsync": "rsync", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "unshare": "util-linux",
}

# /proc/cpuinfo of a real aarch64 core, per QEMU_CPU (CPU part: A72 0xd08, A76 0xd0b).
_CPU_PART = {"cortex-a72": ("0xd08", "0x0", "3"), "cortex-a76": ("0xd0b", "0x4", "1")}


def cache_root() -> Path:
    return Path(os.environ.get("EDGECL_CACHE", "~/.cache/edgecl")).expanduser()


def log_default(msg: str) -> None:
    print(f"[emulator] {msg}", file=sys.stderr, flush=True)


class EmulatorError(RuntimeError):
    pass


def _run(cmd, log=None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise EmulatorError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): "
                            f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return r


# -- host side -------------------------------------------------------------------------
def ensure_host_tools(log=log_default, extra: dict[str, str] | None = None) -> None:
    """apt-get install the host tools that are missing (idempotent; root only)."""
    tools = dict(HOST_TOOLS, **(extra or {}))
    missing = sorted({pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise EmulatorError(f"missing host packages {', '.join(missing)}: install them as root")
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def ensure_binfmt(log=log_default) -> None:
    """binfmt_misc mounted and qemu-aarch64 registered with the F (fix binary) flag."""
    bm = Path("/proc/sys/fs/binfmt_misc")
    if not (bm / "register").exists():
        log("mounting binfmt_misc")
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(bm)])
    entry = bm / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        log("enabling qemu-aarch64 in binfmt_misc")
        r = subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, text=True)
        if r.returncode != 0 or not entry.exists():
            # No binfmt-support registration available: register qemu-aarch64-static directly.
            magic = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
            mask = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
            qemu = shutil.which("qemu-aarch64-static")
            (bm / "register").write_text(f":qemu-aarch64:M::{magic}:{mask}:{qemu}:F")
    text = entry.read_text()
    flags = next((ln for ln in text.splitlines() if ln.startswith("flags:")), "")
    if "enabled" not in text or "F" not in flags:
        raise EmulatorError(f"{entry}: qemu-aarch64 is not enabled with the F flag:\n{text}")


# -- the root file system ----------------------------------------------------------------
def _configure(root: Path, keys: Path, profile: str, qemu_cpu: str) -> None:
    """Files written into the unpacked tree (part of the recipe hash)."""
    etc = root / "etc"
    (etc / "ssh").mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n")
    os.chmod(etc / "shadow", 0o640)
    (etc / "hostname").write_text("edgecl-emulated-pi\n")
    (etc / "hosts").write_text("127.0.0.1 localhost edgecl-emulated-pi\n")
    for d in ("root/.ssh", "run/sshd", "tmp", "proc", "dev", "mnt/small", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root/.ssh", 0o700)
    os.chmod(root / "run/sshd", 0o755)
    shutil.copy(keys / "client.pub", root / "root/.ssh/authorized_keys")
    os.chmod(root / "root/.ssh/authorized_keys", 0o600)
    for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
        shutil.copy(keys / name, etc / "ssh" / name)
    os.chmod(etc / "ssh/ssh_host_ed25519_key", 0o600)
    (etc / "ssh/sshd_config").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nUseDNS no\nPrintMotd no\nStrictModes no\n"
        "PidFile none\nSubsystem sftp internal-sftp\nMaxStartups 50\nMaxSessions 50\n"
        f"SetEnv QEMU_CPU={qemu_cpu}\n")
    sh = root / "bin/sh"
    if not sh.exists() and not sh.is_symlink():
        sh.symlink_to("dash")
    (root / EMULATOR_MARKER_REL).write_text(json.dumps(
        {"emulator": "qemu-user", "profile": profile, "qemu_cpu": qemu_cpu, "suite": SUITE}) + "\n")
    part, variant, rev = _CPU_PART[qemu_cpu]
    cpu = "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                  f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\n"
                  f"CPU part\t: {part}\nCPU revision\t: {rev}\n\n" for i in range(4))
    (etc / f"edgecl-cpuinfo-{qemu_cpu}").write_text(cpu)


EMULATOR_MARKER_REL = "etc/edgecl-emulator.json"


def recipe_hash(profile: str, qemu_cpu: str) -> str:
    text = json.dumps({"v": RECIPE_VERSION, "suite": SUITE, "packages": PACKAGES, "profile": profile,
                       "qemu_cpu": qemu_cpu, "configure": inspect.getsource(_configure)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _host_keys(keys: Path) -> None:
    keys.mkdir(parents=True, exist_ok=True)
    if not (keys / "client").exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgecl-emulator",
              "-f", str(keys / "client")])
    if not (keys / "ssh_host_ed25519_key").exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgecl-emulator-host",
              "-f", str(keys / "ssh_host_ed25519_key")])


def _download_debs(work: Path, log) -> list[Path]:
    for d in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d",
              "etc/apt/trusted.gpg.d",
              "var/lib/dpkg", "var/lib/apt/lists/partial", "var/cache/apt/archives/partial"):
        (work / d).mkdir(parents=True, exist_ok=True)
    (work / "var/lib/dpkg/status").write_text("")
    (work / "etc/apt/sources.list").write_text(
        f"deb [signed-by={KEYRING}] {MIRROR} {SUITE} main\n"
        f"deb [signed-by={KEYRING}] {MIRROR} {SUITE}-updates main\n"
        f"deb [signed-by={KEYRING}] {SECURITY} {SUITE}-security main\n")
    conf = work / "apt.conf"
    conf.write_text(f'Dir "{work}/";\nDir::State::status "{work}/var/lib/dpkg/status";\n'
                    'APT::Architecture "arm64";\nAPT::Architectures { "arm64"; };\n'
                    'APT::Install-Recommends "false";\nAPT::Sandbox::User "root";\n'
                    'Acquire::Languages "none";\nDebug::NoLocking "true";\n')
    env = dict(os.environ, APT_CONFIG=str(conf), DEBIAN_FRONTEND="noninteractive")
    log("apt-get update (arm64, private apt directory)")
    _run(["apt-get", "update", "-qq"], env=env)
    log(f"apt-get --download-only install {' '.join(PACKAGES)}")
    _run(["apt-get", "install", "-y", "-qq", "--download-only", *PACKAGES], env=env)
    debs = sorted((work / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise EmulatorError(f"no .deb downloaded into {work}/var/cache/apt/archives")
    return debs


def build_rootfs(profile: str = "rpi4", qemu_cpu: str | None = None, log=log_default,
                 force: bool = False) -> Path:
    """The cached arm64 root file system for ``profile`` (built when missing or stale)."""
    from edgecl.runtime.profiles import get

    qemu_cpu = qemu_cpu or get(profile).qemu_cpu or "cortex-a72"
    ensure_host_tools(log)
    base = cache_root() / "emulator"
    base.mkdir(parents=True, exist_ok=True)
    tag = recipe_hash(profile, qemu_cpu)
    root = base / f"rootfs-{profile}-{tag}"
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (base / f"{root.name}.ok").exists() and not force:
            return root
        t0 = time.monotonic()
        _host_keys(base / "keys")
        debs = _download_debs(base / "apt", log)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=base))
        log(f"unpacking {len(debs)} .debs into {root}")
        for deb in debs:
            _run(["dpkg", "-x", str(deb), str(tmp)])
        _configure(tmp, base / "keys", profile, qemu_cpu)
        # old trees of this profile go (another recipe); the new one is renamed in place
        for old in base.glob(f"rootfs-{profile}-*"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        os.rename(tmp, root)
        (base / f"{root.name}.ok").write_text(json.dumps({"built_s": time.monotonic() - t0,
                                                          "debs": len(debs)}) + "\n")
        log(f"root file system ready in {time.monotonic() - t0:.1f} s")
        return root


def free_port(start: int = 2222) -> int:
    for port in range(start, start + 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise EmulatorError("no free loopback port")


class Emulator:
    """A running emulated device (overlay over the cached rootfs, sshd on loopback)."""

    def __init__(self, profile: str = "rpi4", port: int | None = None, small_mb: int | None = None,
                 workdir: str | Path | None = None, log=log_default) -> None:
        from edgecl.runtime.profiles import get

        self.profile = profile
        self.qemu_cpu = get(profile).qemu_cpu or "cortex-a72"
        self.port = port
        self.small_mb = small_mb
        self.log = log
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgecl-emu-"))
        self.proc: subprocess.Popen | None = None
        self.identity = cache_root() / "emulator" / "keys" / "client"
        self.known_hosts = self.workdir / "known_hosts"
        self.user = "root"

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def ssh_args(self) -> list[str]:
        return ["ssh", "-i", str(self.identity), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-p", str(self.port),
                f"{self.user}@127.0.0.1"]

    def ssh(self, command: str, check: bool = True, timeout: float = 600) -> str:
        r = subprocess.run([*self.ssh_args(), command], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise EmulatorError(f"ssh {command!r}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def start(self, timeout: float = 120) -> Emulator:
        ensure_host_tools(self.log)
        ensure_binfmt(self.log)
        lower = build_rootfs(self.profile, self.qemu_cpu, self.log)
        self.port = self.port or free_port()
        upper, work, merged = (self.workdir / d for d in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            d.mkdir(parents=True, exist_ok=True)
        small = (f"mount -t tmpfs -o size={int(self.small_mb)}m tmpfs {merged}/mnt/small && "
                 if self.small_mb else "")
        script = (
            "set -e; "
            f"mount -t overlay overlay -o lowerdir={lower},upperdir={upper},workdir={work} {merged}; "
            f"mount -t proc proc {merged}/proc; "
            f"mount --bind {merged}/etc/edgecl-cpuinfo-{self.qemu_cpu} {merged}/proc/cpuinfo; "
            f"mount --rbind /dev {merged}/dev; "
            f"mkdir -p {merged}/sys && mount --rbind /sys {merged}/sys || true; "
            f"mount -t tmpfs -o size=256m tmpfs {merged}/tmp; chmod 1777 {merged}/tmp; "
            f"{small}"
            f"exec chroot {merged} /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config "
            f"-o ListenAddress=127.0.0.1:{self.port}")
        env = dict(os.environ, QEMU_CPU=self.qemu_cpu)
        self._log_file = open(self.workdir / "sshd.log", "w")
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--fork",
                                      "sh", "-c", script], stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise EmulatorError(f"the emulator's sshd exited ({self.proc.returncode}): "
                                    f"{(self.workdir / 'sshd.log').read_text()[-2000:]}")
            r = subprocess.run([*self.ssh_args(), "uname -m"], capture_output=True, text=True, timeout=60)
            if r.returncode == 0 and r.stdout.strip() == "aarch64":
                break
            if time.monotonic() > deadline:
                self.stop()
                raise EmulatorError(f"the emulator did not answer ssh on 127.0.0.1:{self.port}: {r.stderr}")
            time.sleep(0.5)
        self.log(f"emulated {self.profile} ({self.qemu_cpu}) answers at {self.url}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "_log_file", None):
            self._log_file.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgecl.tools.emulator", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the cached arm64 root file system")
    b.add_argument("--profile", default="rpi4")
    b.add_argument("--force", action="store_true")
    r = sub.add_parser("run", help="start an emulated device until Ctrl-C")
    r.add_argument("--profile", default="rpi4")
    r.add_argument("--port", type=int)
    r.add_argument("--small-mb", type=int, help="mount a tmpfs of this size at /mnt/small")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            print(build_rootfs(args.profile, force=args.force))
            return 0
        emu = Emulator(args.profile, args.port, args.small_mb).start()
    except EmulatorError as e:
        print(f"emulator: error: {e}", file=sys.stderr)
        return 2
    print(f"{emu.url}  (identity {emu.identity}; Ctrl-C stops)", flush=True)

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        while emu.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
