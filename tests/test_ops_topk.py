"""KeepTopK (the top-k selection of MoE gating): numpy forward and backward against its
PyTorch definition, the ONNX emission through ONNX Runtime, ties, bad k, and the
backends that cannot emit it saying so by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.runtime.graph import Graph, GraphError, Node, Value
from edgecl.runtime.ops import OPS, get_op


def f32(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CASES = [({"k": 2}, f32(4, 6)), ({"k": 1}, f32(3, 5)), ({"k": 5}, f32(3, 5)), ({"k": 3}, f32(2, 3, 7))]


def test_registered():
    assert isinstance(OPS["KeepTopK"], type(get_op("KeepTopK")))


@pytest.mark.parametrize("case", CASES, ids=[f"k{c[0]['k']}-{c[1].shape}" for c in CASES])
def test_numpy_forward_and_backward_match_pytorch(case):
    attrs, x = case
    op = get_op("KeepTopK")
    a = op.check_attrs(attrs)
    y = op.forward([x], a)[0]
    assert y.shape == op.infer([x.shape], a)[0] == x.shape
    # exactly k kept per row (no ties in random data), the k largest, unchanged; the rest -inf
    kept = np.isfinite(y)
    assert (kept.sum(axis=-1) == a["k"]).all()
    assert np.array_equal(y[kept], x[kept])
    k = a["k"]
    assert (np.sort(x, axis=-1)[..., -k:] == np.sort(np.where(kept, x, -np.inf), axis=-1)[..., -k:]).all()
    assert (y[~kept] == -np.inf).all()
    xt = torch.tensor(x, requires_grad=True)
    want = op.torch([xt], a)[0]
    assert np.array_equal(y, want.detach().numpy())
    gy = f32(*x.shape, seed=1)
    torch.where(torch.isfinite(want), want, torch.zeros_like(want)).backward(torch.tensor(gy))
    got = op.backward([x], [y], [gy], a, [True])[0]
    np.testing.assert_array_equal(got, xt.grad.numpy())
    assert (got[~kept] == 0).all()


def test_softmax_after_it_gives_unchosen_experts_exactly_zero():
    x = f32(8, 6)
    y = get_op("KeepTopK").forward([x], {"k": 2})[0]
    g = get_op("Softmax").forward([y], {"axis": -1})[0]
    assert ((g > 0).sum(axis=1) == 2).all() and (g[~np.isfinite(y)] == 0.0).all()
    np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-6)


def test_ties_at_the_kth_value_are_all_kept():
    x = np.array([[3.0, 1.0, 1.0, 0.0]], np.float32)
    y = get_op("KeepTopK").forward([x], {"k": 2})[0]
    assert y.tolist() == [[3.0, 1.0, 1.0, -np.inf]]
    assert np.array_equal(get_op("KeepTopK").torch([torch.tensor(x)], {"k": 2})[0].numpy(), y)


def test_bad_k_names_the_node():
    with pytest.raises(GraphError, match=r"node 'top' \(KeepTopK\).*k=7 must lie in 1..6"):
        Graph([Value("x", (6,))], [], [Node("top", "KeepTopK", ("x",), ("y",), {"k": 7})], "y").shapes()
    with pytest.raises(GraphError, match=r"KeepTopK: attribute 'k' is required"):
        Graph([Value("x", (6,))], [], [Node("top", "KeepTopK", ("x",), ("y",))], "y")


def test_onnx_emission_runs_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from edgecl.compiler.onnx_export import IR_VERSION, OPSET, OnnxBuilder

    x = f32(5, 6)
    x[0, 1] = x[0, 4] = 9.0  # a tie at the top: both kept, as in numpy
    b = OnnxBuilder({"x": x.shape})
    get_op("KeepTopK").onnx(b, ["x"], ["y"], {"k": 3})
    g = helper.make_graph(b.nodes, "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], b.consts)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR_VERSION
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    assert np.array_equal(got, get_op("KeepTopK").forward([x], {"k": 3})[0])


def test_tvm_and_tflite_refuse_by_name():
    op = get_op("KeepTopK")
    with pytest.raises(NotImplementedError, match="KeepTopK: no TVM emission"):
        op.tvm(None, [], {"k": 1}, [])
    with pytest.raises(NotImplementedError, match="KeepTopK: no TFLite emission"):
        op.tflite(None, [], [], {"k": 1}, [])
