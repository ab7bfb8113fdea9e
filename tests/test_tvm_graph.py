"""The TVM forward library is built from the model graph through the op registry and
matches the numpy reference executor: the MLP and CNN bundles (1e-5), a small conv net
with every kind of convolution and the pieces of MobileNet-like blocks (1e-4), and a
tiny transformer block (1e-4). TVM is part of the test setup (the ``tvm`` extra): these
tests fail, not skip, without it.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from edgecl.compiler import targets as tg
from edgecl.compiler import tvm_build
from edgecl.runtime import executor
from edgecl.runtime.backends import open_backend
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.graph import Graph, Node, Param, Value

HEAD_ROWS = 8
BATCHES = (1, 4)


def conv_net() -> Graph:
    """Asymmetric pads + stride, BatchNormalization, ReLU6, a dilated depthwise conv,
    HardSwish, a grouped 1x1 conv, a residual Add, Concat, Relu, a padded MaxPool,
    GlobalAveragePool, Flatten, Linear."""
    P = Param
    params = [P("c0.weight", (8, 3, 3, 3), "weight"), P("c0.bias", (8,), "bias"),
              P("bn.scale", (8,), "scale"), P("bn.bias", (8,), "bias"), P("bn.mean", (8,), "mean"),
              P("bn.var", (8,), "var"),
              P("dw.weight", (8, 1, 3, 3), "weight"),
              P("g.weight", (8, 4, 1, 1), "weight"), P("g.bias", (8,), "bias"),
              P("pw.weight", (6, 8, 1, 1), "weight"),
              P("fc.weight", (10, 14), "weight"), P("fc.bias", (10,), "bias")]
    nodes = [
        Node("c0", "Conv", ("x", "c0.weight", "c0.bias"), ("c0",), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
        Node("bn", "BatchNormalization", ("c0", "bn.scale", "bn.bias", "bn.mean", "bn.var"), ("bn",)),
        Node("r6", "Clip", ("bn",), ("r6",), {"min": 0.0, "max": 6.0}),
        Node("dw", "Conv", ("r6", "dw.weight"), ("dw",),
             {"group": 8, "pads": [2, 2, 2, 2], "dilations": [2, 2]}),
        Node("hs", "HardSwish", ("dw",), ("hs",)),
        Node("g", "Conv", ("hs", "g.weight", "g.bias"), ("g",), {"group": 2}),
        Node("res", "Add", ("g", "r6"), ("res",)),
        Node("pw", "Conv", ("res", "pw.weight"), ("pw",)),
        Node("cat", "Concat", ("res", "pw"), ("cat",), {"axis": 1}),
        Node("relu", "Relu", ("cat",), ("relu",)),
        Node("mp", "MaxPool", ("relu",), ("mp",), {"kernel_shape": [3, 3], "strides": [2, 2],
                                                   "pads": [1, 1, 1, 1]}),
        Node("gap", "GlobalAveragePool", ("mp",), ("gap",)),
        Node("flat", "Flatten", ("gap",), ("flat",)),
        Node("fc", "Linear", ("flat", "fc.weight", "fc.bias"), ("fc",)),
    ]
    return Graph([Value("x", (3, 9, 11))], params, nodes, "fc", name="convnet")


def transformer_block() -> Graph:
    """One pre-pooling encoder block on [6, 16] inputs: Linear on 3-D values, 2 heads
    (Reshape, Transpose, MatMul, Mul by a constant, Softmax), a residual Add,
    LayerNormalization (with and without bias), Gelu, ReduceMean."""
    P = Param
    d, s, h = 16, 6, 2
    params = []
    for n in ("q", "k", "v", "o"):
        params += [P(f"{n}.weight", (d, d), "weight"), P(f"{n}.bias", (d,), "bias")]
    params += [P("scale", (1,), "const"), P("ln1.scale", (d,), "scale"), P("ln1.bias", (d,), "bias"),
               P("ff1.weight", (2 * d, d), "weight"), P("ff1.bias", (2 * d,), "bias"),
               P("ff2.weight", (d, 2 * d), "weight"), P("ff2.bias", (d,), "bias"),
               P("ln2.scale", (d,), "scale")]
    heads = [0, s, h, d // h]
    nodes = [Node(n, "Linear", ("x", f"{n}.weight", f"{n}.bias"), (n,)) for n in ("q", "k", "v")]
    nodes += [
        Node("qh", "Reshape", ("q",), ("qh",), {"shape": heads}),
        Node("qt", "Transpose", ("qh",), ("qt",), {"perm": [0, 2, 1, 3]}),
        Node("kh", "Reshape", ("k",), ("kh",), {"shape": heads}),
        Node("kt", "Transpose", ("kh",), ("kt",), {"perm": [0, 2, 3, 1]}),
        Node("vh", "Reshape", ("v",), ("vh",), {"shape": heads}),
        Node("vt", "Transpose", ("vh",), ("vt",), {"perm": [0, 2, 1, 3]}),
        Node("s", "MatMul", ("qt", "kt"), ("s",)),
        Node("ss", "Mul", ("s", "scale"), ("ss",)),
        Node("p", "Softmax", ("ss",), ("p",), {"axis": -1}),
        Node("a", "MatMul", ("p", "vt"), ("a",)),
        Node("at", "Transpose", ("a",), ("at",), {"perm": [0, 2, 1, 3]}),
        Node("am", "Reshape", ("at",), ("am",), {"shape": [0, s, d]}),
        Node("o", "Linear", ("am", "o.weight", "o.bias"), ("o",)),
        Node("r1", "Add", ("o", "x"), ("r1",)),
        Node("ln1", "LayerNormalization", ("r1", "ln1.scale", "ln1.bias"), ("ln1",)),
        Node("ff1", "Linear", ("ln1", "ff1.weight", "ff1.bias"), ("ff1",)),
        Node("gelu", "Gelu", ("ff1",), ("gelu",)),
        Node("ff2", "Linear", ("gelu", "ff2.weight", "ff2.bias"), ("ff2",)),
        Node("r2", "Add", ("ff2", "ln1"), ("r2",)),
        Node("ln2", "LayerNormalization", ("r2", "ln2.scale"), ("ln2",)),
        Node("pool", "ReduceMean", ("ln2",), ("pool",), {"axes": [1], "keepdims": 0}),
    ]
    return Graph([Value("x", (s, d))], params, nodes, "pool", name="block")


def pools() -> Graph:
    """MaxPool and AveragePool with asymmetric pads, ceil mode (a last window that starts
    in the padding included), with and without the padding counted, Sigmoid, Tanh."""
    pool = [("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
            ("MaxPool", {"kernel_shape": [2, 3], "strides": [2, 1], "pads": [1, 0, 0, 1]}),
            ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
            ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                             "count_include_pad": 0}),
            ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1],
                             "ceil_mode": 1})]
    nodes = [Node("c", "Conv", ("x", "c.weight", "c.bias"), ("c",)), Node("t", "Tanh", ("c",), ("t",))]
    for i, (op, attrs) in enumerate(pool):
        nodes += [Node(f"p{i}", op, ("t",), (f"p{i}",), attrs),
                  Node(f"f{i}", "Flatten", (f"p{i}",), (f"f{i}",))]
    nodes += [Node("cat", "Concat", tuple(f"f{i}" for i in range(len(pool))), ("cat",), {"axis": 1}),
              Node("s", "Sigmoid", ("cat",), ("s",))]
    params = [Param("c.weight", (4, 4, 1, 1), "weight"), Param("c.bias", (4,), "bias")]
    return Graph([Value("x", (4, 7, 8))], params, nodes, "s", name="pools")


def random_params(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in graph.params.items():
        if p.role == "var":
            a = rng.uniform(0.5, 2.0, p.shape)
        elif p.role == "scale":
            a = rng.uniform(0.5, 1.5, p.shape)
        elif p.role == "const":
            a = np.full(p.shape, 0.35)
        else:
            fan_in = int(np.prod(p.shape[1:])) if len(p.shape) > 1 else 4
            a = rng.standard_normal(p.shape) / np.sqrt(fan_in)
        out[name] = a.astype(np.float32)
    return out


def random_head(graph: Graph, classes: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((classes, graph.feature_dim), dtype=np.float32),
            rng.standard_normal(classes, dtype=np.float32))


def run_vm(ex, graph: Graph, params, head, x: np.ndarray) -> np.ndarray:
    """The compiled library's logits through the Relax VM (the host's TVM; the bundle
    path below loads through the runtime only)."""
    import tvm

    vm = tvm_build._vm(ex)
    hw = np.zeros((HEAD_ROWS, graph.feature_dim), np.float32)
    hb = np.zeros(HEAD_ROWS, np.float32)
    hw[: len(head[0])], hb[: len(head[1])] = head
    arrays = {**params, "head.weight": hw, "head.bias": hb}
    layout = tvm_build.layout_entry(graph, HEAD_ROWS, BATCHES)
    weights = vm[layout["transform"]]([tvm.runtime.tensor(arrays[n]) for n in layout["params"]])
    out = vm[layout["functions"][str(len(x))]](tvm.runtime.tensor(x), *weights)
    return out.numpy()[:, : len(head[0])]


SMALL = {"convnet": conv_net, "block": transformer_block, "pools": pools}


@pytest.fixture(scope="module", params=list(SMALL))
def small(request):
    graph = SMALL[request.param]()
    ex = tvm_build.build_executable(graph, tg.cpu_target("host"), HEAD_ROWS, BATCHES,
                                    tg.default_schedule("host", tg.cpu_target("host")))
    return graph, ex


def test_small_graphs_match_numpy(small):
    graph, ex = small
    params, head = random_params(graph), random_head(graph)
    for b in BATCHES:
        x = np.random.default_rng(b).standard_normal((b, *graph.input_shape)).astype(np.float32)
        want = executor.forward(graph, params, head, x)
        got = run_vm(ex, graph, params, head, x)
        assert np.abs(want).max() > 1e-2  # not a degenerate net
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{graph.name} b={b}")


def test_weight_transforms_are_lifted_and_scheduled():
    """Weight-only work (transposes, HWIO kernels, BatchNormalization's scale and shift)
    runs in transform_params, once per activation; the forward's convolutions and
    matmuls are register-tiled."""
    import tvm
    from tvm import relax, tirx

    graph = conv_net()
    sched = tg.default_schedule("host", tg.cpu_target("host"))
    mod = tvm_build.lower_cpu(tvm_build.build_relax(graph, (1,), HEAD_ROWS), tg.cpu_target("host"), sched)
    names = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, relax.Function)]
    assert sorted(names) == ["forward_b1", tvm_build.TRANSFORM]
    fwd = mod["forward_b1"]
    assert fwd.attrs["num_input"] == 1
    called = {c.args[0].name_hint for c in _calls(fwd) if c.op.name == "relax.call_tir"}
    # BatchNormalization's scale (a sqrt): per activation, not per call
    assert not any("sqrt" in n for n in called), called
    assert any("sqrt" in c.args[0].name_hint for c in _calls(mod[tvm_build.TRANSFORM])
               if c.op.name == "relax.call_tir")
    tiled = [gv.name_hint for gv, f in mod.functions.items()
             if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint and "_local" in f.script()]
    assert len(tiled) >= 4, tiled
    assert isinstance(mod, tvm.IRModule)


def _calls(func):
    from tvm import relax

    out = []
    relax.analysis.post_order_visit(func.body, lambda e: out.append(e) if isinstance(e, relax.Call) else None)
    return out


@pytest.fixture(scope="module")
def bundles(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-bundles")
    out = {}
    for arch, method in (("mlp", "supsup"), ("cnn", "hat")):
        dst = root / arch
        shutil.copytree(trained(method, arch)[1], dst)
        tvm_build.compile_bundle(dst, "host", log=lambda _m: None, train=False)
        out[arch] = dst
    return out


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_bundle_forward_matches_numpy_to_1e5(bundles, arch):
    bundle = Bundle.open(bundles[arch])
    entry = bundle.manifest["targets"]["host"]
    assert entry["layout"]["kind"] == "relax-vm"
    assert entry["layout"]["params"] == [*tvm_build.backbone_params(bundle.graph), "head.weight", "head.bias"]
    be, ref = open_backend(bundle, "tvm"), open_backend(bundle, "numpy")
    for task in bundle.task_names:
        for n in (1, 5, 32, 40):
            x = np.random.default_rng(n).random((n, *bundle.graph.input_shape), dtype=np.float32)
            np.testing.assert_allclose(be.logits(x, task), ref.logits(x, task), rtol=0, atol=1e-5,
                                       err_msg=f"{arch} {task} n={n}")


def test_library_of_an_older_build_is_refused(bundles, tmp_path):
    from edgecl.runtime.backends import available
    from edgecl.runtime.bundle_write import commit_files

    dst = tmp_path / "b"
    shutil.copytree(bundles["mlp"], dst)

    def update(manifest):
        manifest["targets"]["host"]["layout"] = {"vec": 16, "head_rows": 8, "batches": [1, 8, 32]}

    commit_files(dst, {}, update)
    assert "compile the bundle again" in available(dst)["tvm"]


def test_cross_compiled_graph_library_is_aarch64(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ missing: run scripts/install_toolchains.sh")
    graph = conv_net()
    target = tg.cpu_target("rpi4")
    ex = tvm_build.build_executable(graph, target, HEAD_ROWS, (1,), tg.default_schedule("rpi4", target))
    path = tmp_path / "rpi4.so"
    path.write_bytes(tvm_build.export_bytes(ex, "rpi4"))
    desc = subprocess.run(["file", "-b", str(path)], capture_output=True, text=True).stdout
    assert "ARM aarch64" in desc and "shared object" in desc, desc
