"""Every backend matches the numpy reference to 1e-4 on every task (MLP and CNN, host).

onnxruntime and TVM (apache-tvm, apache-tvm-ffi, onnx) belong to the test setup
(the ``tvm`` and ``ort`` extras): if one is missing these tests fail, they do not skip.
TFLite is checked only where a TFLite export exists (none is written yet).
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import numpy as np
import pytest

from edgecl.runtime.backends import BackendUnavailable, available, open_backend
from edgecl.runtime.bundle import Bundle

from .device_process import run_on_device

ARCHS = ["mlp", "cnn"]


@pytest.fixture(scope="module")
def compiled(trained, tmp_path_factory):
    """arch -> bundle with the host TVM library (untuned) and the ONNX export."""
    from edgecl.compiler.onnx_export import export_bundle
    from edgecl.compiler.tvm_build import compile_bundle

    out = {}
    root = tmp_path_factory.mktemp("compiled")
    os.environ["EDGECL_CACHE"] = str(root / "cache")
    for arch, method in (("mlp", "supsup"), ("cnn", "hat")):
        dst = root / arch
        shutil.copytree(trained(method, arch)[1], dst)
        compile_bundle(dst, "host", tune_trials=0, log=lambda _m: None)
        export_bundle(dst)
        out[arch] = dst
    return out


def _inputs(bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *bundle.model["input_shape"]), dtype=np.float32)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_backend_matches_numpy_on_every_task(compiled, arch, backend):
    bundle = Bundle.open(compiled[arch])
    ref = open_backend(bundle, "numpy")
    be = open_backend(bundle, backend)
    for task in bundle.task_names:
        for n in (1, 3, 32, 45):  # compiled sizes, padded sizes, and more than the largest
            x = _inputs(bundle, n, seed=n)
            got, want = be.logits(x, task), ref.logits(x, task)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{backend} {task} n={n}")
        assert np.array_equal(be.predict(x, task), ref.predict(x, task))


def test_switching_tasks_back_and_forth_is_exact(compiled):
    bundle = Bundle.open(compiled["mlp"])
    be = open_backend(bundle, "tvm")
    x = _inputs(bundle, 8)
    first = be.logits(x, 0).copy()
    be.logits(x, 1)
    assert np.array_equal(be.logits(x, 0), first)


def test_available_and_auto(compiled):
    bundle = Bundle.open(compiled["cnn"])
    status = available(bundle)
    assert status["numpy"] is None and status["tvm"] is None and status["onnxruntime"] is None
    assert open_backend(bundle, "auto").name == "tvm"
    with pytest.raises(ValueError, match="unknown backend"):
        open_backend(bundle, "nope")


def test_tflite_is_unavailable_without_an_export(compiled):
    with pytest.raises(BackendUnavailable, match="TFLite"):
        open_backend(compiled["mlp"], "tflite")


def test_manifest_records_targets_and_files(compiled):
    m = Bundle.open(compiled["mlp"]).manifest
    entry = m["targets"]["host"]
    assert entry["file"] in m["files"] and entry["file"].startswith("targets/host/forward-")
    assert entry["target"]["kind"] == "llvm" and entry["tvm_version"]
    for rel in m["exports"]["onnx"]["files"].values():
        assert rel in m["files"]


def test_bundle_without_artifacts_has_no_tvm(trained):
    status = available(trained("supsup")[1])
    assert "no TVM library" in status["tvm"] and status["numpy"] is None


def test_tvm_backend_runs_without_tvm_compiler_or_torch(compiled, tmp_path):
    """The device path: tvm.relax, the tvm package and torch are all blocked."""
    bundle = Bundle.open(compiled["cnn"])
    x = _inputs(bundle, 4)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        from edgecl.runtime.backends import open_backend
        be = open_backend(sys.argv[1], "tvm")
        out = be.logits(np.load(sys.argv[2]), 1)
        assert not any(m == "torch" or m.startswith(("tvm.", "torch.")) for m in sys.modules)
        print(json.dumps(out.tolist()))
    """)
    r = run_on_device(tmp_path, code, compiled["cnn"], tmp_path / "x.npy")
    assert r.returncode == 0, r.stderr
    want = open_backend(bundle, "numpy").logits(x, 1)
    np.testing.assert_allclose(np.asarray(json.loads(r.stdout), np.float32), want, atol=1e-4)


def test_tuning_database_is_reused(trained, tmp_path, monkeypatch):
    from edgecl.compiler import tvm_build

    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    dst = tmp_path / "b"
    shutil.copytree(trained("supsup")[1], dst)
    logs: list[str] = []
    tvm_build.compile_bundle(dst, "host", tune_trials=2, log=logs.append)
    assert any("saved" in m for m in logs)
    assert Bundle.open(dst).manifest["targets"]["host"]["tuned"] is True
    logs.clear()
    tvm_build.compile_bundle(dst, "host", tune_trials=2, log=logs.append)
    assert any("database hit" in m for m in logs) and not any("saved" in m for m in logs)
    x = _inputs(Bundle.open(dst), 32)
    np.testing.assert_allclose(open_backend(dst, "tvm").logits(x, 2),
                               open_backend(dst, "numpy").logits(x, 2), atol=1e-4)


@pytest.mark.parametrize("target", ["rpi4", "jetson-orin"])
def test_cross_compiled_library_is_aarch64(trained, tmp_path, target):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ missing: run scripts/install_toolchains.sh")
    from edgecl.compiler.tvm_build import compile_bundle

    dst = tmp_path / "b"
    shutil.copytree(trained("supsup")[1], dst)
    compile_bundle(dst, target, log=lambda _m: None)
    entry = Bundle.open(dst).manifest["targets"][target]
    head = (dst / entry["file"]).read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    assert entry["machine"] == "aarch64"
    if target == "jetson-orin":  # the GPU part is built when nvcc exists, else says why not
        cuda = entry["cuda"]
        if shutil.which("nvcc"):
            assert cuda["file"] in Bundle.open(dst).manifest["files"], cuda
        else:
            assert cuda["status"].startswith("not built"), cuda
