"""The model graph and the op registry: validation errors name the node, every op's
numpy forward and backward agree with its PyTorch definition, ONNX emission runs in
ONNX Runtime to the same values, and the defects of the layer-table executor stay fixed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.runtime import executor
from edgecl.runtime.graph import Graph, GraphError, Node, Param, Value, from_layers
from edgecl.runtime.ops import OPS, get_op

R = np.random.default_rng(0)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


# (op, attrs, inputs): inputs are arrays; the ones that are parameters in real graphs are arrays too
CASES = [
    ("Conv", {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2], "group": 1},
     [f32(2, 4, 9, 8), f32(6, 4, 3, 2), f32(6)]),
    ("Conv", {"strides": [2, 2], "pads": [0, 0, 1, 1], "group": 6}, [f32(2, 6, 7, 7), f32(6, 1, 3, 3)]),
    ("Conv", {"group": 2, "pads": [1, 1, 1, 1]}, [f32(1, 4, 5, 5), f32(6, 2, 3, 3), f32(6)]),
    # 1x1 (a matmul on the input as it is; strided / padded: subsampled first)
    ("Conv", {}, [f32(2, 5, 6, 7), f32(8, 5, 1, 1), f32(8)]),
    ("Conv", {"strides": [2, 1], "pads": [1, 0, 0, 2]}, [f32(2, 5, 6, 7), f32(8, 5, 1, 1)]),
    # depthwise (the C kernels): stride 2, asymmetric pads, dilation; channel multiplier 3;
    # a narrow plane (the kernel's flat path); a rectangular kernel
    ("Conv", {"strides": [2, 2], "pads": [2, 1, 0, 3], "dilations": [2, 1], "group": 4},
     [f32(2, 4, 9, 8), f32(4, 1, 3, 3), f32(4)]),
    ("Conv", {"strides": [1, 2], "pads": [0, 1, 1, 0], "group": 4},
     [f32(2, 4, 9, 8), f32(12, 1, 3, 3), f32(12)]),
    ("Conv", {"pads": [1, 1, 1, 1], "group": 5}, [f32(3, 5, 3, 3), f32(5, 1, 3, 3)]),
    ("Conv", {"strides": [1, 2], "pads": [1, 0, 2, 1], "dilations": [1, 2], "group": 3},
     [f32(2, 3, 7, 9), f32(6, 1, 2, 3), f32(6)]),
    ("Linear", {}, [f32(3, 5), f32(4, 5), f32(4)]),
    ("Linear", {}, [f32(2, 3, 5), f32(4, 5)]),
    ("MatMul", {}, [f32(2, 3, 4, 5), f32(2, 3, 5, 6)]),
    ("Add", {}, [f32(2, 3, 4), f32(3, 1)]), ("Sub", {}, [f32(2, 3), f32(3)]),
    ("Mul", {}, [f32(2, 3, 4), f32(1, 3, 1)]), ("Div", {}, [f32(2, 3), np.abs(f32(3)) + 0.5]),
    ("Relu", {}, [f32(2, 7)]), ("Clip", {"min": 0.0, "max": 6.0}, [f32(2, 7) * 5]),
    ("Clip", {"min": -0.5}, [f32(3, 7)]), ("Clip", {"min": -1.0, "max": 0.25}, [f32(3, 7)]),
    ("HardSwish", {}, [f32(3, 9) * 4]), ("HardSigmoid", {}, [f32(3, 9) * 4]),
    ("Sigmoid", {}, [f32(3, 9) * 4]), ("Tanh", {}, [f32(3, 9)]),
    ("Gelu", {}, [f32(3, 9) * 3]), ("Gelu", {"approximate": "tanh"}, [f32(3, 9) * 3]),
    ("Softmax", {"axis": -1}, [f32(2, 3, 5)]), ("Softmax", {"axis": 1}, [f32(2, 3, 5)]),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, [f32(2, 3, 9, 9)]),
    ("MaxPool", {"kernel_shape": [2, 2], "ceil_mode": 1}, [f32(1, 2, 5, 5)]),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, [f32(2, 3, 9, 9)]),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 0},
     [f32(2, 3, 8, 8)]),
    ("GlobalAveragePool", {}, [f32(2, 3, 5, 4)]),
    ("ReduceMean", {"axes": [1], "keepdims": 0}, [f32(2, 5, 3)]),
    ("Flatten", {"axis": 1}, [f32(2, 3, 4, 5)]), ("Reshape", {"shape": [0, -1, 2]}, [f32(2, 3, 4)]),
    ("Transpose", {"perm": [0, 2, 1, 3]}, [f32(2, 3, 4, 5)]),
    ("Concat", {"axis": 1}, [f32(2, 3, 4), f32(2, 5, 4)]),
    ("BatchNormalization", {"epsilon": 1e-3},
     [f32(2, 3, 4, 4), f32(3), f32(3), f32(3), np.abs(f32(3)) + 0.1]),
    ("LayerNormalization", {"axis": -1, "epsilon": 1e-5}, [f32(2, 3, 8), f32(8), f32(8)]),
]


def _ids(c):
    return c[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_numpy_forward_and_backward_match_pytorch(case):
    name, attrs, xs = case
    op = get_op(name)
    a = op.check_attrs(attrs)
    ys = op.forward(xs, a)
    assert [tuple(y.shape) for y in ys] == [tuple(s) for s in op.infer([x.shape for x in xs], a)]
    grads = [True] * len(xs) if name != "BatchNormalization" else [True, True, True, False, False]
    ts = [torch.tensor(x, requires_grad=r) for x, r in zip(xs, grads, strict=True)]
    want = op.torch(ts, a)
    np.testing.assert_allclose(ys[0], want[0].detach().numpy(), rtol=1e-5, atol=1e-5)
    if not op.differentiable:
        return
    gy = f32(*ys[0].shape)
    want[0].backward(torch.tensor(gy))
    got = op.backward(xs, ys, [gy], a, grads)
    for i, (g, t) in enumerate(zip(got, ts, strict=True)):
        if not grads[i]:
            continue
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{name} input {i}")


def test_gather_forward_backward():
    op = get_op("Gather")
    table, idx = f32(10, 4), np.array([[1, 3, 3], [0, 9, 2]])
    y = op.forward([table, idx], {})[0]
    assert np.array_equal(y, table[idx])
    g = op.backward([table, idx], [y], [np.ones_like(y)], {}, [True, False])[0]
    assert g[3].tolist() == [2.0] * 4 and g[5].tolist() == [0.0] * 4


def test_every_registered_op_is_tested():
    assert {c[0] for c in CASES} | {"Gather", "KeepTopK"} == set(OPS)  # KeepTopK: tests/test_ops_topk.py


def _mini(nodes, params, features, shape=(4,)):
    return Graph([Value("x", shape)], params, nodes, features)


def test_unknown_op_names_the_node():
    with pytest.raises(GraphError, match=r"node 'odd' \(Cumsum\).*unsupported op 'Cumsum'"):
        _mini([Node("odd", "Cumsum", ("x",), ("y",))], [], "y")


def test_bad_graphs_are_refused_with_the_node():
    p = [Param("w", (3, 4), "weight")]
    with pytest.raises(GraphError, match="not a graph input"):
        _mini([Node("a", "Relu", ("later",), ("y",)), Node("b", "Relu", ("x",), ("later",))], [], "y")
    with pytest.raises(GraphError, match=r"node 'fc' \(Linear\).*does not fit"):
        _mini([Node("fc", "Linear", ("x", "w"), ("y",))], [Param("w", (3, 5), "weight")], "y")
    with pytest.raises(GraphError, match="unknown attribute"):
        _mini([Node("r", "Relu", ("x",), ("y",), {"alpha": 1})], [], "y")
    with pytest.raises(GraphError, match="must be \\[batch, dim\\]"):
        _mini([Node("fc", "Linear", ("x", "w"), ("y",))], p, "y", shape=(2, 4))
    with pytest.raises(GraphError, match="cannot be a parameter"):
        _mini([Node("r", "Relu", ("w",), ("y",))], p, "y")
    with pytest.raises(GraphError, match="duplicate node"):
        _mini([Node("r", "Relu", ("x",), ("y",)), Node("r", "Relu", ("y",), ("z",))], [], "z")


def test_relu_never_writes_into_the_callers_input():
    # flatten then relu: the old executor's in-place ReLU overwrote the caller's array
    g = from_layers([{"op": "flatten"}, {"op": "relu"}], (1, 2, 2))
    x = f32(3, 1, 2, 2)
    keep = x.copy()
    executor.features(g, {}, x)
    assert np.array_equal(x, keep)


def test_relu_gives_the_bytes_of_maximum_with_zero():
    """Relu (the C kernel, out of place and in place) keeps max(x, 0)'s bytes on every
    special value: -0.0 -> +0.0, NaN payloads and signs kept, infinities, subnormals; its backward is
    gy * (x > 0) (a NaN or inf gradient times 0 stays NaN), without touching its inputs."""
    special = np.array([-0.0, 0.0, np.nan, -np.nan, np.inf, -np.inf, 1e-45, -1e-45, 3.0, -2.0], np.float32)
    payloads = np.array([0x7FC00001, 0xFFC00123, 0x7F800001], np.uint32).view(np.float32)
    x = np.concatenate([np.tile(np.concatenate([special, payloads]), 50), f32(958)]).reshape(3, 8, -1)
    x.setflags(write=False)
    relu = get_op("Relu")
    (y,) = relu.forward([x], {})
    assert y.dtype == np.float32 and np.array_equal(y.view(np.uint32), np.maximum(x, 0).view(np.uint32))
    z = x.copy()
    (w,) = relu.forward_inplace([z], {})
    assert w is z and np.array_equal(w.view(np.uint32), y.view(np.uint32))
    gy = np.tile(np.array([np.inf, np.nan, -1.0, 2.0], np.float32), x.size // 4 + 1)
    gy = gy[: x.size].reshape(x.shape)
    (gx,) = relu.backward([x], [y], [gy], {}, [True])
    assert np.array_equal(gx.view(np.uint32), (gy * (x > 0)).view(np.uint32))


@pytest.mark.parametrize("shape", [(1, 5, 3, 2), (4, 5, 3, 2), (3, 5, 7), (2, 6, 1, 1)])
def test_conv_channel_bias_adds_as_broadcasting_does(shape):
    from edgecl.runtime.ops.nn import add_channel_bias

    y, b = f32(*shape), f32(shape[1])
    want = y + b.reshape(1, -1, *([1] * (len(shape) - 2)))
    add_channel_bias(y, b)
    assert np.array_equal(y, want)
    t = f32(shape[1], shape[0], *shape[2:]).swapaxes(0, 1)  # not contiguous: the broadcast path
    want = t + b.reshape(1, -1, *([1] * (len(shape) - 2)))
    add_channel_bias(t, b)
    assert np.array_equal(t, want)


def test_in_place_only_over_a_fresh_value_nothing_else_reads():
    """``Graph.inplace``: a Relu or Clip over the output of a Conv, Linear, Add or
    BatchNormalization that nothing else reads; never over a view (Flatten of the caller's
    input), an output its producer's backward reads (Sigmoid), a value with two readers,
    the graph input or the features."""
    p = [Param("w", (4, 4), "weight")]
    g = _mini([Node("fc", "Linear", ("x", "w"), ("h",)), Node("r", "Relu", ("h",), ("y",)),
               Node("s", "Sigmoid", ("y",), ("z",)), Node("r2", "Relu", ("z",), ("u",)),
               Node("a", "Add", ("u", "u"), ("v",)), Node("c", "Clip", ("v",), ("c1",), {"max": 6.0}),
               Node("fc2", "Linear", ("c1", "w"), ("k",)), Node("r3", "Relu", ("k",), ("m",)),
               Node("r4", "Relu", ("k",), ("n",)), Node("sum", "Add", ("m", "n"), ("o",)),
               Node("fc3", "Linear", ("o", "w"), ("f",)), Node("r5", "Relu", ("f",), ("q",)),
               Node("out", "Add", ("f", "q"), ("feat",))], p, "feat")
    assert g.inplace == {"r": "fc", "c": "a"}
    g = _mini([Node("flat", "Flatten", ("x",), ("f",)), Node("r", "Relu", ("f",), ("y",)),
               Node("fc", "Linear", ("y", "w"), ("h",)), Node("r2", "Relu", ("h",), ("feat",))], p, "feat")
    assert g.inplace == {"r2": "fc"}  # Relu on the features' producer is fine; the features is r2's output
    g = _mini([Node("fc", "Linear", ("x", "w"), ("h",)), Node("r", "Relu", ("h",), ("y",))], p, "h")
    assert g.inplace == {}  # h is the features (the head reads it)


def test_conv_and_clip_never_write_into_their_inputs():
    """Every Conv path (1x1, depthwise in C, im2col) and Clip, forward and backward: the
    inputs (which may be the caller's arrays or read-only weights) keep their bytes, and
    the results are fresh C-contiguous float32 arrays."""
    cases = [c for c in CASES if c[0] in ("Conv", "Clip")]
    for name, attrs, xs in cases:
        op = get_op(name)
        a = op.check_attrs(attrs)
        xs = [x.copy() for x in xs]
        for x in xs:
            x.setflags(write=False)
        ys = op.forward(xs, a)
        gy = f32(*ys[0].shape)
        gy.setflags(write=False)
        gs = op.backward(xs, ys, [gy], a, [True] * len(xs))
        for v in [*ys, *gs]:
            assert v.dtype == np.float32 and v.flags.c_contiguous and v.flags.writeable, (name, attrs)
            assert not any(np.shares_memory(v, x) for x in [*xs, gy]), (name, attrs)


def test_depthwise_conv_without_the_native_kernels_gives_the_same_bytes(monkeypatch):
    """EDGECL_KERNELS=numpy (the kernels' per-tap numpy twins): the forward and the input
    gradient are the same bytes as the C kernels', the weight gradient the same sums in
    another order."""
    import warnings

    cases = [c for c in CASES if c[0] == "Conv" and c[2][1].shape[1] == 1 and c[1].get("group", 1) > 1]
    assert len(cases) >= 4
    op = get_op("Conv")

    def run(xs, a):
        ys = op.forward(xs, a)
        return ys[0], op.backward(xs, ys, [np.ones_like(ys[0])], a, [True] * len(xs))

    for _, attrs, xs in cases:
        a = op.check_attrs(attrs)
        y, g = run(xs, a)
        with monkeypatch.context() as m, warnings.catch_warnings():
            m.setenv("EDGECL_KERNELS", "numpy")
            warnings.simplefilter("ignore", RuntimeWarning)
            y2, g2 = run(xs, a)
        assert y.tobytes() == y2.tobytes() and g[0].tobytes() == g2[0].tobytes()
        np.testing.assert_allclose(g[1], g2[1], rtol=1e-5, atol=1e-5)


def test_graph_round_trips_and_format_one_reads_as_graph():
    from edgecl.models.architectures import build

    for arch in ("mlp", "cnn"):
        g = build(arch, (1, 8, 8))
        assert Graph.from_dict(g.to_dict()) == g
        assert g.feature_dim in (256, 128)
    with pytest.raises(GraphError, match="version"):
        Graph.from_dict({**build("mlp", (1, 8, 8)).to_dict(), "version": 99})


def test_onnx_emission_of_every_op_runs_in_onnxruntime():
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from edgecl.compiler.onnx_export import build_model

    # one graph that uses most ops on the way to its features
    params = [Param("c1.w", (8, 3, 3, 3), "weight"), Param("c1.b", (8,), "bias"),
              Param("dw.w", (8, 1, 3, 3), "weight"), Param("bn.s", (8,), "scale"),
              Param("bn.b", (8,), "bias"),
              Param("bn.m", (8,), "mean"), Param("bn.v", (8,), "var"), Param("fc.w", (6, 16), "weight"),
              Param("ln.s", (6,), "scale"), Param("ln.b", (6,), "bias"), Param("k", (), "const")]
    nodes = [
        Node("c1", "Conv", ("x", "c1.w", "c1.b"), ("c1",), {"strides": [2, 2], "pads": [0, 0, 1, 1]}),
        Node("a1", "HardSwish", ("c1",), ("a1",)),
        Node("dw", "Conv", ("a1", "dw.w"), ("dw",), {"pads": [1, 1, 1, 1], "group": 8}),
        Node("bn", "BatchNormalization", ("dw", "bn.s", "bn.b", "bn.m", "bn.v"), ("bn",)),
        Node("r6", "Clip", ("bn",), ("r6",), {"min": 0.0, "max": 6.0}),
        Node("res", "Add", ("r6", "a1"), ("res",)),
        Node("mp", "MaxPool", ("res",), ("mp",), {"kernel_shape": [2, 2]}),
        Node("ap", "AveragePool", ("res",), ("ap",), {"kernel_shape": [2, 2]}),
        Node("cat", "Concat", ("mp", "ap"), ("cat",), {"axis": 1}),
        Node("gap", "GlobalAveragePool", ("cat",), ("gap",)),
        Node("fl", "Flatten", ("gap",), ("fl",)),
        Node("fc", "Linear", ("fl", "fc.w"), ("fc",)),
        Node("rs", "Reshape", ("fc",), ("rs",), {"shape": [0, 2, 3]}),
        Node("tr", "Transpose", ("rs",), ("tr",), {"perm": [0, 2, 1]}),
        Node("mm", "MatMul", ("rs", "tr"), ("mm",)),
        Node("sc", "Mul", ("mm", "k"), ("sc",)),
        Node("sm", "Softmax", ("sc",), ("sm",), {"axis": -1}),
        Node("av", "MatMul", ("sm", "rs"), ("av",)),
        Node("fl2", "Reshape", ("av",), ("fl2",), {"shape": [0, 6]}),
        Node("ln", "LayerNormalization", ("fl2", "ln.s", "ln.b"), ("ln",)),
        Node("ge", "Gelu", ("ln",), ("ge",)), Node("sg", "Sigmoid", ("ge",), ("sg",)),
        Node("th", "Tanh", ("sg",), ("th",)),
    ]
    g = Graph([Value("x", (3, 9, 9))], params, nodes, "th")
    w = {p.name: (np.abs(f32(*p.shape)) + 0.5 if p.role == "var" else f32(*p.shape))
         for p in params}
    head = (f32(3, 6), f32(3))
    x = f32(2, 3, 9, 9)
    want = executor.forward(g, w, head, x)
    m = build_model(g, 3)
    so = ort.SessionOptions()
    names = list(w) + ["head.weight", "head.bias"]
    keep = [ort.OrtValue.ortvalue_from_numpy(np.asarray(v, order="C"))
            for v in [*w.values(), *head]]
    so.add_external_initializers(names, keep)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size,k,stride,pad", [(1, 5, 1, 2), (2, 5, 1, 2), (3, 5, 2, 2), (1, 3, 2, 1),
                                               (4, 3, 1, 1), (1, 1, 2, 1), (2, 7, 2, 3)])
def test_conv_in_torch_drops_only_taps_that_read_padding(size, k, stride, pad):
    """On maps smaller than the kernel's reach (EfficientNet's 1x1 maps under 5x5 kernels)
    the torch Conv slices away the taps that read padding only: the output, the input's
    gradient and the weight's gradient equal an unsliced convolution's (the dropped taps'
    gradient is zero)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(size * 100 + k)
    x = torch.randn(2, 4, size, size + 1, generator=g, requires_grad=True)
    w = torch.randn(4, 1, k, k, generator=g, requires_grad=True)  # depthwise
    a = {"strides": [stride, stride], "pads": [pad, pad, pad + 1, pad], "dilations": [1, 1], "group": 4}
    y = get_op("Conv").torch([x, w], a)[0]
    ref = F.conv2d(F.pad(x, (pad, pad, pad, pad + 1)), w, None, stride, 0, 1, 4)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=g)
    got, want = torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(ref, (x, w), gy)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)
