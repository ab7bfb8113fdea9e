"""The TFLite backend matches the numpy reference to 1e-4: on every task of the trained
MLP and CNN bundles, and on small graphs built here that reach every op's TFLite
emission (depthwise conv with stride 2 and asymmetric pads, batch norm, a residual add,
ReLU6, hard-swish, global pooling, grouped conv, pools with ceil mode, a transformer
block with composed layer norm, ...).

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

from edgecl.compiler.tflite_export import (
    BUILTINS,
    TfliteUnsupported,
    build_graph,
    build_template,
    export_bundle,
    serialize,
)
from edgecl.runtime import executor
from edgecl.runtime.backends import BackendUnavailable, available, open_backend
from edgecl.runtime.backends.tflite import fill_template, hole_tensors, interpreter_class, to_layout
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.graph import Graph, Node, Param, Value
from edgecl.runtime.ops import Op, get_op

from .device_process import run_on_device

ATOL = 1e-4


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
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{arch} {task} n={n}")
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
    assert exp["layout"] == "nhwc-4d" and exp["inputs"] == ["x"] and "unavailable" not in exp
    for n, g in exp["graphs"].items():
        assert g["file"] in m["files"] and g["file"].startswith("targets/tflite/")
        holes = g["holes"]
        assert [h["offset"] for h in holes] == sorted(h["offset"] for h in holes)
        assert all(h["offset"] % 16 == 0 for h in holes)
        assert all(a["offset"] + a["bytes"] <= b["offset"] for a, b in zip(holes, holes[1:], strict=False))
        stored = m["files"][g["file"]]["bytes"]
        assert stored + sum(h["bytes"] for h in holes) == g["bytes"]
        assert stored < 8192  # the weights live in the backbone and task files only
        params = {h["param"]: h for h in holes if not h.get("head")}
        assert set(params) == set(Bundle.open(exported["cnn"]).graph.params)
        assert params["conv1.weight"]["layout"] == "ohwi" and params["fc1.weight"]["layout"] == "as-is"
        head = {h["param"]: h for h in holes if h.get("head")}
        assert head["head.bias"]["shape"] == [int(n)] and head["head.weight"]["shape"][0] == int(n)
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
    np.testing.assert_allclose(got, open_backend(be.bundle, "numpy").logits(x, 2), atol=ATOL)


# -- graphs built here ------------------------------------------------------------------
def _node(name, op, inputs, attrs=None):
    return Node(name, op, tuple(inputs), (name,), attrs or {})


def mobile_block() -> Graph:
    """Conv stem + BN + ReLU6, a depthwise conv (stride 2, asymmetric pads) + BN +
    hard-swish, a bias-less 1x1 conv and a residual add, ReLU6, global pool, flatten,
    linear."""
    c = 8
    bn = [("scale", "scale"), ("bias", "bias"), ("mean", "mean"), ("var", "var")]
    params = [Param("stem.weight", (c, 3, 3, 3), "weight"), Param("stem.bias", (c,), "bias"),
              *(Param(f"bn1.{k}", (c,), r) for k, r in bn),
              Param("dw.weight", (c, 1, 3, 3), "weight"), Param("dw.bias", (c,), "bias"),
              *(Param(f"bn2.{k}", (c,), r) for k, r in bn),
              Param("pw.weight", (c, c, 1, 1), "weight"),
              Param("fc.weight", (16, c), "weight"), Param("fc.bias", (16,), "bias")]
    nodes = [
        _node("stem", "Conv", ["x", "stem.weight", "stem.bias"], {"pads": [1, 1, 1, 1]}),
        _node("bn1", "BatchNormalization", ["stem", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"]),
        _node("relu6", "Clip", ["bn1"], {"min": 0.0, "max": 6.0}),
        _node("dw", "Conv", ["relu6", "dw.weight", "dw.bias"], {"strides": [2, 2], "pads": [0, 1, 1, 0],
                                                               "group": c}),
        _node("bn2", "BatchNormalization", ["dw", "bn2.scale", "bn2.bias", "bn2.mean", "bn2.var"]),
        _node("hswish", "HardSwish", ["bn2"]),
        _node("pw", "Conv", ["hswish", "pw.weight"]),
        _node("res", "Add", ["hswish", "pw"]),
        _node("clip", "Clip", ["res"], {"min": 0.0, "max": 6.0}),
        _node("gap", "GlobalAveragePool", ["clip"]),
        _node("flat", "Flatten", ["gap"]),
        _node("fc", "Linear", ["flat", "fc.weight", "fc.bias"]),
    ]
    return Graph([Value("x", (3, 9, 11))], params, nodes, "fc", name="mobile-block")


def transformer_block(t: int = 6, d: int = 16, heads: int = 2, vocab: int = 20) -> Graph:
    """Embedding (Gather) + position, pre-norm attention and GELU MLP with residuals
    (LayerNormalization composed of builtins), mean over tokens."""
    dh = d // heads
    params = [Param("emb", (vocab, d), "embedding"), Param("pos", (t, d), "const"),
              Param("ln1.scale", (d,), "scale"), Param("ln1.bias", (d,), "bias"),
              Param("att.scale", (1,), "const"),
              Param("ln2.scale", (d,), "scale"), Param("ln2.bias", (d,), "bias"),
              Param("ff1.weight", (2 * d, d), "weight"), Param("ff1.bias", (2 * d,), "bias"),
              Param("ff2.weight", (d, 2 * d), "weight"), Param("ff2.bias", (d,), "bias")]
    for n in "qkvo":
        params += [Param(f"{n}.weight", (d, d), "weight"), Param(f"{n}.bias", (d,), "bias")]
    nodes = [
        _node("embed", "Gather", ["emb", "ids"]),
        _node("h0", "Add", ["embed", "pos"]),
        _node("ln1", "LayerNormalization", ["h0", "ln1.scale", "ln1.bias"]),
        *(_node(n, "Linear", ["ln1", f"{n}.weight", f"{n}.bias"]) for n in "qkv"),
        *(_node(f"{n}h", "Reshape", [n], {"shape": [0, t, heads, dh]}) for n in "qkv"),
        _node("qt", "Transpose", ["qh"], {"perm": [0, 2, 1, 3]}),
        _node("kt", "Transpose", ["kh"], {"perm": [0, 2, 3, 1]}),
        _node("vt", "Transpose", ["vh"], {"perm": [0, 2, 1, 3]}),
        _node("scores", "MatMul", ["qt", "kt"]),
        _node("scaled", "Mul", ["scores", "att.scale"]),
        _node("probs", "Softmax", ["scaled"], {"axis": -1}),
        _node("ctx", "MatMul", ["probs", "vt"]),
        _node("ctx_t", "Transpose", ["ctx"], {"perm": [0, 2, 1, 3]}),
        _node("ctx_r", "Reshape", ["ctx_t"], {"shape": [0, t, d]}),
        _node("o", "Linear", ["ctx_r", "o.weight", "o.bias"]),
        _node("h1", "Add", ["h0", "o"]),
        _node("ln2", "LayerNormalization", ["h1", "ln2.scale", "ln2.bias"]),
        _node("ff1", "Linear", ["ln2", "ff1.weight", "ff1.bias"]),
        _node("gelu", "Gelu", ["ff1"]),
        _node("ff2", "Linear", ["gelu", "ff2.weight", "ff2.bias"]),
        _node("h2", "Add", ["h1", "ff2"]),
        _node("pool", "ReduceMean", ["h2"], {"axes": [1], "keepdims": 0}),
    ]
    return Graph([Value("ids", (t,), "int64")], params, nodes, "pool", name="transformer-block")


def other_ops() -> Graph:
    """The rest: grouped conv (rectangular kernel, dilation, asymmetric pads), sigmoid,
    tanh, hard-sigmoid, Sub/Div by constants, pools with ceil mode and pads (max, average
    with and without the pads counted), channel concat, softmax over channels and over
    height, clips that are not ReLU6, ReduceMean, BatchNormalization on [N, C], a
    bias-less linear, relu."""
    params = [Param("g.weight", (8, 2, 3, 2), "weight"), Param("g.bias", (8,), "bias"),
              Param("sub.c", (8, 1, 1), "const"), Param("div.c", (1, 8, 1, 1), "const"),
              Param("bn.scale", (24,), "scale"), Param("bn.bias", (24,), "bias"),
              Param("bn.mean", (24,), "mean"), Param("bn.var", (24,), "var"),
              Param("fc.weight", (12, 24), "weight")]
    pool = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}
    nodes = [
        _node("g", "Conv", ["x", "g.weight", "g.bias"],
              {"pads": [1, 0, 2, 1], "group": 2, "dilations": [1, 2]}),
        _node("sig", "Sigmoid", ["g"]),
        _node("sub", "Sub", ["sig", "sub.c"]),
        _node("div", "Div", ["sub", "div.c"]),
        _node("tanh", "Tanh", ["div"]),
        _node("hsig", "HardSigmoid", ["tanh"], {"alpha": 0.3, "beta": 0.4}),
        _node("mp", "MaxPool", ["hsig"], pool),
        _node("ap", "AveragePool", ["g"], {**pool, "count_include_pad": 1}),
        _node("ap0", "AveragePool", ["g"], {**pool, "count_include_pad": 0}),
        _node("cat", "Concat", ["mp", "ap", "ap0"], {"axis": 1}),
        _node("sm", "Softmax", ["cat"], {"axis": 1}),
        _node("sm2", "Softmax", ["cat"], {"axis": 2}),
        _node("mul", "Mul", ["sm", "sm2"]),
        _node("clip", "Clip", ["mul"], {"min": -0.5}),
        _node("clip2", "Clip", ["clip"], {"min": -1.0, "max": 1.0}),
        _node("rm", "ReduceMean", ["clip2"], {"axes": [2, 3], "keepdims": 0}),
        _node("bn", "BatchNormalization", ["rm", "bn.scale", "bn.bias", "bn.mean", "bn.var"]),
        _node("fc", "Linear", ["bn", "fc.weight"]),
        _node("relu", "Relu", ["fc"]),
    ]
    return Graph([Value("x", (4, 10, 9))], params, nodes, "relu", name="other-ops")


def _weights(graph: Graph, seed: int = 0, classes: int = 5):
    """Parameters at a realistic scale (1/sqrt(fan-in)), positive variances, and a head."""
    rng = np.random.default_rng(seed)
    params = {}
    for p in graph.params.values():
        fan_in = int(np.prod(p.shape[1:])) if p.role == "weight" else 1
        a = rng.standard_normal(p.shape).astype(np.float32) / np.float32(np.sqrt(fan_in))
        params[p.name] = np.abs(a) + np.float32(0.5) if p.role == "var" else a
    head = (rng.standard_normal((classes, graph.feature_dim)).astype(np.float32) / np.sqrt(graph.feature_dim),
            rng.standard_normal(classes).astype(np.float32))
    return params, head


def _tflite(content: bytes, x: np.ndarray) -> np.ndarray:
    interp = interpreter_class()(model_content=content, num_threads=1)
    inp = interp.get_input_details()[0]["index"]
    interp.resize_tensor_input(inp, list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp, x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


def _ops_of(graph: Graph) -> set[str]:
    names = {code: name for name, (code, _, _) in BUILTINS.items()}
    b = build_graph(graph, 5)
    return {names[b.opcodes[o["opcode"]]] for o in b.ops}


@pytest.mark.parametrize("make, ops", [
    (mobile_block, {"CONV_2D", "DEPTHWISE_CONV_2D", "PAD", "RELU6", "HARD_SWISH", "MEAN", "FULLY_CONNECTED"}),
    (transformer_block, {"GATHER", "BATCH_MATMUL", "SOFTMAX", "GELU", "SQRT", "TRANSPOSE", "RESHAPE"}),
    (other_ops, {"SPLIT", "CONCATENATION", "MAX_POOL_2D", "AVERAGE_POOL_2D", "PADV2", "LOGISTIC", "TANH",
                 "MAXIMUM", "MINIMUM", "RELU_N1_TO_1", "SUB", "DIV"}),
])
def test_graph_matches_numpy(make, ops):
    graph = make()
    assert ops <= _ops_of(graph)
    params, head = _weights(graph)
    template, entry = build_template(graph, 5)
    content = fill_template(template, entry, hole_tensors(entry, params, head))
    full, holes = serialize(build_graph(graph, 5), f"edgecl {graph.name} c5")
    assert holes == entry["holes"] and len(full) == len(content) == entry["bytes"]
    outside = bytearray(content)  # the filled template is the serialized model outside the holes
    for h in holes:
        outside[h["offset"]:h["offset"] + h["bytes"]] = full[h["offset"]:h["offset"] + h["bytes"]]
    assert bytes(outside) == full
    rng = np.random.default_rng(1)
    for n in (1, 5):
        if graph.input.dtype == "int64":
            x = rng.integers(0, graph.params["emb"].shape[0], (n, *graph.input_shape)).astype(np.int64)
        else:
            x = rng.standard_normal((n, *graph.input_shape)).astype(np.float32)
        want = executor.forward(graph, params, head, x)
        got = _tflite(content, x)
        assert got.shape == want.shape == (n, 5)
        assert np.abs(want).max() > 0.1  # the comparison is not of near-zero numbers
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{graph.name} n={n}")


def test_hole_layouts():
    w = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    assert np.array_equal(to_layout(w, {"layout": "ohwi"}), w.transpose(0, 2, 3, 1))
    assert np.array_equal(to_layout(w[:, :1], {"layout": "1hwo"}), w[:, :1].transpose(1, 2, 3, 0))
    assert np.array_equal(to_layout(w, {"layout": "ohwi", "rows": [1, 2]}), w[1:].transpose(0, 2, 3, 1))
    c = np.arange(3, dtype=np.float32).reshape(3, 1, 1)
    assert to_layout(c, {"layout": "nhwc"}).shape == (1, 1, 1, 3)
    # a template of format 1 (a layer table's): holes named by tensor, columns from (c, h, w)
    fc = np.arange(2 * 8, dtype=np.float32).reshape(2, 8)
    old = {"holes": [{"tensor": "fc1.weight", "layout": "oi-from-chw", "chw": [2, 2, 2]},
                     {"tensor": "head.bias", "layout": "o"}]}
    got = hole_tensors(old, {"fc1.weight": fc}, (np.zeros((1, 2), np.float32), np.ones(1, np.float32)))
    assert np.array_equal(got["fc1.weight"], fc.reshape(2, 2, 2, 2).transpose(0, 2, 3, 1).reshape(2, 8))
    assert np.array_equal(got["head.bias"], np.ones(1, np.float32))


def test_an_op_without_emission_names_the_node_and_leaves_the_backend_unavailable(bundle_copy, monkeypatch):
    monkeypatch.setattr(type(get_op("Relu")), "tflite", Op.tflite)
    with pytest.raises(TfliteUnsupported, match=r"node 'act' \(Relu\): Relu: no TFLite emission"):
        build_graph(_relu_graph(), 3)
    root = bundle_copy("supsup", "mlp")
    with pytest.raises(TfliteUnsupported, match=r"\(Relu\)"):
        export_bundle(root, strict=True)
    export_bundle(root)
    why = available(root)["tflite"]
    assert why is not None and "(Relu)" in why and "no TFLite emission" in why
    with pytest.raises(BackendUnavailable, match="no TFLite emission"):
        open_backend(root, "tflite")
    assert Bundle.open(root).manifest["exports"]["tflite"]["graphs"] == {}


def _relu_graph() -> Graph:
    return Graph([Value("x", (4,))], [Param("fc.weight", (3, 4), "weight")],
                 [_node("fc", "Linear", ["x", "fc.weight"]), _node("act", "Relu", ["fc"])], "act")


def test_tflite_backend_runs_without_torch_or_tvm(exported, tmp_path):
    """The device path: torch, tvm and flatbuffers blocked; only numpy and the interpreter."""
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
    np.testing.assert_allclose(np.asarray(json.loads(r.stdout), np.float32), want, atol=ATOL)
