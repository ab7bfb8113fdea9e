"""``edgecl deploy``: a bundle and an offline install of the runtime onto a Pi or a Jetson, over ssh.

    edgecl deploy BUNDLE_DIR --to ssh://pi@raspberrypi.local --target rpi4 [--identity KEY]
                  [--backends numpy,tvm,onnxruntime,tflite] [--remote-dir edgecl] [--service] [--fleet]

Ordinary OpenSSH only (``ssh`` and ``rsync`` subprocesses; BatchMode, a project
known_hosts file with StrictHostKeyChecking=accept-new, ConnectTimeout). In order:

1. Host: the bundle verifies, golden outputs are added if it lacks them
   (``compiler/golden.py``, a new bundle version), the wheelhouse for the device is ready:
   aarch64 wheels of the device extra and the chosen backends fetched once with
   ``pip download --only-binary=:all: --platform manylinux_..._aarch64 --python-version X.Y``
   into ``$EDGECL_CACHE/wheelhouse/`` (default ``~/.cache/edgecl``), plus two wheels built
   here, byte-reproducibly: ``edgecl`` itself (the package's Python files from
   pyproject.toml's package map, plus the cross-built C kernels
   ``dist/aarch64/_native.cpython-311-aarch64-linux-gnu.so`` when the device runs
   CPython 3.11 — built by ``scripts/build_kernels_aarch64.sh`` if missing) and
   ``edgecl-tvm-runtime`` (only ``tvm/lib/libtvm_runtime.so`` from the aarch64
   ``apache-tvm`` wheel: the TVM backend needs the runtime, not the 240 MB compiler).
2. Device, before anything is copied: reachable (else "cannot reach"), the key accepted
   (else "refused the key"), ``uname -m`` / ``/proc/cpuinfo`` CPU part / device-tree
   model match the target profile (``runtime/profiles.py``; else "target mismatch"),
   ``python3`` present, and ``df`` shows room for the bundle, the wheelhouse and the
   installed packages (else "no room").
3. ``rsync`` (only what changed) the wheelhouse and the bundle to ``REMOTE/wheelhouse``
   and ``REMOTE/staging/bundle``; then on the device a release
   ``REMOTE/releases/<id>`` (``id`` = hash of the bundle version and every wheel):
   a virtualenv installed with ``pip install --no-index --find-links`` (pip itself runs
   from its wheel, so the device needs no pip), the bundle hard-linked in, the bundle's
   hashes verified and a smoke inference (every task on every installed backend against
   the golden outputs, 1e-4, ``python -m edgecl.device_tests.smoke``). Only then
   ``REMOTE/current`` is switched to it, atomically (symlink + rename). A failure at any
   step leaves ``current`` — the previous install — as it was. Older releases than the
   previous one are removed.
4. Re-running with nothing changed sends nothing and reinstalls nothing.

5. ``--service``: the daemon's wheels (the ``daemon`` extra: FastAPI, uvicorn,
   prometheus-client) join the wheelhouse; after the switch the daemon's bundle
   ``REMOTE/data/bundle`` is seeded from the release's bundle *only when it is absent*
   (the daemon commits the tasks it learns there; a later deploy never overwrites them),
   ``REMOTE/service/daemon.json`` is written when absent (from deploy/daemon.example.toml,
   socket ``REMOTE/run/daemon.sock``, store ``REMOTE/state``), and the unit
   (deploy/edgecl-daemon.service with the paths and user filled in) is installed into
   /etc/systemd/system, enabled and restarted (root or passwordless sudo). A device
   without systemd as PID 1 (a container, the emulated Pi) gets the daemon started
   directly (a session of its own, a pid file; nothing restarts it), which the report says. Either
   way deploy waits for ``/readyz`` and one ``/infer`` over the socket.

6. ``--fleet``: Flower's wheels (the ``fleet`` extra, ``flwr==1.42.0`` and its dependencies:
   grpcio, protobuf, cryptography, SQLAlchemy, pydantic, uv, ...; aarch64 cp311 wheels) join
   the wheelhouse and the release, so the device can run ``edgecl fleet join`` (a Flower
   SuperNode, docs/fleet.md). Flower 1.42 needs Python >= 3.11 on the device.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from edgecl.runtime import profiles
from edgecl.runtime.errors import EdgeclError

RELEASE_RECIPE = 1
SEP = "@@EDGECL@@"
DEFAULT_REMOTE_DIR = "edgecl"
TVM_FFI_FALLBACK = "apache-tvm-ffi==0.1.14.post1"
TVM_FALLBACK = "apache-tvm==0.27.0.post1"
ALL_BACKENDS = ("numpy", "tvm", "onnxruntime", "tflite")
# the daemon's web stack when the installed metadata has no `daemon` extra (the pins tested)
DAEMON_FALLBACK = ("fastapi==0.165.0", "uvicorn==0.54.0", "prometheus-client==0.26.0")
FLEET_FALLBACK = ("flwr==1.42.0",)  # the `fleet` extra (Flower), likewise
SERVICE_UNIT = "edgecl-daemon.service"
UNIT_PREFIX = "/opt/edgecl"  # the install directory as the shipped unit spells it
MiB = 1 << 20


class DeployError(EdgeclError):
    """A deploy that could not be done; the device's previous install is untouched."""


def cache_root() -> Path:
    return Path(os.environ.get("EDGECL_CACHE", "~/.cache/edgecl")).expanduser()


def _say(msg: str) -> None:
    print(f"deploy: {msg}", flush=True)


# -- ssh --------------------------------------------------------------------------------
@dataclass
class Remote:
    """``ssh://USER@HOST[:PORT]`` reached with OpenSSH's own client."""

    url: str
    identity: str | None = None
    known_hosts: str | None = None
    connect_timeout: int = 10
    user: str = field(init=False)
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        u = urlsplit(self.url)
        if u.scheme != "ssh" or not u.hostname or u.path not in ("", "/"):
            raise DeployError(f"--to {self.url!r}: expected ssh://USER@HOST[:PORT]")
        try:
            self.port = u.port or 22
        except ValueError:
            raise DeployError(f"--to {self.url!r}: bad port") from None
        self.user = u.username or os.environ.get("USER", "root")
        self.host = u.hostname
        if self.identity is not None:
            self.identity = str(self.identity)
        if self.identity is not None and not Path(self.identity).is_file():
            raise DeployError(f"--identity {self.identity}: no such key file")
        if self.known_hosts is None:
            self.known_hosts = str(cache_root() / "known_hosts")
        Path(self.known_hosts).parent.mkdir(parents=True, exist_ok=True)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def ssh_options(self) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", f"ConnectTimeout={self.connect_timeout}",
                "-o", "ServerAliveInterval=15", "-o", "LogLevel=ERROR", "-p", str(self.port)]
        if self.identity:
            opts = ["-i", self.identity, "-o", "IdentitiesOnly=yes", *opts]
        return opts

    def ssh_command(self) -> list[str]:
        return ["ssh", *self.ssh_options()]

    def _target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}"

    def run(self, command: str, *, input: str | None = None, timeout: float = 1800,
            check: bool = True, what: str = "") -> subprocess.CompletedProcess:
        try:
            r = subprocess.run([*self.ssh_command(), self._target(), command], input=input,
                               capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise DeployError("ssh (OpenSSH client) is not installed on this host") from None
        except subprocess.TimeoutExpired:
            raise DeployError(f"{self.where}: {what or 'the command'} did not finish "
                              f"within {timeout:.0f} s") from None
        if r.returncode == 255:
            raise DeployError(self.explain(r.stderr))
        if check and r.returncode != 0:
            tail = "\n".join((r.stderr.strip() or r.stdout.strip()).splitlines()[-25:])
            raise DeployError(f"{self.where}: {what or command} failed (exit {r.returncode}):\n{tail}")
        return r

    def explain(self, stderr: str) -> str:
        """A clear sentence for ssh's own failures (exit 255)."""
        err = stderr.strip()
        low = err.lower()
        key = self.identity or "ssh's default keys"
        if "permission denied" in low:
            return (f"{self.where} refused the key {key} ({err.splitlines()[-1]}): put its public key in "
                    f"~{self.user}/.ssh/authorized_keys on the device (ssh-copy-id), or pass --identity")
        if "host key verification failed" in low or "remote host identification has changed" in low:
            return (f"{self.where}: the device's host key does not match the one recorded in "
                    f"{self.known_hosts}; if the device was reinstalled, remove its line there")
        for pattern, why in (("connection refused", "connection refused (is sshd running on that port?)"),
                             ("timed out", "connection timed out (is the device on and on this network?)"),
                             ("no route to host", "no route to host"),
                             ("could not resolve hostname", "unknown host name"),
                             ("network is unreachable", "network is unreachable"),
                             ("connection closed", "the connection was closed by the device"),
                             ("connection reset", "the connection was reset")):
            if pattern in low:
                return f"cannot reach {self.where}: {why}"
        return f"ssh to {self.where} failed: {err or 'exit 255'}"

    def rsync(self, src: Path, dest: str, *, delete: bool = True, excludes=()) -> int:
        """Mirror directory ``src`` into ``dest`` (relative to the remote home); returns files sent."""
        if shutil.which("rsync") is None:
            raise DeployError("rsync is not installed on this host (apt-get install rsync)")
        cmd = ["rsync", "-a", "--itemize-changes", "--mkpath", "-e", shlex.join(self.ssh_command())]
        if delete:
            cmd.append("--delete")
        for ex in excludes:
            cmd += ["--exclude", ex]
        cmd += [f"{src}/", f"{self._target()}:{dest}/"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            if "connection" in r.stderr.lower() or r.returncode == 255:
                raise DeployError(self.explain(r.stderr))
            if "no space left" in r.stderr.lower():
                raise DeployError(f"{self.where}: no room left on the device while copying {src.name}: "
                                  f"{r.stderr.strip().splitlines()[-1]}")
            raise DeployError(f"rsync {src} -> {self.where}:{dest} failed (exit {r.returncode}): "
                              f"{r.stderr.strip()[-1500:]}")
        return sum(1 for ln in r.stdout.splitlines() if ln.startswith("<f"))


# -- device facts ------------------------------------------------------------------------
_FACTS = r"""
cd ~ || exit 3
R=%(dir)s
uname -m; echo %(sep)s
cat /proc/cpuinfo 2>/dev/null; echo %(sep)s
cat /proc/device-tree/model 2>/dev/null; echo %(sep)s
cat /etc/edgecl-emulator.json 2>/dev/null; echo %(sep)s
python3 -c 'import platform as p; print(p.python_version()); print("-".join(p.libc_ver()))' 2>/dev/null
echo %(sep)s
d=$R; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d" | tail -n 1; echo %(sep)s
command -v rsync >/dev/null && echo rsync; echo %(sep)s
if [ -L "$R/current" ]; then basename "$(readlink "$R/current")"; fi; echo %(sep)s
cd "$R" 2>/dev/null && pwd
"""


def device_facts(remote: Remote, remote_dir: str) -> dict:
    r = remote.run(_FACTS % {"dir": shlex.quote(remote_dir), "sep": SEP}, what="reading the device's facts",
                   timeout=120, check=False)
    parts = [p.strip("\n") for p in r.stdout.split(SEP + "\n")]
    if len(parts) < 9:
        raise DeployError(f"{remote.where}: unexpected answer to the device check: {r.stdout[-500:]!r} "
                          f"{r.stderr[-500:]!r}")
    uname_m, cpuinfo, model, emu, py, df, tools, current, absdir = parts[:9]
    py_lines = py.split()
    facts = profiles.facts_from_text(uname_m, cpuinfo, model, emu, py_lines[0] if py_lines else "",
                                     py_lines[1] if len(py_lines) > 1 else "")
    cols = df.split()
    facts["free_bytes"] = int(cols[3]) * 1024 if len(cols) >= 4 and cols[3].isdigit() else None
    facts["fs"] = cols[-1] if cols else ""
    facts["rsync"] = "rsync" in tools
    facts["current"] = current.strip() or None
    facts["remote_dir_abs"] = absdir.strip() or None
    return facts


# -- the wheelhouse ----------------------------------------------------------------------
def _extra_requirements() -> dict[str, list[str]]:
    """extra -> requirement strings, from edgecl's installed metadata (pyproject.toml)."""
    out: dict[str, list[str]] = {}
    try:
        reqs = importlib.metadata.requires("edgecl") or []
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    for r in reqs:
        m = re.match(r"^(.*?)\s*;\s*extra\s*==\s*['\"]([^'\"]+)['\"]\s*$", r)
        if m:
            out.setdefault(m.group(2), []).append(m.group(1).strip())
    return out


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def requirements(backends: list[str], service: bool = False, fleet: bool = False
                 ) -> tuple[list[str], str | None]:
    """(requirements to download with their dependencies, the apache-tvm pin or None)."""
    extras = _extra_requirements()
    reqs = list(extras.get("device") or ["numpy>=1.24", "cffi>=1.16", "safetensors>=0.4"])
    tvm_pin = None
    if "tvm" in backends:
        tvm = extras.get("tvm") or [TVM_FALLBACK, TVM_FFI_FALLBACK]
        reqs += [r for r in tvm if _name(r) == "apache-tvm-ffi"]
        tvm_pin = next((r for r in tvm if _name(r) == "apache-tvm"), TVM_FALLBACK)
    if "onnxruntime" in backends:
        reqs += [r for r in extras.get("ort") or ["onnxruntime>=1.17"] if _name(r) == "onnxruntime"]
    if "tflite" in backends:
        reqs += extras.get("tflite") or ["ai-edge-litert>=2.3"]
    if service:
        reqs += extras.get("daemon") or list(DAEMON_FALLBACK)
    if fleet:
        reqs += extras.get("fleet") or list(FLEET_FALLBACK)
    reqs += ["pip", "pytest>=8"]
    return reqs, tvm_pin


def platform_tags(libc: str, machine: str = "aarch64") -> list[str]:
    """manylinux tags a device with this glibc accepts (pip needs each one named)."""
    m = re.search(r"(\d+)\.(\d+)", libc or "")
    top = int(m.group(2)) if m and m.group(1) == "2" else 28
    return [f"manylinux_2_{v}_{machine}" for v in range(top, 16, -1)] + [f"manylinux2014_{machine}"]


def _pip_download(dest: Path, reqs: list[str], py: str, tags: list[str], no_deps: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", py, "--implementation", "cp", "-d", str(dest)]
    for t in tags:
        cmd += ["--platform", t]
    if no_deps:
        cmd.append("--no-deps")
    r = subprocess.run([*cmd, *reqs], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        err = "\n".join(ln for ln in r.stderr.splitlines() if "WARNING" not in ln)[-1500:]
        raise DeployError(f"pip download of aarch64 wheels for Python {py} failed: {err}")


def _wheel_bytes(name: str, version: str, tag: str, files: dict[str, bytes], requires=(),
                 entry_points: str = "") -> tuple[str, bytes]:
    """A reproducible wheel (sorted entries, fixed timestamps)."""
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    meta = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
    meta += [f"Requires-Dist: {r}\n" for r in requires]
    files = dict(files)
    files[f"{info}/METADATA"] = "".join(meta).encode()
    files[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: edgecl-deploy\n"
                              f"Root-Is-Purelib: {'true' if tag.endswith('none-any') else 'false'}\n"
                              f"Tag: {tag}\n").encode()
    if entry_points:
        files[f"{info}/entry_points.txt"] = entry_points.encode()
    record = []
    for path, data in sorted(files.items()):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in sorted(files.items()):
            zi = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = (0o755 if path.endswith(".so") else 0o644) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
    return f"{dist}-{tag}.whl", buf.getvalue()


def source_root() -> Path:
    import edgecl

    root = Path(edgecl.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise DeployError(f"deploy builds edgecl's wheel from its source tree; no pyproject.toml at {root}")
    return root


def native_kernels(root: Path) -> Path | None:
    """The cross-built aarch64 kernels (built with scripts/build_kernels_aarch64.sh if missing)."""
    so = root / "dist/aarch64/_native.cpython-311-aarch64-linux-gnu.so"
    script = root / "scripts/build_kernels_aarch64.sh"
    src = [root / "kernels" / n for n in ("edgecl_kernels.c", "edgecl_kernels.h", "build_kernels.py")]
    stale = so.exists() and any(p.exists() and p.stat().st_mtime > so.stat().st_mtime for p in src)
    if (not so.exists() or stale) and script.exists():
        _say("cross-building the C kernels for aarch64 (scripts/build_kernels_aarch64.sh)")
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=root,
                           env=dict(os.environ, PYTHON=sys.executable))
        if r.returncode != 0:
            _say(f"warning: kernel cross-build failed, the device uses the numpy kernels: {r.stderr[-300:]}")
    return so if so.exists() else None


def _load_toml(path: Path) -> dict:
    # tomllib is 3.11+; on 3.10 (JetPack 6) tomli, its backport, reads the same. Imported
    # here, not at start-up, so that every other `edgecl` command runs on 3.10 without it.
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise DeployError(f"reading {path} needs Python 3.11+ (tomllib) or, on 3.10, "
                              "the tomli package (pip install tomli)") from None
    return tomllib.loads(path.read_text())


def build_edgecl_wheel(dest: Path, py: str, machine: str = "aarch64") -> Path:
    root = source_root()
    cfg = _load_toml(root / "pyproject.toml")
    proj, st = cfg["project"], cfg["tool"]["setuptools"]
    files: dict[str, bytes] = {}
    for pkg in st["packages"]:
        src = root / st.get("package-dir", {}).get(pkg, pkg.replace(".", "/"))
        for f in sorted(src.glob("*.py")):
            files[f"{pkg.replace('.', '/')}/{f.name}"] = f.read_bytes()
    tag = "py3-none-any"
    so = native_kernels(root) if py == "3.11" and machine == "aarch64" else None
    if so is not None:
        files["edgecl/kernels/_native.cpython-311-aarch64-linux-gnu.so"] = so.read_bytes()
        tag = "cp311-cp311-linux_aarch64"
    eps = "".join(f"{k} = {v}\n" for k, v in proj.get("scripts", {}).items())
    name, data = _wheel_bytes("edgecl", proj["version"], tag, files, proj.get("dependencies", []),
                              "[console_scripts]\n" + eps if eps else "")
    for old in dest.glob("edgecl-*.whl"):
        if old.name != name:
            old.unlink()
    path = dest / name
    if not (path.exists() and path.read_bytes() == data):
        path.write_bytes(data)
    return path


def build_tvm_runtime_wheel(dest: Path, tvm_pin: str, tags: list[str], cache: Path,
                            machine: str = "aarch64") -> Path:
    """``tvm/lib/libtvm_runtime.so`` alone, taken from the apache-tvm wheel of ``machine``."""
    version = tvm_pin.split("==", 1)[1] if "==" in tvm_pin else "0"
    tag = f"py3-none-manylinux_2_28_{machine}"  # what the apache-tvm wheels are built for
    out = dest / f"edgecl_tvm_runtime-{version}-{tag}.whl"
    if out.exists():
        return out
    full = cache / f"apache-tvm-{machine}"
    full.mkdir(parents=True, exist_ok=True)
    if not list(full.glob(f"apache_tvm-{version}-*.whl")):
        _say(f"downloading {tvm_pin} (aarch64) once, to take its runtime library")
        _pip_download(full, [tvm_pin], "3.11", tags, no_deps=True)
    whl = sorted(full.glob(f"apache_tvm-{version}-*.whl"))[-1]
    with zipfile.ZipFile(whl) as z:
        lib = z.read("tvm/lib/libtvm_runtime.so")
    name, data = _wheel_bytes("edgecl-tvm-runtime", version, tag, {"tvm/lib/libtvm_runtime.so": lib},
                              ["apache-tvm-ffi"])
    assert name == out.name, name
    out.write_bytes(data)
    return out


def wheelhouse(backends: list[str], py: str, libc: str, machine: str = "aarch64",
               service: bool = False, fleet: bool = False) -> Path:
    """The device's offline wheelhouse (cached per Python version, glibc and backends)."""
    reqs, tvm_pin = requirements(backends, service, fleet)
    tags = platform_tags(libc, machine)
    key = hashlib.sha256(json.dumps([reqs, tvm_pin, tags, py]).encode()).hexdigest()[:10]
    dest = cache_root() / "wheelhouse" / f"cp{py.replace('.', '')}-{machine}-{key}"
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / ".complete").exists():
        _say(f"downloading {machine} wheels for Python {py} into {dest}")
        _pip_download(dest, reqs, py, tags)
        (dest / ".complete").write_text(json.dumps(reqs) + "\n")
    if tvm_pin:
        build_tvm_runtime_wheel(dest, tvm_pin, tags, cache_root() / "wheelhouse", machine)
    build_edgecl_wheel(dest, py, machine)
    return dest


def install_names(backends: list[str], house: Path, service: bool = False, fleet: bool = False) -> list[str]:
    names = ["edgecl", "pytest"]
    reqs, tvm_pin = requirements(backends, service, fleet)
    if tvm_pin:
        names += ["edgecl-tvm-runtime"] + [r for r in reqs if _name(r) == "apache-tvm-ffi"]
    names += [r for r in reqs if _name(r) in ("onnxruntime", "ai-edge-litert", "tflite-runtime")]
    if service:
        names += [r for r in reqs if _name(r) in ("fastapi", "uvicorn", "prometheus-client")]
    if fleet:
        names += [r for r in reqs if _name(r) == "flwr"]
    return names


def _unpacked_bytes(house: Path) -> int:
    total = 0
    for w in house.glob("*.whl"):
        with zipfile.ZipFile(w) as z:
            total += sum(i.file_size for i in z.infolist())
    return total


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _digest_dir(d: Path, pattern: str = "*") -> str:
    h = hashlib.sha256()
    for p in sorted(d.glob(pattern)):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# -- choosing backends -------------------------------------------------------------------
def choose_backends(bundle, target: str, requested: str | None) -> list[str]:
    """Backends to install: those asked for, or every one the bundle has an artifact for."""
    prof = profiles.get(target)
    have = {"numpy": True, "tvm": prof.tvm_target in bundle.manifest.get("targets", {}),
            "onnxruntime": "onnx" in bundle.manifest.get("exports", {}),
            "tflite": bool(bundle.manifest.get("exports", {}).get("tflite", {}).get("graphs"))}
    if requested in (None, "", "auto"):
        return [b for b in ALL_BACKENDS if have[b]]
    out = [b.strip() for b in requested.split(",") if b.strip()]
    for b in out:
        if b not in have:
            raise DeployError(f"--backends: unknown backend {b!r}; choose from {', '.join(ALL_BACKENDS)}")
        if not have[b]:
            what = {"tvm": f"a TVM library for {prof.tvm_target} (edgecl compile --target {prof.tvm_target})",
                    "onnxruntime": "an ONNX export (edgecl compile)",
                    "tflite": "a TFLite export"}[b]
            raise DeployError(f"--backends {b}: the bundle lacks {what}")
    return ["numpy"] + [b for b in out if b != "numpy"]


# -- the device side of an install --------------------------------------------------------
_INSTALL = r"""
set -eu
cd ~
R=%(dir)s; ID=%(id)s; PY=python3
mkdir -p "$R/releases"; R=$(cd "$R" && pwd); REL="$R/releases/$ID"
if [ ! -f "$REL/.ok" ]; then
  rm -rf "$REL"; mkdir -p "$REL"
  echo "creating the virtualenv"
  $PY -m venv --without-pip "$REL/venv"
  PIPWHL=$(ls "$R"/wheelhouse/pip-*.whl | tail -n 1)
  echo "installing from the wheelhouse (no network)"
  # one pip run, from its wheel, installs pip itself and the rest: each run of pip costs
  # seconds of start-up and resolution on a slow board (and under qemu)
  "$REL/venv/bin/python" "$PIPWHL/pip" install --quiet --no-index --find-links "$R/wheelhouse" \
      --no-compile --disable-pip-version-check "$PIPWHL" %(names)s
  cp -al "$R/staging/bundle" "$REL/bundle" 2>/dev/null || cp -a "$R/staging/bundle" "$REL/bundle"
  printf '%%s\n' %(release_json)s > "$REL/release.json"
else
  echo "release $ID is installed already"
fi
echo "verifying the bundle and running the smoke inference"
"$REL/venv/bin/python" -m edgecl.device_tests.smoke --bundle "$REL/bundle" --target %(target)s \
    --backends %(backends)s --json "$REL/smoke.json"
touch "$REL/.ok"
PREV=""
if [ -L "$R/current" ]; then PREV=$(basename "$(readlink "$R/current")"); fi
if [ "$PREV" != "$ID" ]; then
  ln -sfn "releases/$ID" "$R/current.new" && mv -T "$R/current.new" "$R/current"
  echo "switched current: ${PREV:-none} -> $ID"
fi
for d in "$R"/releases/*; do
  n=$(basename "$d")
  if [ "$n" != "$ID" ] && [ "$n" != "$PREV" ]; then rm -rf "$d"; fi
done
echo %(sep)s
cat "$REL/smoke.json"
"""


def deploy(bundle_dir: str | Path, to: str, target: str, identity: str | None = None, service: bool = False,
           *, backends: str | None = None, remote_dir: str = DEFAULT_REMOTE_DIR,
           known_hosts: str | None = None,
           connect_timeout: int = 10, fleet: bool = False, log=_say) -> dict:
    """Deploy ``bundle_dir`` to the device at ``to``; returns a report (dict). Raises DeployError."""
    t0 = time.monotonic()
    if service and importlib.util.find_spec("edgecl.runtime.daemon") is None:
        raise DeployError("--service: there is no daemon in this version of edgecl (no `edgecl daemon`, no "
                          "systemd unit to install); deploy without --service")
    unit_text = service_files()[0] if service else None  # missing files fail here, before the device
    try:
        prof = profiles.get(target)
    except ValueError as e:
        raise DeployError(str(e)) from None
    from edgecl.runtime.bundle import Bundle

    bundle_dir = Path(bundle_dir)
    bundle = Bundle.open(bundle_dir)  # verifies every hash on the host first
    remote = Remote(to, identity, known_hosts, connect_timeout)

    # 1. the device, before anything is copied
    log(f"checking {remote.where}")
    facts = device_facts(remote, remote_dir)
    why = profiles.mismatch(target, facts)
    if why:
        raise DeployError(f"target mismatch: {why}. Nothing was copied; the device's install is unchanged")
    if not facts["python"]:
        raise DeployError(f"{remote.where}: no python3 on the device (apt-get install python3 python3-venv)")
    py = ".".join(facts["python"].split(".")[:2])
    if fleet and tuple(int(n) for n in py.split(".")) < (3, 11):
        raise DeployError(f"--fleet: Flower 1.42 needs Python >= 3.11; {remote.where} has Python {py}. "
                          "Nothing was copied; the device's install is unchanged")
    backends_list = choose_backends(bundle, target, backends)
    free = facts["free_bytes"]
    at_least = _dir_bytes(bundle_dir) + 64 * MiB  # before any download: the bundle and a minimal install
    if facts["current"] is None and free is not None and free < at_least:
        raise DeployError(f"no room on {remote.where}: {remote_dir} ({facts['fs']}) has {free / MiB:.1f} MiB "
                          f"free, the install needs at least {at_least / MiB:.0f} MiB (bundle, wheels, "
                          "virtualenv). Nothing was copied; the device's install is unchanged")

    # 2. host side: golden outputs, wheelhouse
    from edgecl.compiler.golden import ensure_golden

    v = ensure_golden(bundle_dir)
    if v is not None:
        log(f"{bundle_dir}: version {v}: golden outputs added (canary inputs + numpy-reference logits)")
    bundle = Bundle.open(bundle_dir)
    house = wheelhouse(backends_list, py, facts["libc"], prof.machine, service, fleet)
    names = install_names(backends_list, house, service, fleet)
    release_id = hashlib.sha256(json.dumps(
        [RELEASE_RECIPE, bundle.manifest["checksum"], _digest_dir(house, "*.whl"), names, target, py]
    ).encode()).hexdigest()[:12]

    # 3. room on the device (nothing needed when this exact release is current)
    need = 0
    if facts["current"] != release_id:
        need = _dir_bytes(bundle_dir) + _dir_bytes(house) + _unpacked_bytes(house) + 16 * MiB
    if need and free is not None and free < need:
        raise DeployError(f"no room on {remote.where}: {remote_dir} ({facts['fs']}) has {free / MiB:.1f} MiB "
                          f"free, the install needs {need / MiB:.1f} MiB (bundle, wheels, virtualenv). "
                          "Nothing was copied; the device's install is unchanged")

    # 4. copy (only what changed)
    if not facts["rsync"]:
        raise DeployError(f"{remote.where}: rsync is not installed on the device (apt-get install rsync)")
    log(f"copying the wheelhouse and the bundle to {remote.where}:{remote_dir}")
    sent = remote.rsync(house, f"{remote_dir}/wheelhouse", excludes=[".complete"])
    sent += remote.rsync(bundle_dir, f"{remote_dir}/staging/bundle", excludes=[".lock", ".learn*", "*.tmp"])

    # 5. install, verify, smoke, switch
    release = {"id": release_id, "target": target, "backends": backends_list, "python": py,
               "bundle_version": bundle.version, "profile": prof.to_dict(), "packages": names,
               "emulated": facts["emulated"]}
    log(f"installing release {release_id} (backends: {', '.join(backends_list)})")
    script = _INSTALL % {"dir": shlex.quote(remote_dir), "id": release_id,
                         "names": " ".join(map(shlex.quote, names)),
                         "release_json": shlex.quote(json.dumps(release)), "target": shlex.quote(target),
                         "backends": ",".join(backends_list), "sep": SEP}
    r = remote.run("bash -s", input=script, check=False, what="the install")
    if r.returncode != 0:
        tail = "\n".join((r.stderr.strip() + "\n" + r.stdout.strip()).strip().splitlines()[-30:])
        raise DeployError(f"{remote.where}: the install of release {release_id} failed "
                          f"(exit {r.returncode}); "
                          f"current is unchanged ({facts['current'] or 'no previous install'}):\n{tail}")
    out, _, smoke = r.stdout.partition(SEP + "\n")
    try:
        smoke_report = json.loads(smoke)
    except ValueError:
        smoke_report = {"raw": smoke}
    report = {"url": to, "target": target, "release": release_id, "previous": facts["current"],
              "changed": facts["current"] != release_id, "files_sent": sent, "backends": backends_list,
              "python": py, "emulated": facts["emulated"],
              "remote_dir": facts["remote_dir_abs"] or remote_dir,
              "smoke": smoke_report, "seconds": time.monotonic() - t0, "log": out.strip().splitlines()}
    state = "switched to" if report["changed"] else "already at"
    log(f"{remote.where}: {state} release {release_id}; {sent} file(s) sent; smoke inference passed "
        f"({', '.join(backends_list)}) in {report['seconds']:.0f} s")
    if service:
        report["service"] = install_service(remote, remote_dir, facts, unit_text, log)
        report["seconds"] = time.monotonic() - t0
    return report


# -- the daemon's service -----------------------------------------------------------------
def service_files() -> tuple[str, dict]:
    """(the unit's text, the example config as a dict) from the source tree's deploy/."""
    root = source_root() / "deploy"
    unit, example = root / SERVICE_UNIT, root / "daemon.example.toml"
    for f in (unit, example):
        if not f.is_file():
            raise DeployError(f"--service: {f} is missing (it ships in the source tree's deploy/ folder)")
    return unit.read_text(), _load_toml(example)


def render_unit(text: str, *, remote_dir: str, user: str, group: str | None = None,
                python: str | None = None) -> str:
    """The shipped unit for one device: ``/opt/edgecl`` -> the absolute install directory,
    ``User``/``Group`` -> the ssh user, and (tests) another Python for ExecStart."""
    out = []
    for line in text.replace(UNIT_PREFIX, remote_dir.rstrip("/")).splitlines():
        if line.startswith("User="):
            line = f"User={user}"
        elif line.startswith("Group="):
            line = f"Group={group or user}"
        elif python and line.startswith("ExecStart="):
            line = "ExecStart=" + python + " " + line.split(" ", 1)[1]
        out.append(line)
    return "\n".join(out) + "\n"


def render_config(example: dict, remote_dir: str) -> str:
    """The daemon's config on the device (JSON: Python 3.10 devices have no tomllib): the
    example's settings with the socket and the store under the install directory."""
    cfg = json.loads(json.dumps(example))
    cfg.setdefault("server", {})["socket"] = f"{remote_dir}/run/daemon.sock"
    cfg.setdefault("store", {})["state_dir"] = f"{remote_dir}/state"
    return json.dumps(cfg, indent=1, sort_keys=True) + "\n"


_SERVICE = r"""
set -eu
cd ~
R=%(dir)s; R=$(cd "$R" && pwd)
mkdir -p "$R/service" "$R/run" "$R/state" "$R/data"
if [ ! -f "$R/data/bundle/manifest.json" ]; then
  rm -rf "$R/data/bundle.tmp"; cp -a "$R/current/bundle" "$R/data/bundle.tmp"
  mv "$R/data/bundle.tmp" "$R/data/bundle"; echo "seeded $R/data/bundle from the release"
else
  echo "kept $R/data/bundle (the daemon's own versions)"
fi
printf '%%s' %(unit)s > "$R/service/%(unit_name)s"
if [ ! -f "$R/service/daemon.json" ]; then printf '%%s' %(config)s > "$R/service/daemon.json"; fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  $SUDO install -m 0644 "$R/service/%(unit_name)s" /etc/systemd/system/%(unit_name)s
  $SUDO systemctl daemon-reload
  $SUDO systemctl enable %(unit_name)s >/dev/null 2>&1
  $SUDO systemctl restart %(unit_name)s
  echo "mode=systemd"
else
  if [ -f "$R/run/daemon.pid" ]; then
    P=$(cat "$R/run/daemon.pid")
    if kill -0 "$P" 2>/dev/null; then
      kill "$P"; for i in $(seq 1 100); do kill -0 "$P" 2>/dev/null || break; sleep 0.1; done
    fi
  fi
  # a session of its own (os.setsid, then exec: the same pid), so the ssh session's end leaves it be;
  # Python rather than setsid(1), which a minimal root file system may lack
  PY="$R/current/venv/bin/python"
  nohup "$PY" -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' \
      "$PY" -m edgecl.runtime.daemon "$R/data/bundle" --config "$R/service/daemon.json" \
      >> "$R/state/daemon.log" 2>&1 < /dev/null &
  echo $! > "$R/run/daemon.pid"
  echo "mode=direct (no systemd here: the daemon runs in its own session, pid $(cat "$R/run/daemon.pid"))"
fi
echo %(sep)s
"$R/current/venv/bin/python" - "$R/run/daemon.sock" "$R/state/daemon.log" <<'PY'
import json, subprocess, sys, time
from edgecl.runtime.daemon.client import Client
c, t0, last = Client(sys.argv[1], timeout=30), time.monotonic(), None
while time.monotonic() - t0 < 240:
    try:
        s, body = c.get("/readyz")
        if s == 200:
            break
        last = body
    except OSError as e:
        c.close(); last = str(e)
    time.sleep(0.5)
else:
    try:
        log = open(sys.argv[2]).read()[-3000:]
    except OSError:
        log = subprocess.run(["journalctl", "-u", "edgecl-daemon", "-n", "40", "--no-pager"],
                             capture_output=True, text=True).stdout[-3000:]
    print(log, file=sys.stderr)
    print(json.dumps({"ok": False, "error": f"not ready after 240 s: {last}"})); sys.exit(1)
shape = [1] + [int(n) for n in c.get("/status")[1]["input_shape"]]
n = 1
for d in shape:
    n *= d
s, ans = c.post("/infer", {"x": [0.5] * n, "task": body["tasks"][0]} if body["tasks"] else {"x": [0.5] * n})
print(json.dumps({"ok": s == 200, "readyz": body, "infer_status": s, "infer": ans,
                  "seconds": round(time.monotonic() - t0, 1)}))
sys.exit(0 if s == 200 else 1)
PY
"""


def install_service(remote: Remote, remote_dir: str, facts: dict, unit_text: str, log=_say) -> dict:
    """Install and start the daemon on the device (after the release is current)."""
    absdir = facts.get("remote_dir_abs") or remote.run(f"cd {shlex.quote(remote_dir)} && pwd").stdout.strip()
    unit = render_unit(unit_text, remote_dir=absdir, user=remote.user)
    config = render_config(service_files()[1], absdir)
    log(f"installing the daemon's service on {remote.where}")
    script = _SERVICE % {"dir": shlex.quote(remote_dir), "unit": shlex.quote(unit), "unit_name": SERVICE_UNIT,
                         "config": shlex.quote(config), "sep": SEP}
    r = remote.run("bash -s", input=script, check=False, what="the service install", timeout=600)
    out, _, check = r.stdout.partition(SEP + "\n")
    try:
        answer = json.loads(check.strip().splitlines()[-1])
    except (ValueError, IndexError):
        answer = {"ok": False}
    if r.returncode != 0 or not answer.get("ok"):
        tail = "\n".join((r.stderr.strip() + "\n" + r.stdout.strip()).strip().splitlines()[-30:])
        raise DeployError(f"{remote.where}: the daemon did not start or answer (exit {r.returncode}); the "
                          f"release is installed, the service is not serving:\n{tail}")
    mode = next((ln.split("=", 1)[1] for ln in out.splitlines() if ln.startswith("mode=")), "?")
    log(f"{remote.where}: the daemon serves {absdir}/data/bundle on {absdir}/run/daemon.sock ({mode})")
    return {"mode": mode, "unit": f"{absdir}/service/{SERVICE_UNIT}",
            "config": f"{absdir}/service/daemon.json", "socket": f"{absdir}/run/daemon.sock",
            "bundle": f"{absdir}/data/bundle", "check": answer,
            "log": out.strip().splitlines()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE_DIR")
    parser.add_argument("--to", required=True, metavar="ssh://USER@HOST[:PORT]", help="the device")
    parser.add_argument("--target", required=True, choices=profiles.names(),
                        help="target profile (checked against the device's CPU)")
    parser.add_argument("--identity", metavar="KEY", help="ssh private key (default: ssh's own choice)")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated subset of numpy,tvm,onnxruntime,tflite (default: every one "
                             "the bundle has an artifact for)")
    parser.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR,
                        help="install directory on the device, relative to the user's home (default edgecl)")
    parser.add_argument("--known-hosts", help="known_hosts file (default $EDGECL_CACHE/known_hosts)")
    parser.add_argument("--connect-timeout", type=int, default=10, help="seconds (default 10)")
    parser.add_argument("--service", action="store_true", help="install and start the daemon's systemd unit")
    parser.add_argument("--fleet", action="store_true",
                        help="also install Flower, so the device can run `edgecl fleet join` (docs/fleet.md)")
    parser.add_argument("--json", metavar="OUT", help="write the deploy report here")


def main(args: argparse.Namespace) -> int:
    report = deploy(args.bundle, args.to, args.target, args.identity, args.service, backends=args.backends,
                    remote_dir=args.remote_dir, known_hosts=args.known_hosts,
                    connect_timeout=args.connect_timeout, fleet=getattr(args, "fleet", False))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="edgecl deploy", description=__doc__.splitlines()[0])
    add_arguments(p)
    ns = p.parse_args()
    try:
        sys.exit(main(ns))
    except EdgeclError as e:
        print(f"edgecl deploy: error: {e}", file=sys.stderr)
        sys.exit(2)
