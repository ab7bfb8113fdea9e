"""The TFLite backend matches the numpy reference to 1e-4 on every task (MLP and CNN).

ai-edge-litert (the ``tflite`` extra) belongs to the test setup: without it these tests
fail, they do not skip. The .tflite models are written by ``compiler/tflite_export.py``
(a hand-built flatbuffer, no TensorFlow).
"""

from __future__ import annotations

import json
import shutil
import textwrap

import ai_edge_litert.interpreter  # noqa: F401  (required: fail, never skip)
import numpy as np
import pytest

from edgecl.compiler.tflite_export import build_graph, build_template, export_bundle, serialize
from edgecl.runtime import executor
from edgecl.runtime.backends import available, open_backend
from edgecl.runtime.backends.tflite import fill_template, interpreter_class, to_layout
from edgecl.runtime.bundle import Bundle

from .device_process import run_on_device


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """arch -> bundle with the TFLite export."""
    out = {}
    root = tmp_path_factory.mktemp("tflite")
    for arch, method in (("mlp", "supsup"), ("cnn", "hat"), ("mlp-packnet", "packnet")):
        dst = root / arch
        shutil.copytree(trained(method, arch.split("-")[0])[1], dst)
        export_bundle(dst)
        out[arch] = dst
    return out


def _inputs(bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *bundle.model["input_shape"]), dtype=np.float32)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "mlp-packnet"])
def test_tflite_matches_numpy_on_every_task(exported, arch):
    bundle = Bundle.open(exported[arch])
    ref = open_backend(bundle, "numpy")
    be = open_backend(bundle, "tflite")
    for task in bundle.task_names:
        for n in (1, 3, 32, 45, 1):  # new batch sizes, and back to a cached one
            x = _inputs(bundle, n, seed=n)
            got, want = be.logits(x, task), ref.logits(x, task)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{arch} {task} n={n}")
        assert np.array_equal(be.predict(x, task), ref.predict(x, task))


def test_switching_tasks_back_and_forth_is_exact(exported):
    be = open_backend(exported["cnn"], "tflite")
    x = _inputs(be.bundle, 8)
    first = be.logits(x, 0).copy()
    be.logits(x, 1)
    assert np.array_equal(be.logits(x, 0), first)


def test_manifest_and_template(exported):
    m = Bundle.open(exported["cnn"]).manifest
    exp = m["exports"]["tflite"]
    assert available(exported["cnn"])["tflite"] is None
    for n, g in exp["graphs"].items():
        assert g["file"] in m["files"] and g["file"].startswith("targets/tflite/")
        holes = g["holes"]
        assert [h["offset"] for h in holes] == sorted(h["offset"] for h in holes)
        assert all(h["offset"] % 16 == 0 for h in holes)
        assert all(a["offset"] + a["bytes"] <= b["offset"] for a, b in zip(holes, holes[1:], strict=False))
        stored = m["files"][g["file"]]["bytes"]
        assert stored + sum(h["bytes"] for h in holes) == g["bytes"]
        assert stored < 8192  # the weights live in the backbone and task files only
        assert {h["tensor"] for h in holes} >= {"head.weight", "head.bias", "conv1.weight", "fc1.weight"}
        assert int(n) == next(h for h in holes if h["tensor"] == "head.bias")["shape"][0]
    # exporting again replaces, never duplicates
    export_bundle(exported["cnn"])
    m2 = Bundle.open(exported["cnn"]).manifest
    assert sorted(f for f in m2["files"] if f.startswith("targets/tflite/")) == sorted(
        g["file"] for g in m2["exports"]["tflite"]["graphs"].values())


def test_the_full_model_is_a_plain_tflite_file(exported, tmp_path):
    """The filled template is an ordinary .tflite (loads from a path; identifier TFL3)."""
    be = open_backend(exported["mlp"], "tflite")
    data = be.model_bytes(be.bundle.task(2))
    assert data[4:8] == b"TFL3"
    (tmp_path / "m.tflite").write_bytes(data)
    interp = interpreter_class()(model_path=str(tmp_path / "m.tflite"))
    interp.allocate_tensors()
    x = _inputs(be.bundle, 1)
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    got = interp.get_tensor(interp.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, open_backend(be.bundle, "numpy").logits(x, 2), atol=1e-4)


def test_explicit_pad_strides_no_bias_and_flatten_into_the_head():
    """Layer tables beyond the shipped CNN: padding that is not SAME (PAD + VALID), stride 2,
    conv without bias, 3 input channels, and a conv stack flattened straight into the head."""
    layers = [
        {"op": "conv2d", "name": "c1", "in_channels": 3, "out_channels": 8, "kernel_size": 3,
         "stride": 2, "padding": 1, "bias": False},
        {"op": "relu"},
        {"op": "conv2d", "name": "c2", "in_channels": 8, "out_channels": 4, "kernel_size": 3,
         "stride": 1, "padding": 0, "bias": True},
        {"op": "maxpool2d", "kernel_size": 2},
        {"op": "relu"},
        {"op": "flatten"},
    ]
    model = {"arch": "test", "input_shape": [3, 11, 11], "layers": layers, "feature_dim": 16}
    rng = np.random.default_rng(0)
    params = {"c1": (rng.standard_normal((8, 3, 3, 3), np.float32), None),
              "c2": (rng.standard_normal((4, 8, 3, 3), np.float32), rng.standard_normal(4, np.float32))}
    head = (rng.standard_normal((5, 16), np.float32), rng.standard_normal(5, np.float32))
    template, entry = build_template(model, 5)
    src = {"c1.weight": params["c1"][0], "c2.weight": params["c2"][0], "c2.bias": params["c2"][1],
           "head.weight": head[0], "head.bias": head[1]}
    content = fill_template(template, entry, {h["tensor"]: to_layout(src[h["tensor"]], h)
                                              for h in entry["holes"]})
    assert content == _outside_holes_from_serialize(model, content, entry)
    interp = interpreter_class()(model_content=content, num_threads=1)
    x = rng.random((6, 3, 11, 11), np.float32)
    inp = interp.get_input_details()[0]["index"]
    interp.resize_tensor_input(inp, list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp, x)
    interp.invoke()
    got = interp.get_tensor(interp.get_output_details()[0]["index"])
    want = executor.forward(layers, params, head, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def _outside_holes_from_serialize(model, content, entry) -> bytes:
    """The serialized graph with the holes filled is byte-identical outside the holes."""
    full, holes = serialize(build_graph(model, 5), "edgecl test c5")
    assert len(full) == len(content) == entry["bytes"] and holes == entry["holes"]
    out = bytearray(full)
    for h in holes:
        out[h["offset"]:h["offset"] + h["bytes"]] = content[h["offset"]:h["offset"] + h["bytes"]]
    return bytes(out)


def test_tflite_backend_runs_without_torch_or_tvm(exported, tmp_path):
    """The device path: torch and tvm blocked; only numpy and the interpreter."""
    bundle = Bundle.open(exported["cnn"])
    x = _inputs(bundle, 4)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        from edgecl.runtime.backends import open_backend
        be = open_backend(sys.argv[1], "tflite")
        out = be.logits(np.load(sys.argv[2]), 1)
        assert not any(m in ("torch", "tvm") or m.startswith(("tvm.", "torch.")) for m in sys.modules)
        print(json.dumps(out.tolist()))
    """)
    r = run_on_device(tmp_path, code, exported["cnn"], tmp_path / "x.npy",
                      blocked=("torch", "tvm", "tvm_ffi", "flatbuffers"))
    assert r.returncode == 0, r.stderr
    want = open_backend(bundle, "numpy").logits(x, 1)
    np.testing.assert_allclose(np.asarray(json.loads(r.stdout), np.float32), want, atol=1e-4)
