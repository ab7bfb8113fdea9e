"""On-device learning (edgecl.runtime.learn): a new task learned in numpy + the C kernels on
any model graph, zero forgetting checked on canaries, RAM and energy budgets, resume,
torch blocked."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import Runtime, executor
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_format import MANIFEST, VERSIONS_DIR, parse_manifest
from edgecl.runtime.bundle_write import gc
from edgecl.runtime.evaluate import evaluate
from edgecl.runtime.executor import Tape
from edgecl.runtime.graph import Graph, Node, Param, Value
from edgecl.runtime.learn import ForgettingError, LearnError, RamBudgetError, energy, learn, planner
from edgecl.runtime.learn import learner as L
from edgecl.runtime.learn import train_numpy as T

from .device_process import run_on_device

TICK = {"kind": "model", "watts": 1.0, "tick_s": 0.1}  # 0.1 J per meter read: deterministic


def _prefix_bundle(src: Path, dst: Path, n: int, digits) -> Path:
    """The bundle a host run of the first ``n`` tasks gives (``edgecl bundle``): version n
    of a longer bundle (its first n tasks and their routers), made current."""
    shutil.copytree(src, dst)
    raw = (dst / VERSIONS_DIR / f"{n:06d}.json").read_bytes()
    manifest = parse_manifest(raw, dst / MANIFEST)
    assert len(manifest["tasks"]) == n
    (dst / MANIFEST).write_bytes(raw)
    for p in (dst / VERSIONS_DIR).glob("*.json"):
        if int(p.stem) > n:
            p.unlink()
    gc(dst, keep=n)  # the later versions' files go
    return dst


@pytest.fixture
def four(trained, digits, tmp_path):
    def get(method: str) -> Path:
        return _prefix_bundle(trained(method)[1], tmp_path / f"b4-{method}", 4, digits)
    return get


def _samples(tmp_path: Path, task) -> Path:
    path = tmp_path / "samples.npz"
    np.savez(path, x=task.x_train, y=np.asarray(task.classes)[task.y_train])
    return path


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _logits_bytes(rt: Runtime, digits, names) -> dict[str, bytes]:
    return {n: rt.logits(digits.tasks[i].x_test.reshape(-1, 64), n).tobytes()
            for i, n in enumerate(names)}


# ------------------------------------------------------------------ the math
def _mobile_graph(size: int = 8) -> Graph:
    """Depthwise conv (asymmetric pads, stride 2) + BatchNormalization + residual Add +
    GlobalAveragePool + Flatten + Linear, after a plain conv with ReLU6; ``size`` x
    ``size`` inputs."""
    P = [Param("conv1.weight", (8, 3, 3, 3), "weight"), Param("conv1.bias", (8,), "bias"),
         Param("dw.weight", (8, 1, 3, 3), "weight"), Param("dw.bias", (8,), "bias"),
         Param("bn.scale", (8,), "scale"), Param("bn.bias", (8,), "bias"),
         Param("bn.mean", (8,), "mean"), Param("bn.var", (8,), "var"),
         Param("pw.weight", (8, 8, 1, 1), "weight"),
         Param("fc.weight", (16, 8), "weight"), Param("fc.bias", (16,), "bias")]
    N = [Node("conv1", "Conv", ("x", "conv1.weight", "conv1.bias"), ("c1",),
              {"strides": [1, 1], "pads": [1, 1, 1, 1]}),
         Node("relu6", "Clip", ("c1",), ("r1",), {"min": 0.0, "max": 6.0}),
         Node("dw", "Conv", ("r1", "dw.weight", "dw.bias"), ("d",),
              {"strides": [2, 2], "pads": [0, 0, 1, 1], "group": 8}),
         Node("bn", "BatchNormalization", ("d", "bn.scale", "bn.bias", "bn.mean", "bn.var"), ("b",)),
         Node("relu", "Relu", ("b",), ("r2",)),
         Node("pw", "Conv", ("r2", "pw.weight"), ("p",)),
         Node("res", "Add", ("p", "r2"), ("s",)),
         Node("gap", "GlobalAveragePool", ("s",), ("g",)),
         Node("flat", "Flatten", ("g",), ("f",)),
         Node("fc", "Linear", ("f", "fc.weight", "fc.bias"), ("h",)),
         Node("hs", "HardSwish", ("h",), ("out",))]
    return Graph([Value("x", (3, size, size))], P, N, "out", name="mobile")


def _transformer_graph() -> Graph:
    """One pre-norm transformer block, 2 heads: Linear, MatMul, Softmax,
    LayerNormalization, Gelu, Transpose, Reshape, Mul by a constant, residual Adds."""
    T, D, H = 4, 8, 2
    dh = D // H
    P = [Param("ln1.scale", (D,), "scale"), Param("ln1.bias", (D,), "bias"),
         *[Param(f"{n}.{r}", (D, D) if r == "weight" else (D,), r)
           for n in ("q", "k", "v", "proj") for r in ("weight", "bias")],
         Param("attn.scale", (), "const"),
         Param("ln2.scale", (D,), "scale"), Param("ln2.bias", (D,), "bias"),
         Param("ff1.weight", (16, D), "weight"), Param("ff1.bias", (16,), "bias"),
         Param("ff2.weight", (D, 16), "weight"), Param("ff2.bias", (D,), "bias")]
    N = [Node("ln1", "LayerNormalization", ("x", "ln1.scale", "ln1.bias"), ("n1",))]
    for n in ("q", "k", "v"):
        N.append(Node(n, "Linear", ("n1", f"{n}.weight", f"{n}.bias"), (n,)))
        N.append(Node(f"{n}_split", "Reshape", (n,), (f"{n}s",), {"shape": [0, T, H, dh]}))
    N += [Node("q_t", "Transpose", ("qs",), ("qh",), {"perm": [0, 2, 1, 3]}),
          Node("k_t", "Transpose", ("ks",), ("kh",), {"perm": [0, 2, 3, 1]}),
          Node("v_t", "Transpose", ("vs",), ("vh",), {"perm": [0, 2, 1, 3]}),
          Node("scores", "MatMul", ("qh", "kh"), ("sc",)),
          Node("scale", "Mul", ("sc", "attn.scale"), ("scs",)),
          Node("softmax", "Softmax", ("scs",), ("att",), {"axis": -1}),
          Node("context", "MatMul", ("att", "vh"), ("ctx",)),
          Node("merge_t", "Transpose", ("ctx",), ("ctt",), {"perm": [0, 2, 1, 3]}),
          Node("merge", "Reshape", ("ctt",), ("cm",), {"shape": [0, T, D]}),
          Node("proj", "Linear", ("cm", "proj.weight", "proj.bias"), ("pr",)),
          Node("res1", "Add", ("x", "pr"), ("r1",)),
          Node("ln2", "LayerNormalization", ("r1", "ln2.scale", "ln2.bias"), ("n2",)),
          Node("ff1", "Linear", ("n2", "ff1.weight", "ff1.bias"), ("f1",)),
          Node("gelu", "Gelu", ("f1",), ("f1g",)),
          Node("ff2", "Linear", ("f1g", "ff2.weight", "ff2.bias"), ("f2",)),
          Node("res2", "Add", ("r1", "f2"), ("r2",)),
          Node("flat", "Reshape", ("r2",), ("out",), {"shape": [0, -1]})]
    return Graph([Value("x", (T, D))], P, N, "out", name="block")


def _graph(kind: str) -> Graph:
    from edgecl.models import architectures

    if kind in ("mlp", "cnn"):
        return architectures.build(kind, (1, 8, 8))
    if kind == "mobile128":  # large inputs: the learner runs the frozen prefix in chunks
        return _mobile_graph(128)
    return _mobile_graph() if kind == "mobile" else _transformer_graph()


def _params(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for p in graph.params.values():
        if p.role == "var":
            out[p.name] = rng.uniform(0.5, 1.5, p.shape).astype(np.float32)
        elif p.role == "const":
            out[p.name] = np.full(p.shape, 0.5, np.float32)
        else:
            scale = 0.3 if p.role in ("weight", "embedding") else 0.1
            base = 1.0 if p.role == "scale" else 0.0
            out[p.name] = (base + rng.standard_normal(p.shape) * scale).astype(np.float32)
    return out


def _close(got: np.ndarray, ref: np.ndarray, what: str, rel: float = 1e-5, floor: float = 1e-6) -> None:
    """Agreement to ``rel`` relative to the tensor's largest entry, plus ``floor`` for
    gradients that are zero in exact arithmetic (a key bias under softmax: float32 noise)."""
    assert got.shape == ref.shape, what
    scale = float(np.abs(ref).max())
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= rel * scale + floor, f"{what}: error {err:.2e} on a scale of {scale:.2e}"


GRAPHS = ["mlp", "cnn", "mobile", "transformer"]


@pytest.mark.parametrize("kind", GRAPHS)
def test_executor_backward_matches_torch_autograd(kind):
    """Every trainable parameter's gradient (weights, biases, BN and LN scales, the
    constant) through the registry's numpy backward equals torch autograd's."""
    torch = pytest.importorskip("torch")
    from edgecl.models.torchnet import features

    graph = _graph(kind)
    params = _params(graph)
    rng = np.random.default_rng(1)
    x = rng.random((6, *graph.input_shape), dtype=np.float32)
    wanted = {n for n, p in graph.params.items() if p.role not in ("mean", "var")}
    tape = Tape(nodes=graph.backbone_nodes)
    feats = executor.features(graph, params, x, tape=tape)
    g_feats = rng.standard_normal(feats.shape).astype(np.float32)
    got = executor.backward(graph, params, tape, g_feats, wanted)

    tp = {n: torch.tensor(a, requires_grad=n in wanted) for n, a in params.items()}
    tf = features(graph, tp, torch.tensor(x))
    (tf * torch.tensor(g_feats)).sum().backward()
    _close(feats, tf.detach().numpy(), "features")
    assert set(got) == wanted
    for n in sorted(wanted):
        _close(got[n], tp[n].grad.numpy(), n)


@pytest.mark.parametrize("kind", GRAPHS)
def test_training_step_gradients_match_torch_with_a_frozen_prefix(kind):
    """The learner's step math (:func:`train_numpy.grads`: forward with a tape, head,
    cross-entropy, backward) against torch for the masked weights; training only the
    last site gives that site the same gradient, keeps no value of the frozen prefix
    but what the backward reads, and forms no gradient for the prefix."""
    torch = pytest.importorskip("torch")
    from edgecl.models.torchnet import features

    graph = _graph(kind)
    params = _params(graph, 2)
    rng = np.random.default_rng(3)
    x = rng.random((6, *graph.input_shape), dtype=np.float32)
    y = np.array([0, 1, 2, 1, 0, 2])
    head = (rng.standard_normal((3, graph.feature_dim)).astype(np.float32) * 0.1,
            rng.standard_normal(3).astype(np.float32) * 0.1)
    sites = graph.mask_sites()
    weights = {s.weight for s in sites}
    loss, gw, ghw, ghb = T.grads(graph, params, head, x, y, weights)

    tp = {n: torch.tensor(a, requires_grad=n in weights) for n, a in params.items()}
    th = [torch.tensor(a, requires_grad=True) for a in head]
    out = torch.nn.functional.linear(features(graph, tp, torch.tensor(x)), *th)
    tl = torch.nn.functional.cross_entropy(out, torch.tensor(y))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-5
    assert set(gw) == weights
    for n in weights:
        _close(gw[n], tp[n].grad.numpy(), n)
    _close(ghw, th[0].grad.numpy(), "head.weight")
    _close(ghb, th[1].grad.numpy(), "head.bias")

    last = sites[-1].weight
    loss1, gw1, ghw1, _ = T.grads(graph, params, head, x, y, {last})
    assert loss1 == loss and set(gw1) == {last}
    np.testing.assert_array_equal(gw1[last], gw[last])
    np.testing.assert_array_equal(ghw1, ghw)
    _, tape = T.tape_forward(graph, params, x, {last})
    upstream = {o for n in graph.backbone_nodes for o in n.outputs}
    assert set(tape.values) <= T.kept_values(graph, {last}) | {graph.features}
    assert len(set(tape.values) & upstream) < len(upstream)  # the prefix's values were freed


def _cache_run(graph, backbone, method, k, prefix_cache, n=37, bs=8, epochs=2):
    """A learning run of ``epochs`` on random data (a ragged last batch), then two steps on
    batches drawn with replacement; returns the problem and the state's arrays."""
    from edgecl.runtime.learn import trainer

    rng = np.random.default_rng(7)
    x, y = rng.random((n, *graph.input_shape), dtype=np.float32), rng.integers(0, 3, n)
    owned = {s.weight: rng.random(int(np.prod(s.shape))) < 0.3 for s in graph.mask_sites()}
    hp = dict(trainer.DEFAULTS[method], epochs=epochs, retrain_epochs=1)
    p = trainer.Problem(graph, backbone, owned if method == "packnet" else {}, x, y, 3, method, hp, bs, 0,
                        train_last=k, prefix_cache=prefix_cache)
    s = p.initial()
    trainer.run(p, s, trainer.numpy_step, out_of_energy=lambda: False)
    for _ in range(2):
        trainer.numpy_step(p, s, rng.integers(0, n, bs))
    return p, s.arrays


@pytest.mark.parametrize("kind", ["cnn", "mobile", "mobile128", "transformer"])
@pytest.mark.parametrize("method", ["supsup", "packnet"])
def test_prefix_cache_takes_the_same_steps_byte_for_byte(kind, method):
    """With the sites before the last K frozen, the values where the trained part starts
    are computed once per sample and every step starts there: every array of the state
    (scores or weights, head, Adam moments) ends the same bytes as when each step runs
    the whole forward, over epochs, a ragged last batch and batches with repeats."""
    graph = _graph(kind)
    backbone = _params(graph, 5)
    for k in (1, 2):
        p, cached = _cache_run(graph, backbone, method, k, True)
        q, plain = _cache_run(graph, backbone, method, k, False)
        assert (p.chunk < p.bs) == (kind == "mobile128"), (kind, p.chunk)
        c = T.cut(graph, p.wanted)
        assert c.cached(graph) and p._starts.keys() == set(c.cached(graph)) and not q._starts
        assert {v: a.shape[0] for v, a in p._starts.items()} == {v: 37 for v in c.cached(graph)}
        assert cached.keys() == plain.keys()
        for key in cached:
            assert cached[key].tobytes() == plain[key].tobytes(), (kind, method, k, key)


def test_prefix_cache_step_is_the_uncached_gradient():
    """One step's math from the cached start values (``grads(..., start=)``) against the
    whole forward (``grads(x)``): loss, every gradient, byte for byte; the suffix's tape
    holds what the whole forward's tape keeps."""
    graph = _mobile_graph()
    params = _params(graph, 2)
    rng = np.random.default_rng(3)
    x, y = rng.random((6, *graph.input_shape), dtype=np.float32), np.array([0, 1, 2, 1, 0, 2])
    head = (rng.standard_normal((3, graph.feature_dim)).astype(np.float32), np.zeros(3, np.float32))
    wanted = {s.weight for s in graph.mask_sites()[-2:]}
    c = T.cut(graph, wanted)
    assert c.starts == ("r2",) and [n.name for n in c.prefix] == ["conv1", "relu6", "dw", "bn", "relu"]
    start = T.prefix_values(graph, params, x, wanted)
    want = T.grads(graph, params, head, x, y, wanted)
    got = T.grads(graph, params, head, None, y, wanted, start=start)
    assert got[0] == want[0] and got[1].keys() == want[1].keys()
    for a, b in zip([*got[1].values(), *got[2:]], [*want[1].values(), *want[2:]], strict=True):
        assert a.tobytes() == b.tobytes()
    _, tape = T.suffix_forward(graph, params, start, wanted)
    assert set(tape.values) == T.kept_values(graph, wanted) | {graph.features}


def test_activations_in_place_give_the_same_bytes_and_hold_less():
    """ReLU6 over conv1's output and ReLU over BatchNormalization's run in place
    (``Graph.inplace``); the features, and the loss and every gradient of a step (the whole
    tape, and the trained part from cached start values) are the same bytes as with every
    op out of place; the caller's input keeps its bytes; the tape holds less memory, and
    the planner counts an in-place pair once."""
    graph = _mobile_graph()
    assert graph.inplace == {"relu6": "conv1", "relu": "bn"}
    plain = _mobile_graph()
    plain.__dict__["inplace"] = {}  # the cached property, emptied: every op out of place
    params = _params(graph, 2)
    rng = np.random.default_rng(3)
    x, y = rng.random((6, *graph.input_shape), dtype=np.float32), np.array([0, 1, 2, 1, 0, 2])
    keep = x.copy()
    head = (rng.standard_normal((3, graph.feature_dim)).astype(np.float32), np.zeros(3, np.float32))
    assert executor.features(graph, params, x).tobytes() == executor.features(plain, params, x).tobytes()
    for k in (5, 2):  # every site (the whole tape), the last two (from the cached start values too)
        wanted = {s.weight for s in graph.mask_sites()[-k:]}
        want = T.grads(plain, params, head, x, y, wanted)
        gots = [T.grads(graph, params, head, x, y, wanted)]
        if k == 2:
            start = T.prefix_values(graph, params, x, wanted)
            gots.append(T.grads(graph, params, head, None, y, wanted, start=start))
        for got in gots:
            assert got[0] == want[0] and got[1].keys() == want[1].keys()
            for a, b in zip([*got[1].values(), *got[2:]], [*want[1].values(), *want[2:]], strict=True):
                assert a.tobytes() == b.tobytes()
    assert np.array_equal(x, keep)
    wanted = {s.weight for s in graph.mask_sites()}
    _, tape = T.tape_forward(graph, params, x, wanted)
    _, plain_tape = T.tape_forward(plain, params, x, wanted)

    def held(t):  # bytes of the distinct arrays a tape holds
        return sum({id(v): v.nbytes for v in t.values.values()}.values())

    assert tape.values["c1"] is tape.values["r1"] and tape.values["b"] is tape.values["r2"]
    assert held(tape) == held(plain_tape) - plain_tape.values["c1"].nbytes - plain_tape.values["b"].nbytes
    assert planner.activation_bytes(graph, 6, wanted) < planner.activation_bytes(plain, 6, wanted)


def test_a_large_inputs_frozen_prefix_runs_in_chunks_with_the_same_bytes():
    """On 128x128 inputs the frozen prefix (the stem conv's ~3 MB a sample) outgrows the
    trained part, so the learner runs it a few samples at a time (planner.prefix_chunk):
    the start values and one step's loss and gradients are the same bytes as over the
    whole batch, the step allocates a fraction of what it did, and the planner's
    activations cover what it allocates (tracemalloc)."""
    import tracemalloc

    graph = _mobile_graph(128)
    params = _params(graph, 2)
    rng = np.random.default_rng(3)
    x, y = rng.random((8, *graph.input_shape), dtype=np.float32), rng.integers(0, 3, 8)
    head = (rng.standard_normal((3, graph.feature_dim)).astype(np.float32), np.zeros(3, np.float32))
    wanted = {s.weight for s in graph.mask_sites()[-2:]}
    chunk = planner.prefix_chunk(graph, wanted, 8)
    assert 1 <= chunk < 8
    assert planner.prefix_chunk(_mobile_graph(), wanted, 8) == 8  # small inputs: the batch
    whole, parts = T.prefix_values(graph, params, x, wanted), T.prefix_values(graph, params, x, wanted, chunk)
    assert whole.keys() == parts.keys() == {"r2"}
    assert whole["r2"].tobytes() == parts["r2"].tobytes()

    def traced(**kw):
        T.grads(graph, params, head, x, y, wanted, **kw)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        out = T.grads(graph, params, head, x, y, wanted, **kw)
        used = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        return out, used

    (want, used_whole), (got, used) = traced(), traced(chunk=chunk)
    assert got[0] == want[0] and got[1].keys() == want[1].keys() == wanted
    for a, b in zip([*got[1].values(), *got[2:]], [*want[1].values(), *want[2:]], strict=True):
        assert a.tobytes() == b.tobytes()
    assert used < 0.6 * used_whole, (used, used_whole)
    planned = (planner.activation_bytes(graph, 8, wanted) + 4 * 8 * (2 * 3 + graph.feature_dim)
               + 4 * sum(int(np.prod(s.shape)) for s in graph.mask_sites()[-2:]))
    assert 0.9 * used <= planned <= 2.0 * used + (64 << 10), (planned, used)


def test_head_mode_computes_a_large_inputs_features_in_chunks_with_the_same_bytes():
    """Training no site, the features of every sample are computed once: on 128x128 inputs a
    batch's forward exceeds the plan's slack, so a few samples at a time
    (planner.feature_chunk), the same bytes as one forward over all of them; the head plan
    counts the chunk's activations, not the batch's."""
    from edgecl.runtime.learn import trainer

    graph = _mobile_graph(128)
    params = _params(graph, 2)
    rng = np.random.default_rng(4)
    x, y = rng.random((11, *graph.input_shape), dtype=np.float32), rng.integers(0, 3, 11)
    p = trainer.Problem(graph, params, {}, x, y, 3, "head", dict(trainer.DEFAULTS["head"], epochs=1), 8, 0,
                        source_params=params)
    assert 1 <= p.chunk < 8 and p.chunk == planner.feature_chunk(graph, 8)
    assert planner.feature_chunk(_mobile_graph(), 8) == 8
    assert p.features().tobytes() == executor.features(graph, params, x).tobytes()
    kw = dict(graph=graph, mode="head", n_tasks=1, n_classes=3, n_samples=11, batch_size=8)
    assert planner.plan(**kw).activations < planner.activation_bytes(graph, 8)


def test_prefix_cache_with_a_dense_layer_in_the_prefix_is_deterministic():
    """A Linear on [batch, features] is one BLAS GEMM per batch, whose rounding of a row may
    depend on the batch's size: the cache (filled in sample order, a batch at a time) is a
    function of the samples, so cached runs repeat exactly and stay within float32 noise of
    the uncached run."""
    graph = _graph("mlp")
    backbone = _params(graph, 5)
    _, a = _cache_run(graph, backbone, "supsup", 1, True)
    _, b = _cache_run(graph, backbone, "supsup", 1, True)
    _, c = _cache_run(graph, backbone, "supsup", 1, False)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
        np.testing.assert_allclose(a[key], c[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_planner_counts_the_prefix_cache_and_drops_it_when_it_does_not_fit():
    graph = _mobile_graph()
    sites = graph.mask_sites()
    kw = dict(graph=graph, mode="supsup", n_tasks=2, n_classes=3, n_samples=500,
              trainable_layers=[s.node for s in sites[-2:]])
    per_sample = 4 * int(np.prod(graph.shapes(1)["r2"][1:]))
    assert planner.prefix_cache_bytes(graph, {s.weight for s in sites[-2:]}, 500) == 500 * per_sample
    assert planner.prefix_cache_bytes(graph, {s.weight for s in sites}, 500) == 0  # starts at the input
    plain = planner.plan(batch_size=16, **kw)
    cached = planner.plan(batch_size=16, prefix_cache=True, **kw)
    assert plain.cache == 0 and cached.cache == 500 * per_sample
    assert cached.total == plain.total + cached.cache and cached.as_dict()["cache"] == cached.cache
    roomy, _ = planner.choose(cached.total, 16, prefix_cache=True, **kw)
    assert roomy == cached
    tight, _ = planner.choose(cached.total - 1, 16, prefix_cache=True, **kw)
    assert tight == plain  # same batch, no cache: the learner recomputes the prefix
    assert planner.choose(None, 16, prefix_cache=True, **kw)[0] == cached
    assert planner.choose(None, 16, **kw)[0] == plain


# ------------------------------------------------------------------ Split-Digits task 5
@pytest.mark.slow
@pytest.mark.parametrize("method", ["supsup", "packnet"])
def test_device_learns_task5_like_the_host_and_forgets_nothing(method, four, run_of, digits, tmp_path):
    bundle = four(method)
    names = [t.name for t in digits.tasks[:4]]
    v_before = Bundle.open(bundle)
    old_backbone = (bundle / v_before.backbone_file()).read_bytes()
    before = _logits_bytes(Runtime(bundle), digits, names)
    # holdout 0: the device trains on exactly the samples the host trained on
    r = learn(bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method=method, seed=0,
              holdout=0.0, quiet=True, json_path=tmp_path / "report.json")
    # one version: the task and its routers (a transaction), right after the bundle's last
    assert r["status"] == "committed" and r["versions"] == [v_before.version + 1]
    parts = Bundle.open(bundle).log[-1]["parts"]
    assert "task:digits-8-9" in parts and {p.split(":")[0] for p in parts} <= {"task", "router", "backbone"}
    assert any(p.startswith("router:") for p in parts)
    doc = json.loads((tmp_path / "report.json").read_text())
    for key in ("steps", "seconds", "joules", "meter", "peak_rss_bytes", "batch_size", "plan_bytes"):
        assert doc[key] is not None, key
    after = Bundle.open(bundle)
    assert after.task_names == names + ["digits-8-9"]
    assert _logits_bytes(Runtime(bundle), digits, names) == before  # byte-identical
    if method == "supsup":
        assert after.backbone_file() == v_before.backbone_file()
    else:
        assert after.backbone_file() != v_before.backbone_file()
        assert not (bundle / L.WORK_DIR).exists()
    assert (bundle / v_before.backbone_file()).read_bytes() == old_backbone
    t5 = digits.tasks[4]
    device = float((Runtime(bundle).predict(t5.x_test.reshape(-1, 64), "digits-8-9")
                    == np.asarray(t5.classes)[t5.y_test]).mean())
    host = run_of(method).acc_matrix[4][4]
    print(f"{method}: device {device:.4f} host {host:.4f}")
    assert abs(device - host) <= 0.02
    # edgecl eval --data split-digits: task 5 is the next row and column
    res = evaluate(bundle, [(t.name, t.x_test, t.y_test) for t in digits.tasks])
    assert res["tasks"][-1] == "digits-8-9" and res["acc_matrix"][4][4] == pytest.approx(device)
    assert res["bwt"] == 0.0
    assert all(res["acc_matrix"][4][j] == res["acc_matrix"][j][j] for j in range(4))
    # the routers cover the new task (updated with its data only)
    assert sorted(after.manifest["routers"]) and all(
        e["tasks"] == after.task_names for e in after.manifest["routers"].values())


def test_head_mode_reports_holdout_accuracy_and_keeps_the_backbone(four, digits, tmp_path):
    bundle = four("supsup")
    backbone = Bundle.open(bundle).backbone_file()
    r = learn(bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method="head", epochs=10,
              quiet=True, routers=False)
    assert r["holdout_acc"] is not None and r["holdout_acc"] > 0.8 and r["n_holdout"] > 0
    b = Bundle.open(bundle)
    assert b.backbone_file() == backbone and b.task("digits-8-9")["kind"] == "weight_bits"
    # head mode runs on the newest task's mask: the file carries that mask
    new, src = b.task_tensors("digits-8-9"), b.task_tensors("digits-6-7")
    assert all(np.array_equal(new[k], src[k]) for k in src if k.startswith("mask."))


# ------------------------------------------------------------------ RAM budget
def test_ram_budget_below_minimum_is_refused_with_the_minimum(four, digits, tmp_path):
    bundle = four("supsup")
    snap = _all_bytes(bundle)
    with pytest.raises(RamBudgetError, match=r"below the minimum .*: \d+\.\d+ MiB"):
        learn(bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method="supsup",
              ram_mb=1.0, quiet=True)
    assert _all_bytes(bundle) == snap


def test_a_task_with_an_existing_tasks_classes_is_refused_without_force(four, digits, tmp_path, capsys):
    from edgecl.tools.cli import main as cli

    bundle = four("supsup")
    snap = _all_bytes(bundle)
    dup = _samples(tmp_path, digits.tasks[3])  # digits 6 and 7: task digits-6-7's classes
    with pytest.raises(LearnError, match=r"classes \[6, 7\] of task 'digits-6-7'.*--force"):
        learn(bundle, "sixes-and-sevens", dup, method="head", epochs=1, quiet=True, routers=False)
    assert _all_bytes(bundle) == snap
    assert cli(["learn", str(bundle), "--task", "again", "--data", str(dup), "--method", "head",
                "--epochs", "1", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    r = learn(bundle, "sixes-and-sevens", dup, method="head", epochs=1, quiet=True, routers=False,
              force=True)
    assert r["status"] == "committed" and r["duplicates"] == ["digits-6-7"]


def test_child_exceeding_the_budget_dies_alone_and_nothing_changes(four, digits, tmp_path):
    bundle = four("packnet")
    snap = _all_bytes(bundle)
    with pytest.raises(RamBudgetError, match="exceeded its RAM budget"):
        learn(bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method="packnet",
              ram_mb=32, quiet=True, debug_alloc_mb=200)
    assert _all_bytes(bundle) == snap
    assert Bundle.open(bundle).task_names[-1] == "digits-6-7"


def test_planner_picks_a_smaller_batch_under_a_tighter_budget():
    from edgecl.models.architectures import build

    graph = build("cnn", (1, 8, 8))
    kw = dict(graph=graph, mode="packnet", n_tasks=4, n_classes=2, n_samples=300)
    big = planner.plan(batch_size=32, **kw)
    one = planner.plan(batch_size=1, **kw)
    assert big.total > one.total and big.activations == 32 * one.activations
    chosen, minimum = planner.choose(one.total + (big.total - one.total) // 2, 32, **kw)
    assert 1 < chosen.batch_size < 32 and minimum.total == one.total
    with pytest.raises(ValueError):
        planner.choose(one.total - 1, 32, **kw)
    head = planner.plan(batch_size=32, **dict(kw, mode="head"))
    assert head.gradients == 0 and head.optimizer == 0
    # the manifest's model entry plans the same as its graph
    from edgecl.runtime.graph import model_entry

    assert planner.plan(batch_size=32, **dict(kw, graph=model_entry(graph, "cnn"))) == big


@pytest.mark.parametrize("kind", GRAPHS)
def test_planner_counts_only_what_the_trained_sites_need(kind):
    """Training the last site only: gradients and optimizer state of that site alone, and
    the frozen prefix's activations are not kept for a backward."""
    graph = _graph(kind)
    sites = graph.mask_sites()
    kw = dict(graph=graph, mode="supsup", n_tasks=2, n_classes=3, n_samples=100, batch_size=16)
    full = planner.plan(**kw)
    last = planner.plan(trainable_layers=[sites[-1].node], **kw)
    n_last = int(np.prod(sites[-1].shape))
    assert last.gradients == 8 * n_last and last.optimizer == 8 * n_last and last.trainable == 4 * n_last
    assert last.activations < full.activations
    assert planner.activation_bytes(graph, 16, {sites[-1].weight}) < planner.activation_bytes(
        graph, 16, {s.weight for s in sites})
    with pytest.raises(KeyError):
        planner.plan(trainable_layers=["no-such-node"], **kw)


def test_planned_activations_cover_what_a_step_allocates():
    """The activation estimate against numpy's own allocations (tracemalloc) for one
    training step, with and without a frozen prefix."""
    import tracemalloc

    for kind in ("cnn", "mobile"):
        graph = _graph(kind)
        params = _params(graph)
        rng = np.random.default_rng(0)
        x = rng.random((16, *graph.input_shape), dtype=np.float32)
        y = rng.integers(0, 3, 16)
        head = (np.zeros((3, graph.feature_dim), np.float32), np.zeros(3, np.float32))
        sites = graph.mask_sites()
        for trained in (sites, sites[-1:]):
            wanted = {s.weight for s in trained}
            T.grads(graph, params, head, x, y, wanted)
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            T.grads(graph, params, head, x, y, wanted)
            used = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            planned = (planner.activation_bytes(graph, 16, wanted) + 4 * 16 * (2 * 3 + graph.feature_dim)
                       + 4 * sum(int(np.prod(s.shape)) for s in trained))
            assert planned >= 0.9 * used, (kind, len(trained), planned, used)
            assert planned <= 2.0 * used + (64 << 10), (kind, len(trained), planned, used)


# ------------------------------------------------------------------ energy budget
@pytest.mark.parametrize("method", ["packnet", "supsup"])
def test_energy_pause_and_resume_equals_an_uninterrupted_run(method, four, digits, tmp_path):
    a = four(method)
    b = tmp_path / "uninterrupted"
    shutil.copytree(a, b)
    data = _samples(tmp_path, digits.tasks[4])
    kw = dict(method=method, epochs=5, seed=3, meter=TICK, quiet=True, routers=False)
    snap = _all_bytes(a)
    r1 = learn(a, "digits-8-9", data, energy_j=2.0, **kw)
    assert r1["status"] == "paused" and r1["steps"] == 20  # start + 20 reads of 0.1 J
    ckpt = Path(r1["checkpoint"])
    assert ckpt.is_file() and ckpt.parent.parent == a / L.WORK_DIR
    assert {k: v for k, v in _all_bytes(a).items() if not k.startswith(L.WORK_DIR)} == snap
    with pytest.raises(LearnError, match="--resume"):
        learn(a, "digits-8-9", data, **kw)
    with pytest.raises(LearnError, match="seed"):
        learn(a, "digits-8-9", data, resume=True, **dict(kw, seed=4))
    r2 = learn(a, "digits-8-9", data, energy_j=1.5, resume=True, **kw)
    assert r2["status"] == "paused" and r2["steps"] == 35
    r3 = learn(a, "digits-8-9", data, resume=True, **kw)
    assert r3["status"] == "committed" and r3["steps"] == r3["total_steps"]
    assert not ckpt.exists()
    ref = learn(b, "digits-8-9", data, **kw)
    ta, tb = Bundle.open(a), Bundle.open(b)
    xa, xb = ta.task_tensors("digits-8-9"), tb.task_tensors("digits-8-9")
    assert xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_allclose(xa[k], xb[k], atol=1e-6, rtol=0)
    np.testing.assert_allclose(r3["joules"], ref["joules"], rtol=1e-9)
    for k, v in tb.backbone.items():
        np.testing.assert_allclose(ta.backbone[k], v, atol=1e-6, rtol=0)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_rapl_reader_counts_across_wraparound(tmp_path):
    z = tmp_path / "sys/class/powercap/intel-rapl:0"
    _write(z / "energy_uj", "999000000\n")
    _write(z / "max_energy_range_uj", "1000000000\n")
    _write(tmp_path / "sys/class/powercap/intel-rapl:0:0/energy_uj", "5\n")  # a sub-zone: ignored
    m = energy.RaplMeter(tmp_path)
    m.start()
    _write(z / "energy_uj", "999500000\n")
    assert m.joules() == pytest.approx(0.5)
    _write(z / "energy_uj", "250000\n")  # wrapped past max_energy_range_uj
    assert m.joules() == pytest.approx(0.5 + 0.5 + 0.25)
    assert "intel-rapl:0" in m.describe() and not m.estimate


def test_ina3221_readers_both_layouts(tmp_path):
    clock = iter([0.0, 2.0, 4.0]).__next__
    iio = tmp_path / "sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0"
    _write(iio / "in_power0_input", "1000\n")  # mW
    _write(iio / "in_power1_input", "500\n")
    m = energy.Ina3221Meter(tmp_path, clock=clock)
    m.start()
    assert m.joules() == pytest.approx(3.0)  # 1.5 W for 2 s
    _write(iio / "in_power0_input", "2500\n")
    assert m.joules() == pytest.approx(3.0 + 0.5 * (1.5 + 3.0) * 2)
    root2 = tmp_path / "orin"
    hw = root2 / "sys/class/hwmon/hwmon3"
    _write(hw / "name", "ina3221\n")
    _write(hw / "in1_input", "5000\n")   # mV
    _write(hw / "curr1_input", "400\n")  # mA -> 2 W
    _write(hw / "in2_input", "5000\n")
    _write(hw / "curr2_input", "200\n")  # 1 W
    _write(root2 / "sys/class/hwmon/hwmon0/name", "acpitz\n")
    m2 = energy.Ina3221Meter(root2, clock=iter([10.0, 11.0]).__next__)
    assert m2.watts() == pytest.approx(3.0)


PMIC_OUT = """\
     3V7_WL_SW_A current(0)=0.00390372A
       3V3_SYS_A current(1)=0.05660400A
      VDD_CORE_A current(7)=0.50000000A
     3V7_WL_SW_V volt(8)=3.74475600V
       3V3_SYS_V volt(9)=3.31200000V
      VDD_CORE_V volt(15)=0.80000000V
       EXT5V_V volt(24)=5.13600000V
"""


def test_pmic_reader_parses_vcgencmd(tmp_path):
    rails = energy.parse_pmic_adc(PMIC_OUT)
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "VDD_CORE"}  # EXT5V has no current
    tool = tmp_path / "usr/bin/vcgencmd"
    _write(tool, "#!/bin/sh\ncat <<'EOF'\n" + PMIC_OUT + "EOF\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    m = energy.PmicMeter(tmp_path)
    want = 0.00390372 * 3.744756 + 0.056604 * 3.312 + 0.5 * 0.8
    assert m.watts() == pytest.approx(want)


def test_absent_readers_are_reported_absent_and_model_is_an_estimate(tmp_path):
    got = energy.probe(tmp_path)
    assert all(got[k].startswith("absent") for k in ("rapl", "ina3221", "pmic"))
    assert "estimate" in got["model"]
    m = energy.make_meter("auto", tmp_path)
    assert m.estimate and isinstance(m, energy.ModelMeter)
    with pytest.raises(energy.MeterUnavailable):
        energy.RaplMeter(tmp_path)
    mm = energy.ModelMeter("rpi5", cpu_time=iter([1.0, 3.0]).__next__)
    mm.start()
    assert mm.joules() == pytest.approx(2.0 * energy.CALIBRATION_W["rpi5"])


# ------------------------------------------------------------------ zero forgetting guard
class _Abort(Exception):
    pass


def _stage(root, backbone, entry, tensors, canaries, before) -> None:
    """The learner's check of a candidate, in a transaction that is then abandoned."""
    from edgecl.runtime.bundle_write import Transaction

    bundle = Bundle.open(root)
    with pytest.raises(_Abort), Transaction(root, key=None) as tx:
        L.stage_task(tx, bundle, backbone, entry, tensors, canaries, before)
        raise _Abort
    assert Bundle.open(root).version == bundle.version


def test_a_candidate_that_changes_an_owned_weight_is_refused(four, digits):
    root = four("packnet")
    bundle = Bundle.open(root)
    canaries = L.canary_inputs((64,), digits.tasks[4].x_train.reshape(-1, 64))
    before = L._old_logits(Runtime(bundle), bundle.task_names, canaries)
    last = bundle.task_tensors(bundle.task_names[-1])
    entry = {"name": "new", "classes": [8, 9], "n_classes": 2, "method": "packnet",
             "kind": "weight_bits", "metrics": {}}
    backbone = {k: np.array(v) for k, v in bundle.backbone.items()}
    owned = np.unpackbits(last["mask.fc1"], bitorder="little")[: backbone["fc1.weight"].size]
    free_i, owned_i = np.flatnonzero(owned == 0)[0], np.flatnonzero(owned == 1)[0]
    backbone["fc1.weight"].reshape(-1)[free_i] = 0.5  # a free weight: old tasks never see it
    _stage(root, backbone, entry, last, canaries, before)
    backbone["fc1.weight"].reshape(-1)[owned_i] += 1.0
    with pytest.raises(ForgettingError, match="owned weights of fc1"):
        _stage(root, backbone, entry, last, canaries, before)
    tampered = {k: v for k, v in before.items()}
    tampered[bundle.task_names[0]] = b"x"
    with pytest.raises(ForgettingError, match="canary"):
        _stage(root, None, entry, last, canaries, tampered)


# ------------------------------------------------------------------ torch blocked
def test_learner_runs_with_torch_blocked(four, digits, tmp_path):
    bundle = four("packnet")
    data = _samples(tmp_path, digits.tasks[4])
    code = textwrap.dedent("""
        import argparse, sys
        from edgecl.tools import learn_cmd
        p = argparse.ArgumentParser(); learn_cmd.add_arguments(p)
        rc = learn_cmd.main(p.parse_args(sys.argv[1:]))
        assert "torch" not in sys.modules
        sys.exit(rc)
    """)
    r = run_on_device(tmp_path, code, bundle, "--task", "digits-8-9", "--data", data, "--method",
                      "packnet", "--epochs", "2", "--quiet", "--json", tmp_path / "r.json",
                      blocked=("torch",))  # the learning child inherits the blocker
    assert r.returncode == 0, r.stderr + r.stdout
    assert "byte-identical" in r.stdout
    chk = run_on_device(tmp_path, "import torch", blocked=("torch",))
    assert chk.returncode != 0 and "blocked" in chk.stderr
    assert Bundle.open(bundle).task_names[-1] == "digits-8-9"


# ------------------------------------------------------------------ the compiled TVM step
@pytest.mark.slow
def test_tvm_train_step_is_used_and_agrees_with_the_numpy_path(four, digits, tmp_path):
    """With a compiled training step in the bundle, learn uses it; the task it learns is the
    one the numpy path learns (same seed, same data order)."""
    from edgecl.compiler.tvm_build import compile_bundle

    a = four("supsup")
    compile_bundle(a, "host")  # forward + train step for this machine
    assert Bundle.open(a).manifest["targets"]["host"]["train_step"]["file"]
    b = tmp_path / "numpy-copy"
    shutil.copytree(a, b)
    samples = _samples(tmp_path, digits.tasks[4])
    kw = {"method": "supsup", "epochs": 3, "seed": 0, "holdout": 0.0, "quiet": True, "routers": False}
    r_tvm = learn(a, "digits-8-9", samples, step_backend="auto", **kw)
    r_np = learn(b, "digits-8-9", samples, step_backend="numpy", **kw)
    assert r_tvm["step_backend"] == "tvm" and r_np["step_backend"] == "numpy"
    assert r_tvm["steps"] == r_np["steps"] > 0
    ta, tb = Bundle.open(a).task_tensors("digits-8-9"), Bundle.open(b).task_tensors("digits-8-9")
    for key in ta:
        if key.startswith("mask."):  # supermask bits: the same top-k, up to rare ties
            same = np.unpackbits(ta[key]) == np.unpackbits(tb[key])
            assert same.mean() >= 0.999, key
        else:
            np.testing.assert_allclose(ta[key], tb[key], atol=1e-4, rtol=0)
    x = digits.tasks[4].x_test.reshape(-1, 64)
    np.testing.assert_allclose(Runtime(a).logits(x, "digits-8-9"), Runtime(b).logits(x, "digits-8-9"),
                               atol=1e-3, rtol=0)


# ------------------------------------------------------------------ supsup's top-k
def _reference_topk(flat: np.ndarray, k: int) -> np.ndarray:
    """The top-k the straightforward way: a stable sort, descending, lowest index first
    among equal scores."""
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep


def test_incremental_topk_is_exactly_the_top_k_under_any_moves():
    from edgecl.runtime.learn.trainer import TopK, kth_largest, topk_mask

    rng = np.random.default_rng(0)
    for size, density in [(65536, 0.5), (16384, 0.5), (1000, 0.3), (7, 0.5), (1, 0.5)]:
        flat = rng.uniform(-0.15, 0.15, size).astype(np.float32)
        tk = TopK(size, density)
        for step in range(60):
            # small Adam-like moves, occasional large jumps, a shift of everything, ties
            kind = step % 6
            if kind == 3:
                flat += np.float32(rng.uniform(-0.05, 0.05))
            elif kind == 4:
                flat[rng.integers(0, size, max(1, size // 10))] = np.float32(rng.uniform(-1, 1))
            elif kind == 5:
                flat[rng.integers(0, size, max(1, size // 3))] = flat[rng.integers(0, size)]
            else:
                flat += (rng.standard_normal(size) * 1e-3).astype(np.float32)
            thr = tk.threshold(flat)
            assert thr == kth_largest(flat, tk.k)
            keep = topk_mask(flat, tk.k, thr)
            assert int(keep.sum()) == tk.k
            np.testing.assert_array_equal(keep, _reference_topk(flat, tk.k))
        if size >= 16384:
            assert tk.full < 20  # the band finds it most of the time


def test_supsup_step_runs_on_the_exact_supermask_of_its_scores():
    from edgecl.runtime.learn import trainer
    from edgecl.runtime.masks import materialize_bits

    rng = np.random.default_rng(1)
    graph = Graph([Value("x", (16,))],
                  [Param("fc1.weight", (32, 16), "weight"), Param("fc2.weight", (32, 32), "weight")],
                  [Node("fc1", "Linear", ("x", "fc1.weight"), ("h1",)),
                   Node("r1", "Relu", ("h1",), ("a1",)),
                   Node("fc2", "Linear", ("a1", "fc2.weight"), ("h2",)),
                   Node("r2", "Relu", ("h2",), ("a2",))],
                  "a2")
    backbone = {"fc1.weight": rng.standard_normal((32, 16)).astype(np.float32),
                "fc2.weight": rng.standard_normal((32, 32)).astype(np.float32)}
    x, y = rng.random((64, 16), dtype=np.float32), rng.integers(0, 3, 64)
    hp = dict(trainer.DEFAULTS["supsup"], epochs=1)
    p = trainer.Problem(graph, backbone, [], x, y, 3, "supsup", hp, 16, 0)
    s = p.initial()
    for i in range(40):
        params = trainer._step_params(p, s)
        for n in p.names:
            scores = s.arrays[f"scores.{n}"]
            want = _reference_topk(scores.reshape(-1), trainer.topk_count(scores.size, 0.5))
            np.testing.assert_array_equal(params[f"{n}.weight"].view(np.uint32), materialize_bits(
                backbone[f"{n}.weight"], np.packbits(want, bitorder="little")).view(np.uint32))
            np.testing.assert_array_equal(trainer.topk_bits(scores, 0.5),
                                          np.packbits(want, bitorder="little"))
        trainer.numpy_step(p, s, np.arange(i % 4 * 16, i % 4 * 16 + 16))


# ------------------------------------------------------------------ any graph, a frozen prefix
def _graph_bundle(root: Path, graph: Graph, method: str, n_tasks: int = 2,
                  weights: dict[str, np.ndarray] | None = None) -> Path:
    """A bundle of ``graph`` (on ``weights``, default random ones) with ``n_tasks`` tasks of
    random masks (PackNet: nested, each owning a disjoint fifth of every site) and heads,
    written by the bundle writer."""
    from edgecl.runtime.bundle_write import commit
    from edgecl.runtime.graph import model_entry
    from edgecl.runtime.masks import pack_bits

    rng = np.random.default_rng(11)
    backbone = _params(graph, 5) if weights is None else weights
    owner = {s.node: rng.integers(0, 5, int(np.prod(s.shape))) for s in graph.mask_sites()}
    for t in range(n_tasks):
        tensors = {"head.weight": rng.standard_normal((2, graph.feature_dim)).astype(np.float32),
                   "head.bias": np.zeros(2, np.float32)}
        for s in graph.mask_sites():
            bits = owner[s.node] <= t if method == "packnet" else rng.random(owner[s.node].size) < 0.5
            tensors[f"mask.{s.node}"] = pack_bits(bits)
        entry = {"name": f"old-{t}", "classes": [2 * t, 2 * t + 1], "n_classes": 2, "method": method,
                 "kind": "weight_bits", "metrics": {}}
        commit(root, model=model_entry(graph, graph.name), backbone=backbone if t == 0 else None,
               tasks=[(entry, tensors)])
    return root


@pytest.mark.parametrize("method", ["supsup", "packnet"])
def test_learning_the_last_sites_of_a_graph_forgets_nothing(method, tmp_path):
    """On a graph with a depthwise conv, BatchNormalization and a residual Add, learn a
    task training only the last 2 mask sites: old tasks answer byte-identically, the
    frozen sites keep the dense weights (supsup: an all-ones mask) or the old union
    (packnet), and only free weights of the trained sites moved."""
    from edgecl.runtime.masks import unpack_bits

    graph = _mobile_graph()
    root = _graph_bundle(tmp_path / "b", graph, method)
    before = Bundle.open(root)
    rng = np.random.default_rng(4)
    x = rng.random((64, *graph.input_shape), dtype=np.float32)
    y = np.where(x[:, 0].mean(axis=(1, 2)) > np.median(x[:, 0].mean(axis=(1, 2))), 8, 9)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    probe = rng.random((16, *graph.input_shape), dtype=np.float32)
    old = {t: Runtime(before).logits(probe, t).tobytes() for t in before.task_names}
    old_backbone = (root / before.backbone_file()).read_bytes()
    r = learn(root, "new", tmp_path / "s.npz", method=method, epochs=3, train_last=2, holdout=0.0,
              quiet=True, routers=False, step_backend="numpy")
    sites = graph.mask_sites()
    assert r["status"] == "committed" and r["trained_sites"] == [s.node for s in sites[-2:]]
    assert r["prefix_cache"] and r["plan"]["cache"] == 64 * 4 * int(np.prod(graph.shapes(1)["r2"][1:]))
    after = Bundle.open(root)
    rt = Runtime(after)
    assert {t: rt.logits(probe, t).tobytes() for t in before.task_names} == old
    assert np.isfinite(rt.logits(probe, "new")).all()
    assert (root / before.backbone_file()).read_bytes() == old_backbone  # never rewritten
    new = after.task_tensors("new")
    olds = [before.task_tensors(t) for t in before.task_names]
    for s in sites:
        n = int(np.prod(s.shape))
        bits = unpack_bits(new[f"mask.{s.node}"], (n,))
        union = np.zeros(n, dtype=bool)
        for m in olds:
            union |= unpack_bits(m[f"mask.{s.node}"], (n,))
        if s in sites[:-2]:  # frozen
            assert bits.all() if method == "supsup" else np.array_equal(bits, union), s.node
            np.testing.assert_array_equal(after.backbone[s.weight], before.backbone[s.weight])
        elif method == "supsup":
            assert int(bits.sum()) == round(n * 0.5), s.node
        else:
            assert (bits >= union).all() and bits.sum() > union.sum(), s.node
    for name in graph.params:  # packnet: only the trained sites' free weights moved
        if name not in {s.weight for s in sites[-2:]}:
            assert after.backbone[name].tobytes() == before.backbone[name].tobytes(), name
    if method == "supsup":
        assert after.backbone_file() == before.backbone_file()


def test_auto_step_falls_back_to_numpy_when_the_compiled_step_is_unusable(monkeypatch):
    """``auto`` with no usable compiled step (none in the bundle, a loader that raises, or
    a first call that fails) runs numpy — the same steps as the numpy backend."""
    from edgecl.runtime.learn import trainer

    graph = _mobile_graph()
    rng = np.random.default_rng(0)
    backbone = _params(graph)
    x, y = rng.random((32, *graph.input_shape), dtype=np.float32), rng.integers(0, 2, 32)
    hp = dict(trainer.DEFAULTS["supsup"], epochs=1)

    def run(step):
        p = trainer.Problem(graph, backbone, [], x, y, 2, "supsup", hp, 16, 0, train_last=2)
        s = p.initial()
        trainer.run(p, s, step, out_of_energy=lambda: False)
        return s.arrays

    def no_lib(bundle):
        raise FileNotFoundError("no train_step in this bundle")

    monkeypatch.setitem(trainer.STEP_BACKENDS, "tvm", no_lib)
    assert trainer.select_step(None, "auto") == ("numpy", trainer.numpy_step)

    def broken_call(bundle):
        def grads(p, params, head, x, y):
            raise KeyError("fc1")  # a library built for other parameter names
        return trainer._masked_step(grads)

    monkeypatch.setitem(trainer.STEP_BACKENDS, "tvm", broken_call)
    name, step = trainer.select_step(None, "auto")
    assert name == "tvm"
    got, want = run(step), run(trainer.numpy_step)
    assert step.backend == "numpy" and "KeyError" in step.fallback_reason
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    with pytest.raises(KeyError):  # asked for by name: no fallback
        run(trainer.select_step(None, "tvm")[1])


# ------------------------------------------------------------------ the methods' registry
def test_learning_methods_are_one_registry_consistent_with_the_task_kinds():
    """Every method a task kind names as its learner is registered; a method that makes a
    kind of its own is named by that kind; the CLI offers exactly the registry; and no
    module of the learner compares against a method's name or keys a table by it (the
    string switches are gone: what a method differs in is its class)."""
    import argparse
    import ast

    from edgecl.runtime.kinds import KINDS
    from edgecl.runtime.learn.methods import LEARN_METHODS
    from edgecl.tools import learn_cmd

    for kind in KINDS.values():
        assert set(kind.learners) <= set(LEARN_METHODS), (kind.name, kind.learners)
    for name, m in LEARN_METHODS.items():
        assert m.name == name
        if m.produces is not None:
            assert name in KINDS[m.produces].learners, (name, m.produces)
    p = argparse.ArgumentParser()
    learn_cmd.add_arguments(p)
    (action,) = [a for a in p._actions if a.dest == "method"]
    assert list(action.choices) == list(LEARN_METHODS)

    root = Path(L.__file__).parent
    files = [root / f"{m}.py" for m in ("trainer", "learner", "child", "planner")]
    files.append(Path(learn_cmd.__file__))
    names = set(LEARN_METHODS)

    def named(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in names or (
            isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts))

    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                assert not any(named(n) for n in [node.left, *node.comparators]), (path.name, node.lineno)
            if isinstance(node, ast.Dict):
                assert not any(named(k) for k in node.keys if k is not None), (path.name, node.lineno)


_QUARTER = """
from edgecl.runtime.kinds import KINDS
from edgecl.runtime.learn import methods

class Quarter(methods.SupSup):
    name = "quarter"
    defaults = {"epochs": 1, "lr": 1e-2, "density": 0.25}

methods.LEARN_METHODS["quarter"] = Quarter()
"""


def test_a_new_method_is_one_class_and_the_kind_decides_whether_it_may_learn(monkeypatch, tmp_path):
    """A method added to the registry (here SupSup keeping a quarter of each site) runs
    through the learner, its child included, with its own defaults; the learner refuses it
    while the task kind it makes does not name it (nothing is written), and learns once it
    does."""
    from edgecl.runtime.learn import methods

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_QUARTER)  # every process: the learner and its children
    monkeypatch.setenv("PYTHONPATH", str(site))
    exec(_QUARTER, {})
    graph = _mobile_graph()
    root = _graph_bundle(tmp_path / "b", graph, "supsup")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "s.npz", x=rng.random((24, *graph.input_shape), dtype=np.float32),
             y=rng.integers(3, 5, 24))
    snap = _all_bytes(root)
    kw = dict(holdout=0.0, quiet=True, routers=False, step_backend="numpy", train_last=2)
    try:
        import re

        from edgecl.runtime.kinds import KINDS

        refused = (r"--method quarter cannot make a task of kind 'weight_bits' "
                   r"\(that kind is learned on the device by: "
                   + re.escape(", ".join(KINDS["weight_bits"].learners)) + r"\)")
        with pytest.raises(LearnError, match=refused):
            learn(root, "new", tmp_path / "s.npz", method="quarter", **kw)
        assert _all_bytes(root) == snap
        code = textwrap.dedent("""
            import json, sys
            from edgecl.runtime.kinds import KINDS
            from edgecl.runtime.learn import learn
            kind = type(KINDS["weight_bits"])
            kind.learners = (*kind.learners, "quarter")
            r = learn(sys.argv[1], "new", sys.argv[2], method="quarter", **json.loads(sys.argv[3]))
            print(json.dumps({"status": r["status"], "hparams": r["hparams"]}))
        """)
        p = subprocess.run([sys.executable, "-c", code, str(root), str(tmp_path / "s.npz"), json.dumps(kw)],
                           capture_output=True, text=True, timeout=600)
    finally:
        methods.LEARN_METHODS.pop("quarter", None)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r == {"status": "committed", "hparams": {"epochs": 1, "lr": 1e-2, "density": 0.25}}
    b = Bundle.open(root)
    assert b.task("new")["method"] == "quarter" and b.task("new")["kind"] == "weight_bits"
    from edgecl.runtime.masks import unpack_bits

    for s in graph.mask_sites()[-2:]:
        n = int(np.prod(s.shape))
        assert int(unpack_bits(b.task_tensors("new")[f"mask.{s.node}"], (n,)).sum()) == round(n * 0.25)


# ------------------------------------------------------------------ the plan vs what the child maps
def _within_plan(r: dict) -> None:
    """The child's peak RSS is within the bare child's (the probe: interpreter, numpy,
    the kernels; not planned) plus the plan's child share, and the plan is not loose
    beyond 2x what the learning added plus the slack."""
    share = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
    child = r["plan"]["child"]
    mib = 1 << 20
    plan = {k: f"{v / mib:.1f}" for k, v in r["plan"].items() if k != "batch_size"}
    print(f"peak RSS {r['peak_rss_bytes'] / mib:.1f} MiB = bare child {r['baseline_rss_bytes'] / mib:.1f} + "
          f"{share / mib:.1f}; plan (MiB, batch {r['batch_size']}): {plan}")
    assert 0 < share <= child, (share, child)
    assert child - planner.SLACK <= 2 * share, (share, child)
    assert r["plan_bytes"] == r["plan"]["total"] >= r["plan"]["parent"] + child


@pytest.mark.parametrize("model", ["mlp", "mobilenet-v2"])
def test_the_plan_bounds_the_childs_peak_rss(model, four, digits, tmp_path):
    """Numpy step: the default MLP on Split-Digits task 5, and MobileNetV2 (0.35, 96x96,
    every site trained: its activations are most of the child)."""
    if model == "mlp":
        root, data, kw = four("supsup"), _samples(tmp_path, digits.tasks[4]), {"epochs": 2}
    else:
        pytest.importorskip("torch")
        from edgecl.models.importer import import_model

        graph, weights = import_model("mobilenet-v2", zoo_kwargs={"width": 0.35, "input_size": 96})
        root = _graph_bundle(tmp_path / "b", graph, "supsup", weights=weights)
        rng = np.random.default_rng(0)
        data = tmp_path / "s.npz"
        np.savez(data, x=rng.random((40, *graph.input_shape), dtype=np.float32), y=rng.integers(0, 3, 40))
        kw = {"epochs": 1, "batch_size": 16}
    r = learn(root, "new", data, method="supsup", holdout=0.0, quiet=True, step_backend="numpy", **kw)
    assert r["status"] == "committed" and r["step_backend"] == "numpy" and r["plan"]["step_runtime"] == 0
    _within_plan(r)


@pytest.mark.slow
def test_the_plan_counts_the_compiled_steps_runtime(tmp_path):
    """With the bundle's TVM training step, a probe child measures what loading and running
    it adds (the TVM runtime, the library, its workspace): the plan counts it, and the
    child's peak RSS stays within it — which the plan without that term would not bound.
    The probe and the child hash no file (:func:`_counted_learn`)."""
    pytest.importorskip("tvm")
    from edgecl.compiler.tvm_build import compile_bundle

    graph = _graph("mlp")
    root = _graph_bundle(tmp_path / "b", graph, "supsup")
    compile_bundle(root, "host")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", x=rng.random((96, *graph.input_shape), dtype=np.float32),
             y=rng.integers(0, 3, 96))
    r = _counted_learn(tmp_path, root, "new", tmp_path / "s.npz", method="supsup", epochs=2, holdout=0.0)
    assert r["status"] == "committed" and r["step_backend"] == "tvm"
    step = r["step_probe"]
    assert step["backend"] == "tvm" and "error" not in step and r["plan"]["step_runtime"] == step["rss"] > 0
    _within_plan(r)
    share = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
    assert share > r["plan"]["child"] - r["plan"]["step_runtime"]


# ------------------------------------------------------------------ one verification, canaries once
_HASH_LOG = """
import hashlib, os
_real, _log = hashlib.sha256, os.environ["EDGECL_TEST_HASH_LOG"]
class _Counted:
    def __init__(self, *a, **k):
        self._h = _real(*a, **k)
    def update(self, data):
        self._h.update(data)
    def _done(self, hexd):
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {hexd}\\n")
    def hexdigest(self):
        d = self._h.hexdigest()
        self._done(d)
        return d
    def digest(self):
        d = self._h.digest()
        self._done(d.hex())
        return d
    def __getattr__(self, name):
        return getattr(self._h, name)
hashlib.sha256 = _Counted
"""


_COUNTED_LEARN = """
import json, os, sys
import numpy as np
from edgecl.runtime import executor
from edgecl.runtime.learn import learn, learner
seen, calls = [], []
inputs, forward = learner.canary_inputs, executor.forward
def canary_inputs(*a, **k):
    seen.append(inputs(*a, **k))
    return seen[-1]
def counted(graph, params, head, x, *a, **k):  # canary rows run
    calls.append(len(x) if seen and np.shares_memory(x, seen[0]) else 0)
    return forward(graph, params, head, x, *a, **k)
learner.canary_inputs, executor.forward = canary_inputs, counted
r = learn(sys.argv[1], sys.argv[2], sys.argv[3], quiet=True, **json.loads(sys.argv[4]))
print(json.dumps({"pid": os.getpid(), "canary_rows": sum(calls), "canaries": len(seen[0]), "report": r}))
"""


def _counted_learn(tmp_path: Path, root: Path, task: str, data: Path, **kw) -> dict:
    """``learn()`` in a process of its own whose every process (the learner, the probe, the
    learning child) logs each sha256 it finishes; checks that each file of the bundle as it
    stood was hashed exactly once in all, by the learner (the open's verification), and
    that the canaries ran once per old task before learning and once on the candidate.
    Returns the report."""
    before = Bundle.open(root)
    files = {rel: info["sha256"] for rel, info in before.manifest["files"].items()}
    site = tmp_path / "hash-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_HASH_LOG)
    log = tmp_path / "hashes.txt"
    log.write_text("")
    env = dict(os.environ, PYTHONPATH=str(site), EDGECL_TEST_HASH_LOG=str(log))
    p = subprocess.run([sys.executable, "-c", _COUNTED_LEARN, str(root), task, str(data), json.dumps(kw)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    by_digest: dict[str, list[str]] = {}
    for pid, digest in (line.split() for line in log.read_text().splitlines()):
        by_digest.setdefault(digest, []).append(pid)
    for rel, digest in files.items():
        assert by_digest.get(digest) == [str(out["pid"])], (rel, by_digest.get(digest))
    assert out["canary_rows"] == 2 * len(before.task_names) * out["canaries"]
    return out["report"]


def test_one_learn_hashes_each_file_once_and_runs_the_canaries_once_per_side(four, digits, tmp_path):
    """See :func:`_counted_learn`: PackNet (a new backbone) with the routers refitted. (With
    the compiled step and its probe child: ``test_the_plan_counts_the_compiled_steps_runtime``.)"""
    bundle = four("packnet")
    files = Bundle.open(bundle).manifest["files"]
    assert Bundle.open(bundle).backbone_file() in files and any(r.startswith("routers/") for r in files)
    r = _counted_learn(tmp_path, bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method="packnet",
                       epochs=1, step_backend="numpy")
    assert r["status"] == "committed" and r["backbone_changed"]
