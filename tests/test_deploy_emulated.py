"""End to end on an emulated Raspberry Pi 4 (arm64 Debian bookworm under qemu user mode,
sshd on loopback; ``edgecl.tools.emulator``): deploy -> device_tests -> results back.

Builds what it needs from scratch (apt packages, binfmt, root file system, wheelhouse)
into ``$EDGECL_CACHE`` and reuses it on later runs. Needs root. On the emulator only
correctness is judged: outputs of every task on every backend with an aarch64 wheel
(numpy, tvm, onnxruntime, and tflite when the bundle has a TFLite export) must match the
host's numpy reference to 1e-4; the bench that comes back is labelled emulated.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from edgecl.runtime.bundle import Bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the emulator needs root (binfmt_misc, mount namespaces, chroot)")
    from edgecl.tools.emulator import Emulator

    emu = Emulator("rpi4", small_mb=4, workdir=tmp_path_factory.mktemp("emulator"))
    emu.start()
    yield emu
    emu.stop()


def _compiled_bundle(bundle_copy) -> tuple:
    from edgecl.compiler.onnx_export import export_bundle
    from edgecl.compiler.tvm_build import compile_bundle

    b = bundle_copy("supsup")
    compile_bundle(b, "rpi4")
    export_bundle(b)
    if importlib.util.find_spec("edgecl.compiler.tflite_export") is not None:
        from edgecl.compiler import tflite_export

        if "tflite" not in Bundle.open(b).manifest.get("exports", {}):
            tflite_export.export_bundle(b)
    exports = Bundle.open(b).manifest.get("exports", {})
    backends = ["numpy", "tvm", "onnxruntime"] + (["tflite"] if "tflite" in exports else [])
    return b, backends


def test_deploy_device_tests_and_results_back(emulator, bundle_copy, tmp_path):
    from edgecl.tools.deploy import DeployError, deploy
    from edgecl.tools.device_test_cmd import device_test

    bundle, backends = _compiled_bundle(bundle_copy)
    kw = {"identity": str(emulator.identity), "known_hosts": str(tmp_path / "known_hosts")}
    quiet = {"log": lambda _msg: None}

    # 1. first deploy: wheelhouse + bundle go over, a release is installed, smoke-tested, switched to
    r1 = deploy(bundle, emulator.url, "rpi4", **kw, **quiet)
    assert r1["changed"] and r1["files_sent"] > 0 and r1["emulated"]
    assert r1["backends"] == backends
    smoke = r1["smoke"]
    assert smoke["ok"] and smoke["device"]["machine"] == "aarch64" and smoke["emulated"]
    assert set(smoke["backends"]) == set(backends)
    for name, res in smoke["backends"].items():  # every task, every backend, vs the host's numpy reference
        assert res["ok"] and res["max_abs_err"] <= 1e-4, (name, res)
        assert set(res["per_task"]) == set(Bundle.open(bundle).task_names)
    assert "golden" in Bundle.open(bundle).manifest  # deploy added the golden outputs

    # 2. again: nothing sent, nothing reinstalled
    r2 = deploy(bundle, emulator.url, "rpi4", **kw, **quiet)
    assert not r2["changed"] and r2["files_sent"] == 0 and r2["release"] == r1["release"]
    assert any("installed already" in ln for ln in r2["log"])

    # 3. failures leave the previous install working
    with pytest.raises(DeployError, match="target mismatch: the device's CPU .*0xd08"):
        deploy(bundle, emulator.url, "rpi5", **kw, **quiet)
    with pytest.raises(DeployError, match=r"no room on .*/mnt/small"):
        deploy(bundle, emulator.url, "rpi4", remote_dir="/mnt/small/edgecl", **kw, **quiet)
    assert emulator.ssh("readlink edgecl/current").strip() == f"releases/{r1['release']}"
    out = emulator.ssh("edgecl/current/venv/bin/edgecl inspect edgecl/current/bundle")
    assert "digits-0-1" in out

    # 4. device tests on the device; results come back
    rep = device_test(emulator.url, emulator.identity, known_hosts=kw["known_hosts"], bench_iters=40,
                      log=lambda _msg: None)
    (tmp_path / "device-test.json").write_text(json.dumps(rep, indent=1))
    tests = {k: v for k, v in rep["tests"].items() if "#" not in k}
    for b in backends:
        key = f"device_tests.test_golden::test_backend_matches_golden[{b}]"
        assert tests[key] == "passed", rep["pytest_output"]
    for name, state in tests.items():
        if "test_golden" not in name:  # the learner included: it must run on the device
            assert state == "passed", (name, rep["pytest_output"])
    learned = [k for k in tests if "test_learner" in k]
    assert learned and all(tests[k] == "passed" for k in learned), rep["pytest_output"]
    assert rep["emulated"] is True
    bench = rep["bench"]
    assert bench["emulated"] is True and "not comparable" in bench["note"]
    assert {r["backend"] for r in bench["rows"]} == set(backends)
