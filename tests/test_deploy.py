"""edgecl deploy: error paths (fast), target profiles, golden outputs, the device-side smoke
check and the wheel deploy builds. The end-to-end run on an emulated Pi is
tests/test_deploy_emulated.py.

The error paths that need an ssh server use the host's own OpenSSH sshd on a loopback
port (installed with apt-get when missing; key-only auth with a throwaway key); the
"device" is then this x86_64 machine, which is exactly what a target mismatch needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgecl.compiler.golden import add_golden, ensure_golden, golden_is_fresh, load_golden
from edgecl.runtime import profiles
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.session import Runtime
from edgecl.tools import deploy as dep

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def host_sshd(tmp_path_factory):
    """The host's sshd on 127.0.0.1:PORT, accepting one throwaway key for the current user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run an sshd")
    from edgecl.tools.emulator import ensure_host_tools

    ensure_host_tools(extra={"sshd": "openssh-server"} if shutil.which("sshd") is None
                      and not Path("/usr/sbin/sshd").exists() else None)
    d = tmp_path_factory.mktemp("sshd")
    good = _keygen(d / "good")
    _keygen(d / "hostkey")
    wrong = _keygen(d / "wrong")
    (d / "authorized_keys").write_text((d / "good.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"HostKey {d / 'hostkey'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nUseDNS no\nStrictModes no\nPidFile none\n")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config"),
                             "-o", f"ListenAddress=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "w"))
    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            break
        time.sleep(0.1)
    user = os.environ.get("USER") or "root"
    yield {"url": f"ssh://{user}@127.0.0.1:{port}", "good": str(good), "wrong": str(wrong),
           "known_hosts": str(d / "known_hosts")}
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def bundle(bundle_copy):
    return bundle_copy("supsup")


def test_unreachable_host_is_a_clear_error(bundle, tmp_path):
    port = _free_port()  # nothing listens there
    t = time.monotonic()
    with pytest.raises(dep.DeployError, match=rf"cannot reach \S+@127.0.0.1:{port}: connection refused"):
        dep.deploy(bundle, f"ssh://pi@127.0.0.1:{port}", "rpi4", known_hosts=str(tmp_path / "kh"))
    assert time.monotonic() - t < 30
    assert "golden" not in Bundle.open(bundle).manifest  # nothing done before the device answered


def test_bad_url_and_missing_key(bundle):
    with pytest.raises(dep.DeployError, match="expected ssh://USER@HOST"):
        dep.deploy(bundle, "pi@raspberrypi", "rpi4")
    with pytest.raises(dep.DeployError, match="no such key file"):
        dep.deploy(bundle, "ssh://pi@127.0.0.1:1", "rpi4", identity="/nonexistent/key")
    with pytest.raises(dep.DeployError, match="unknown target profile"):
        dep.deploy(bundle, "ssh://pi@127.0.0.1:1", "rpi9")


def test_service_checks_the_device_first(bundle):
    with pytest.raises(dep.DeployError, match="cannot reach"):
        dep.deploy(bundle, "ssh://pi@127.0.0.1:1", "rpi4", service=True)


def test_cli_prints_the_error(bundle, tmp_path):
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "edgecl.tools.deploy", str(bundle), "--to",
                        f"ssh://pi@127.0.0.1:{port}", "--target", "rpi4",
                        "--known-hosts", str(tmp_path / "kh")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "edgecl deploy: error: cannot reach" in r.stderr


def test_wrong_key_is_refused_clearly(bundle, host_sshd):
    with pytest.raises(dep.DeployError, match=r"refused the key .*wrong.*authorized_keys"):
        dep.deploy(bundle, host_sshd["url"], "rpi4", identity=host_sshd["wrong"],
                   known_hosts=host_sshd["known_hosts"])


def test_target_mismatch_copies_nothing(bundle, host_sshd, tmp_path):
    remote = tmp_path / "remote-install"
    with pytest.raises(dep.DeployError, match=r"target mismatch: the device is x86_64 .* rpi4 is aarch64"):
        dep.deploy(bundle, host_sshd["url"], "rpi4", identity=host_sshd["good"],
                   known_hosts=host_sshd["known_hosts"], remote_dir=str(remote))
    assert not remote.exists()


def test_no_room_copies_nothing(bundle, host_sshd, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (small / "keep").write_text("the previous install")
        with pytest.raises(dep.DeployError, match=r"no room on .*has 1.0 MiB free, the install needs at "):
            dep.deploy(bundle, host_sshd["url"], "host", identity=host_sshd["good"],
                       known_hosts=host_sshd["known_hosts"], remote_dir=str(small / "edgecl"))
        assert sorted(p.name for p in small.iterdir()) == ["keep"]
    finally:
        subprocess.run(["umount", str(small)])


def test_device_facts_over_ssh(host_sshd, tmp_path):
    r = dep.Remote(host_sshd["url"], host_sshd["good"], host_sshd["known_hosts"])
    facts = dep.device_facts(r, str(tmp_path / "x"))
    assert facts["machine"] == os.uname().machine and facts["python"] and facts["free_bytes"] > 0
    assert facts["current"] is None and not facts["emulated"]


# -- profiles -----------------------------------------------------------------------------
A72 = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n"
A76 = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n"


def test_profiles_hold_what_the_runtime_needs():
    from edgecl.compiler.targets import TARGETS

    for name in ("rpi4", "rpi5", "jetson-orin"):
        p = profiles.get(name)
        assert p.machine == "aarch64" and p.cpu and p.ram_budget_bytes > 0
        assert p.energy_meter in profiles.ENERGY_METERS
        assert p.tvm_target in TARGETS and TARGETS[p.tvm_target]["cpu"]["mcpu"] == p.cpu
    assert profiles.get("rpi5").energy_meter == "pi5-pmic"
    assert profiles.get("jetson-orin").energy_meter == "ina3221"
    with pytest.raises(ValueError, match="unknown target profile"):
        profiles.get("pi3")


def test_profile_matching():
    pi4 = profiles.facts_from_text("aarch64\n", A72, "Raspberry Pi 4 Model B Rev 1.4\x00")
    assert profiles.identify(pi4) == "rpi4" and profiles.mismatch("rpi4", pi4) is None
    assert "CPU part 0xd08, a rpi4" in profiles.mismatch("rpi5", pi4)
    pi5 = profiles.facts_from_text("aarch64", A76, "Raspberry Pi 5 Model B Rev 1.0")
    assert profiles.mismatch("rpi5", pi5) is None and profiles.identify(pi5) == "rpi5"
    x86 = profiles.facts_from_text("x86_64", "model name: AMD EPYC\n")
    assert "x86_64" in profiles.mismatch("jetson-orin", x86)
    odd = profiles.facts_from_text("aarch64", A72, "Some Other Board")
    assert "Some Other Board" in profiles.mismatch("rpi4", odd)
    emu = profiles.facts_from_text("aarch64", A72, "", '{"profile": "rpi4", "qemu_cpu": "cortex-a72"}')
    assert emu["emulated"] and profiles.mismatch("rpi4", emu) is None
    here = profiles.detect()
    assert here["machine"] == os.uname().machine and not here["emulated"]


# -- golden outputs, smoke ----------------------------------------------------------------
def test_golden_outputs_are_the_numpy_reference(bundle):
    v0 = Bundle.open(bundle).version
    v = add_golden(bundle)
    assert v == v0 + 1
    b = Bundle.open(bundle)
    assert golden_is_fresh(b) and ensure_golden(bundle) is None
    x, golden = load_golden(b)
    assert set(golden) == set(b.task_names) and x.dtype == np.float32
    rt = Runtime(b)
    for task, ref in golden.items():
        assert rt.logits(x, task).tobytes() == ref.tobytes()


def test_smoke_check_on_the_host(bundle):
    from edgecl.device_tests import smoke

    add_golden(bundle)
    report = smoke.run(str(bundle), ["numpy"])
    assert report["ok"], report
    assert report["backends"]["numpy"]["max_abs_err"] == 0.0 and not report["emulated"]
    bad = smoke.run(str(bundle), ["numpy", "nosuch"])
    assert not bad["ok"] and "nosuch" in bad["backends"]["nosuch"]["error"]


def test_device_tests_pass_on_the_host(bundle):
    add_golden(bundle)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "device_tests"),
                        "--bundle", str(bundle), "--backends", "numpy", "-k", "not learner"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


# -- what deploy builds -------------------------------------------------------------------
def test_edgecl_wheel_is_reproducible_and_complete(tmp_path):
    a = dep.build_edgecl_wheel(tmp_path, "3.10")
    data = a.read_bytes()
    assert dep.build_edgecl_wheel(tmp_path, "3.10").read_bytes() == data
    assert a.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(a) as z:
        names = set(z.namelist())
        assert {"edgecl/__init__.py", "edgecl/runtime/session.py", "edgecl/device_tests/smoke.py",
                "edgecl/runtime/profiles.py", "edgecl/compiler/golden.py"} <= names
        assert not any(n.endswith(".so") for n in names)
        assert "edgecl = edgecl.tools.cli:main" in z.read("edgecl-0.1.0.dist-info/entry_points.txt").decode()
        assert "Requires-Dist: numpy" in z.read("edgecl-0.1.0.dist-info/METADATA").decode()
    so = ROOT / "dist/aarch64/_native.cpython-311-aarch64-linux-gnu.so"
    if so.exists():
        w = dep.build_edgecl_wheel(tmp_path, "3.11")
        assert w.name.endswith("-cp311-cp311-linux_aarch64.whl") and not a.exists()
        with zipfile.ZipFile(w) as z:
            assert z.read("edgecl/kernels/_native.cpython-311-aarch64-linux-gnu.so") == so.read_bytes()


def test_requirements_and_tags():
    reqs, tvm = dep.requirements(["numpy", "tvm", "onnxruntime", "tflite"])
    names = {dep._name(r) for r in reqs}
    assert {"numpy", "cffi", "safetensors", "apache-tvm-ffi", "onnxruntime", "ai-edge-litert", "pip"} <= names
    assert "torch" not in names and tvm.startswith("apache-tvm==")
    assert dep.requirements(["numpy"])[1] is None
    tags = dep.platform_tags("glibc-2.36")
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_28_aarch64" in tags
    assert tags[-1] == "manylinux2014_aarch64"


def test_backend_choice_follows_the_bundle(bundle):
    b = Bundle.open(bundle)
    assert dep.choose_backends(b, "rpi4", "auto") == ["numpy"]
    with pytest.raises(dep.DeployError, match="lacks a TVM library for rpi4"):
        dep.choose_backends(b, "rpi4", "numpy,tvm")
    with pytest.raises(dep.DeployError, match="unknown backend"):
        dep.choose_backends(b, "rpi4", "numpy,cuda")
