"""Task-agnostic inference: routers, calibrated confidence, unknown inputs, updates."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from edgecl.compiler.from_run import bundle_run
from edgecl.models.data import permuted_digits
from edgecl.models.training import train
from edgecl.runtime import Bundle, Runtime
from edgecl.runtime.evaluate_routing import evaluate_routing
from edgecl.runtime.routers import ROUTERS, UNKNOWN, PrototypeRouter, RouterError
from edgecl.runtime.routers.store import load_router, update_routers
from edgecl.tools.cli import main

from .conftest import _quiet


def _data(stream):
    return [(t.name, t.x_test, t.y_test) for t in stream.tasks]


@pytest.mark.parametrize("method", ["supsup", "hat"])
def test_split_digits_best_router_identifies_tasks(trained, digits, method):
    r = evaluate_routing(trained(method)[1], _data(digits), timing=False)
    assert set(r["routers"]) == set(ROUTERS)
    best = max(v["task_id_acc"] for v in r["routers"].values())
    assert best >= 0.95
    assert r["default_router"] == "prototype" and r["task_id_acc"] == best
    # class-IL accuracy can only lose what task routing loses, never more than the task-IL
    assert 0.9 <= r["class_il_acc"] <= r["task_id_acc"]


def test_permuted_digits_ten_tasks(tmp_path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    # 8 epochs, not 30: the router looks at the inputs, and class-IL accuracy only needs
    # the tasks good enough (measured: task-ID 1.0, class-IL 0.96; a quarter of the time)
    train("permuted-digits", "supsup", run, n_tasks=10, hparams={"epochs": 8}, log=_quiet)
    bundle_run(run, bundle)
    stream = permuted_digits(10, seed=0)
    r = evaluate_routing(bundle, _data(stream), timing=False)
    assert r["task_id_acc"] >= 0.95
    assert r["class_il_acc"] >= 0.8


def test_unknown_inputs_and_threshold(trained, digits):
    bundle = trained("supsup")[1]
    rt = Runtime(bundle)
    router = load_router(rt.bundle)
    noise = np.random.default_rng(0).random((200, 64), dtype=np.float32)
    assert (router.decide(rt, noise).task == UNKNOWN).mean() >= 0.95
    x = digits.tasks[3].x_test.reshape(-1, 64)
    d = router.decide(rt, x, threshold=0.5)
    assert ((d.task == 3) | (d.task == UNKNOWN)).mean() >= 0.95
    # the threshold decides: above every confidence -> all unknown; 0 -> none by confidence
    assert (router.decide(rt, x, threshold=1.01).task == UNKNOWN).all()
    d0 = router.decide(rt, x, threshold=0.0)
    assert np.array_equal(d0.task[d0.task != UNKNOWN], d0.best[d0.task != UNKNOWN])
    assert ((d.confidence >= 0.5) | (d.task == UNKNOWN)).all()
    # a configured generalist task takes the unknowns instead
    fb = router.decide(rt, noise, fallback=0)
    assert (fb.task[(router.decide(rt, noise).task == UNKNOWN)] == 0).all()


def test_held_out_class_is_mostly_unknown(tmp_path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train("split-digits", "supsup", run, n_tasks=4, log=_quiet)
    bundle_run(run, bundle)
    from edgecl.models.data import split_digits

    s = split_digits(0)
    r = evaluate_routing(bundle, _data(s)[:4], unknown=[("8-9", s.tasks[4].x_test)], timing=False)
    # digits 8/9 resemble known ones (3 vs 8, 7 vs 9): flagged more often than known digits
    fb = r["routers"]["prototype"]["fallback"]
    assert fb["unknown_rate"]["8-9"] > fb["known_rejected_rate"]


def test_confidence_is_calibrated(trained, digits):
    rt = Runtime(trained("supsup")[1])
    router = load_router(rt.bundle)
    conf, correct = [], []
    for t, task in enumerate(digits.tasks):
        d = router.decide(rt, task.x_test.reshape(-1, 64), threshold=0.0)
        conf.append(d.confidence)
        correct.append(d.best == t)
    conf, correct = np.concatenate(conf), np.concatenate(correct)
    assert abs(conf.mean() - correct.mean()) < 0.05  # mean confidence ≈ accuracy


def test_adding_a_task_updates_routers_without_old_data(tmp_path, trained, digits):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    shutil.copytree(trained("supsup")[0], run)
    train("split-digits", "supsup", tmp_path / "run4", n_tasks=4, log=_quiet)
    bundle_run(tmp_path / "run4", bundle)
    before = load_router(Bundle.open(bundle), "prototype")
    bundle_run(run, bundle, routers=False)  # task 5 arrives; the routers are now stale
    with pytest.raises(RouterError, match="covers tasks"):
        load_router(Bundle.open(bundle))
    new = digits.tasks[4]
    update_routers(bundle, [(new.name, digits.tasks[4].x_train, new.y_train)])  # new data only
    after = load_router(Bundle.open(bundle), "prototype")
    assert after.tasks == before.tasks + [new.name]
    assert np.array_equal(after.means[: len(before.means)], before.means)  # old stats kept
    r = evaluate_routing(bundle, _data(digits), timing=False)
    assert r["routers"]["prototype"]["task_id_acc"] >= 0.95


def test_router_state_round_trip():
    r = PrototypeRouter()
    r.tasks, r.temperature, r.novelty = ["a"], 2.5, [-3.0]
    r.means, r.counts = np.ones((2, 3)), np.array([4.0, 5.0])
    r.owner, r.scatter = np.array([0, 0]), np.eye(3)
    arrays, meta = r.state()
    back = PrototypeRouter.from_state(arrays, meta)
    assert back.tasks == ["a"] and back.temperature == 2.5 and back.novelty == [-3.0]
    assert np.array_equal(back.scatter, r.scatter)


def test_cli_infer_routes_and_eval_reports(trained, digits, tmp_path, capsys):
    bundle = str(trained("hat")[1])
    x = np.concatenate([digits.tasks[2].x_test[:20], np.random.default_rng(0).random((2, 1, 8, 8))])
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    assert main(["infer", bundle, "--input", str(tmp_path / "x.npy"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["router"] == "prototype"
    assert sum(o["task"] == "digits-4-5" for o in out["inputs"][:20]) >= 18
    assert [o["task"] for o in out["inputs"][20:]] == ["unknown"] * 2
    want = np.asarray(digits.tasks[2].classes)[digits.tasks[2].y_test[:20]].tolist()
    assert sum(o["prediction"] == w for o, w in zip(out["inputs"][:20], want, strict=True)) >= 18
    assert main(["infer", bundle, "--input", str(tmp_path / "x.npy"), "--router", "gradient"]) == 0
    assert "router gradient" in capsys.readouterr().out
    assert main(["infer", bundle, "--input", str(tmp_path / "x.npy"), "--router", "nope"]) == 2
    assert "no router 'nope'" in capsys.readouterr().err
    assert main(["eval", bundle, "--data", "split-digits", "--json", str(tmp_path / "e.json")]) == 0
    r = json.loads((tmp_path / "e.json").read_text())
    for key in ("task_id_acc", "class_il_acc", "router_overhead"):
        assert key in r
    assert r["router_overhead"] > 0
    assert "noise" in r["routers"]["prototype"]["fallback"]["unknown_rate"]


@pytest.mark.parametrize("impl", ["native", "numpy"])
def test_prototype_fused_decide_matches_generic_decide(trained, digits, impl):
    """PrototypeRouter.decide (one route_prototype call) decides as the shared numpy
    decide over prototype.scores does: same best and task, scores to float32 rounding."""
    from edgecl import kernels
    from edgecl.runtime.routers.base import Router

    rt = Runtime(trained("supsup")[1])
    router = load_router(rt.bundle)
    assert isinstance(router, PrototypeRouter)
    router._prepare()
    router._route = kernels.prepare_route_prototype(*router._fused, impl=impl)
    rng = np.random.default_rng(3)
    xs = [t.x_test.reshape(-1, 64).astype(np.float32) for t in digits.tasks]
    xs += [rng.random((200, 64), dtype=np.float32), xs[0][:1],
           digits.tasks[2].x_test[:7].astype(np.float32)]  # (7, 1, 8, 8): reshaped
    for x in xs:
        for threshold, fallback in [(0.5, None), (0.0, None), (0.9, 0), (1.01, None)]:
            got = router.decide(rt, x, threshold, fallback)
            want = Router.decide(router, rt, x, threshold, fallback)
            assert got.scores.shape == want.scores.shape == (len(x), len(router.tasks))
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-3)
            assert np.array_equal(got.best, want.best)
            np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-4, atol=1e-6)
            near = np.abs(want.confidence - threshold) < 1e-4
            assert np.array_equal(got.task[~near], want.task[~near])
    empty = router.decide(rt, np.zeros((0, 1, 8, 8), np.float32))  # the generic path cannot
    assert empty.task.shape == (0,) and empty.scores.shape == (0, len(router.tasks))
    # float64 input keeps the generic path (its float64 arithmetic)
    x64 = xs[0][:5].astype(np.float64)
    assert np.array_equal(router.decide(rt, x64).scores, Router.decide(router, rt, x64).scores)
    # a decision's arrays are its own: a later call does not overwrite them
    d1 = router.decide(rt, xs[0][:3])
    keep = (d1.task.copy(), d1.best.copy(), d1.confidence.copy(), d1.scores.copy())
    router.decide(rt, xs[1][:3])
    for a, b in zip((d1.task, d1.best, d1.confidence, d1.scores), keep, strict=True):
        assert np.array_equal(a, b)


class _Rt:
    """What a view needs of a runtime: the input shape, the graph, the first task's parameters."""

    def __init__(self, graph, params=None) -> None:
        from types import SimpleNamespace

        self.input_shape = tuple(graph.input_shape)
        self.bundle = SimpleNamespace(graph=graph, tasks=[{"name": "t0"}])
        self._active = SimpleNamespace(params=params or {})

    def activate(self, task):
        return self._active


def _conv_graph(size, stride, pads, dil, group, after=("Clip",)):
    from edgecl.runtime.graph import Graph, Node, Param, Value

    params = [Param("w", (12, 3 // group, 3, 3), "weight"), Param("b", (12,), "bias")]
    nodes = [Node("c", "Conv", ("x", "w", "b"), ("c",),
                  {"strides": [stride, stride], "pads": pads, "dilations": [dil, dil], "group": group})]
    for op in after:
        attrs = {"min": 0.0, "max": 6.0} if op == "Clip" else {}
        nodes.append(Node(op.lower(), op, (nodes[-1].outputs[0],), (op.lower(),), attrs))
    last = nodes[-1].outputs[0]
    nodes += [Node("g", "GlobalAveragePool", (last,), ("g",)), Node("f", "Flatten", ("g",), ("f",))]
    return Graph([Value("x", (3, size, size))], params, nodes, "f"), last


def _flat_graph(shape):
    from edgecl.runtime.graph import Graph, Node, Value

    return Graph([Value("x", tuple(shape))], [], [Node("f", "Flatten", ("x",), ("f",))], "f")


def test_sampled_view_is_the_first_layer_exactly():
    """Routers stored with the old "sampled" view (the first Conv + its activation at
    SAMPLES x SAMPLES output positions, mean-pooled) compute it as before."""
    from edgecl.runtime import executor
    from edgecl.runtime.routers import view as V

    rng = np.random.default_rng(0)
    for size, stride, pads, dil, group in [(32, 1, [1, 1, 1, 1], 1, 1), (97, 2, [0, 1, 1, 0], 1, 1),
                                           (49, 2, [2, 2, 3, 2], 2, 3)]:
        g, _ = _conv_graph(size, stride, pads, dil, group)
        w = {"w": rng.standard_normal((12, 3 // group, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(12).astype(np.float32)}
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        view = V.View("sampled", "clip", 4)
        full = executor.value(g, w, x, "clip")
        rows = np.linspace(0, full.shape[2] - 1, V.SAMPLES).round().astype(int)
        cols = np.linspace(0, full.shape[3] - 1, V.SAMPLES).round().astype(int)
        want = full[:, :, rows][:, :, :, cols]
        np.testing.assert_allclose(V._sampled(g, w, x, view), want, atol=1e-5)
        pooled = V.compute(view, _Rt(g, w), x)
        np.testing.assert_allclose(pooled, want.reshape(2, 12, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(2, -1),
                                   atol=1e-5)


@pytest.mark.parametrize("after", [("Clip",), ("Relu",), ("Clip", "Sigmoid")])
def test_patches_view_is_the_first_layer_exactly(after):
    """Large images: the default view is the first Conv (+ its element-wise ops) at a grid
    of output positions (padding included), summed over cells — the full layer's values
    there, less at most a constant (a bias folded into a ReLU's or Clip's bounds), which
    no Mahalanobis distance sees; at most PATCH_DIMS values."""
    from edgecl.runtime import executor
    from edgecl.runtime.routers import view as V

    rng = np.random.default_rng(0)
    for size, stride, pads, dil, group in [(32, 1, [1, 1, 1, 1], 1, 1), (97, 2, [0, 1, 1, 0], 1, 1),
                                           (49, 2, [2, 2, 3, 2], 2, 3)]:
        g, last = _conv_graph(size, stride, pads, dil, group, after)
        w = {"w": rng.standard_normal((12, 3 // group, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(12).astype(np.float32)}
        view = V.choose(g)
        assert view.kind == "patches" and view.value == last and view.samples % view.grid == 0
        assert 12 * view.grid ** 2 <= V.PATCH_DIMS and view.samples >= V.PATCH_SAMPLES
        x = rng.standard_normal((5, 3, size, size)).astype(np.float32)
        got = V.compute(view, _Rt(g, w), x)
        full = executor.value(g, w, x, last)
        s, k = view.samples, view.samples // view.grid
        pos = [np.linspace(0, n - 1, s).round().astype(int) for n in full.shape[2:]]  # the old view's
        sub = full[:, :, pos[0]][:, :, :, pos[1]]
        want = sub.reshape(5, 12, view.grid, k, view.grid, k).sum(axis=(3, 5)).transpose(0, 2, 3, 1)
        diff = got - want.reshape(5, -1)
        assert got.dtype == np.float32 and got.shape == (5, 12 * view.grid ** 2)
        np.testing.assert_allclose(diff, np.broadcast_to(diff[:1], diff.shape), atol=2e-5)
        if after[-1] == "Sigmoid":  # an op after the activation: the true values, no offset
            np.testing.assert_allclose(diff, 0, atol=2e-5)
        # one sample at a time computes what a batch does (fit and decide agree)
        np.testing.assert_allclose(V.compute(view, _Rt(g, w), x[:1]), got[:1], atol=2e-5)


def test_patches_view_through_an_input_normalization():
    """(x - mean) * inv_std per channel before the first Conv (EfficientNet-Lite0's stem):
    still a patches view (not the whole first layer), the layer's values less a constant;
    a constant that varies along a spatial axis is no per-channel normalization: no
    patches view."""
    from edgecl.runtime import executor
    from edgecl.runtime.graph import Graph, Node, Param
    from edgecl.runtime.routers import view as V

    rng = np.random.default_rng(1)
    base, last = _conv_graph(64, 2, [0, 0, 1, 1], 1, 1, ("Relu",))
    conv = base.nodes[0]
    pre = [Node("sub", "Sub", ("x", "mean"), ("sub",)), Node("mul", "Mul", ("sub", "inv_std"), ("mul",))]
    stem = Node(conv.name, "Conv", ("mul", *conv.inputs[1:]), conv.outputs, conv.attrs)
    nodes = [*pre, stem, *base.nodes[1:]]
    for mean_shape, ok in [((3, 1, 1), True), ((1, 3, 1, 1), True), ((1,), True), ((1, 1, 64), False)]:
        params = [*base.params.values(), Param("mean", mean_shape, "const"),
                  Param("inv_std", (1, 3, 1, 1), "const")]
        g = Graph(list(base.inputs), params, nodes, "f")
        view = V.choose(g)
        assert (view.kind == "patches") == ok, (mean_shape, view)
        if not ok:
            continue
        w = {"w": rng.standard_normal((12, 3, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(12).astype(np.float32),
             "mean": rng.uniform(0, 1, mean_shape).astype(np.float32),
             "inv_std": rng.uniform(2, 5, (1, 3, 1, 1)).astype(np.float32)}
        x = rng.uniform(0, 1, (4, 3, 64, 64)).astype(np.float32)
        got = V.compute(view, _Rt(g, w), x)
        full = executor.value(g, w, x, last)
        s, k = view.samples, view.samples // view.grid
        pos = [np.linspace(0, n - 1, s).round().astype(int) for n in full.shape[2:]]
        sub = full[:, :, pos[0]][:, :, :, pos[1]]
        want = sub.reshape(4, 12, view.grid, k, view.grid, k).sum(axis=(3, 5)).transpose(0, 2, 3, 1)
        diff = got - want.reshape(4, -1)
        np.testing.assert_allclose(diff, np.broadcast_to(diff[:1], diff.shape), atol=1e-4)

def test_pooled_view_of_a_mid_size_input():
    """Inputs of VIEW_DIMS..RAW_LIMIT values (a 49x10 MFCC, 640 audio features) are summed
    over cells to at most VIEW_DIMS values (the routing product ~d², not 490² or 640²);
    the coarsest axis as fine as it can be; small inputs (an 8x8 digit) stay raw."""
    from edgecl.runtime.routers import view as V

    assert V.choose(_flat_graph((1, 8, 8))) == V.View("input")
    assert V.choose(_flat_graph((64,))) == V.View("input")
    assert V.choose(_flat_graph((1, 49, 10))) == V.View("pooled", cells=(1, 7, 10))  # 7 frames of 10 MFCCs
    assert V.choose(_flat_graph((640,))) == V.View("pooled", cells=(160,))
    rng = np.random.default_rng(0)
    for shape in [(1, 49, 10), (640,), (1, 13, 17), (3, 10, 11), (331,)]:
        view = V.choose(_flat_graph(shape))
        assert view.kind == "pooled" and math.prod(view.cells) <= V.VIEW_DIMS
        assert V.View.from_json(view.to_json()) == view
        x = rng.standard_normal((4, *shape)).astype(np.float32)
        got = V.compute(view, _Rt(_flat_graph(shape)), x)
        want = x.astype(np.float64)
        for axis, (n, c) in enumerate(zip(shape, view.cells, strict=True)):
            b = [round(i * n / c) for i in range(c + 1)]
            want = np.stack([want.take(range(b[i], b[i + 1]), axis=axis + 1).sum(axis=axis + 1)
                             for i in range(c)], axis=axis + 1)
        assert got.dtype == np.float32 and got.shape == (4, math.prod(view.cells))
        np.testing.assert_allclose(got, want.reshape(4, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 49, 10), (640,)])
def test_pooled_view_routes_split_digits(digits, shape):
    """Split-Digits fitted to a ds-cnn (1x49x10) or fc-autoencoder (640) input: the pooled
    view (70 or 160 values) still tells the five tasks apart and rejects noise
    (measured, docs/routing.md: 0.987 / 0.982, as the raw 490 / 640 values' 0.982)."""
    from edgecl.models.data import fit_input
    from edgecl.runtime.routers import view as V

    rt = _Rt(_flat_graph(shape))
    r = PrototypeRouter()
    for t in digits.tasks:
        r.add_task(rt, t.name, fit_input(t.x_train, shape), t.y_train)
    assert r.view.kind == "pooled" and r._prepare()[0].shape[0] <= V.VIEW_DIMS
    hits = np.concatenate([r.decide(rt, fit_input(t.x_test, shape)).best == i
                           for i, t in enumerate(digits.tasks)])
    assert hits.mean() >= 0.97
    top = float(digits.tasks[0].x_train.max())  # noise over the digits' range
    noise = np.random.default_rng(0).random((200, *shape), dtype=np.float32) * top
    assert (r.decide(rt, noise).task == UNKNOWN).mean() >= 0.95


@pytest.mark.parametrize("shape", [(1, 49, 10), (640,)])
def test_pooled_router_pools_inside_the_kernel(digits, shape):
    """decide pools in the route kernel, from the raw input: byte for byte the kernel on
    the view the router was fitted on (view.compute), batch 1 as a batch; the numpy twin
    and the generic numpy decide agree; each decision's arrays are its own."""
    from edgecl import kernels
    from edgecl.models.data import fit_input
    from edgecl.runtime.routers import view as V
    from edgecl.runtime.routers.base import Router

    rt = _Rt(_flat_graph(shape))
    r = PrototypeRouter()
    for t in digits.tasks[:3]:
        r.add_task(rt, t.name, fit_input(t.x_train, shape), t.y_train)
    assert r.view.kind == "pooled"
    rng = np.random.default_rng(1)
    x = np.concatenate([fit_input(t.x_test[:40], shape) for t in digits.tasks]).astype(np.float32)
    x = np.concatenate([x, rng.random((20, *shape), dtype=np.float32) * float(x.max())])
    plain = kernels.prepare_route_prototype(*r._prepare())
    for threshold, fallback in [(0.5, None), (0.9, 1)]:
        got = r.decide(rt, x, threshold, fallback)
        v = V.compute(r.view, rt, x)
        unknown_task = UNKNOWN if fallback is None else fallback
        want = plain.decide(v, r.temperature, min(r.novelty), threshold, unknown_task)
        for k, w in zip(("task", "confidence", "best", "scores"), want, strict=True):
            assert getattr(got, k).tobytes() == w.tobytes(), k
        ones = [r.decide(rt, x[i:i + 1], threshold, fallback) for i in range(len(x))]
        for k in ("task", "confidence", "best", "scores"):
            assert np.concatenate([getattr(o, k) for o in ones]).tobytes() == getattr(got, k).tobytes()
        assert len({id(o.scores) for o in ones}) == len(ones)
        generic = Router.decide(r, rt, x, threshold, fallback)
        assert (generic.best == got.best).mean() >= 0.99
        np.testing.assert_allclose(got.scores, generic.scores, rtol=1e-4, atol=1e-2)
    got = r.decide(rt, x)
    r._route = kernels.prepare_route_prototype(*r._fused, impl="numpy")  # the twin, pool included
    twin = r.decide(rt, x)
    assert r._hot[3].__qualname__.startswith("prepare_route_prototype") and r._route.impl == "numpy"
    assert np.array_equal(twin.best, got.best) and np.array_equal(twin.task == UNKNOWN, got.task == UNKNOWN)
    np.testing.assert_allclose(twin.scores, got.scores, rtol=1e-5, atol=1e-3)


def test_routers_stored_with_old_views_decide_as_before(digits):
    """A router stored with an old view ("input" on a 490-value input, "sampled", or no
    view at all) keeps it on loading, and decides exactly as that view always did."""
    from edgecl.models.data import fit_input
    from edgecl.runtime.routers import view as V
    from edgecl.runtime.routers.base import Router

    assert V.View("sampled", "relu", 4).to_json() == '{"kind": "sampled", "value": "relu", "grid": 4}'
    assert V.View("input").to_json() == '{"kind": "input", "value": "", "grid": 0}'
    assert V.View.from_json(None) == V.View("input")
    rng = np.random.default_rng(0)
    g, _ = _conv_graph(32, 1, [1, 1, 1, 1], 1, 1)
    w = {"w": rng.standard_normal((12, 3, 3, 3)).astype(np.float32),
         "b": rng.standard_normal(12).astype(np.float32)}
    cases = [((1, 49, 10), _Rt(_flat_graph((1, 49, 10))), V.View("input")),
             ((3, 32, 32), _Rt(g, w), V.View("sampled", "clip", 4))]
    for shape, rt, old in cases:
        r = PrototypeRouter()
        r.view = old
        for t in digits.tasks[:3]:
            r.add_task(rt, t.name, fit_input(t.x_train, shape), t.y_train)
        arrays, meta = r.state()
        if old.kind == "input":
            meta.pop("view")  # stored before views existed
        back = PrototypeRouter.from_state(arrays, meta)
        assert back.view == old
        x = np.concatenate([fit_input(t.x_test[:30], shape) for t in digits.tasks]).astype(np.float32)
        got, want = back.decide(rt, x), r.decide(rt, x)
        for k in ("task", "best", "confidence", "scores"):
            assert np.array_equal(getattr(got, k), getattr(want, k))
        # and that is the old view's decision: raw values / mean-pooled sampled layer
        flat = x.reshape(len(x), -1) if old.kind == "input" else \
            V._sampled(g, w, x, old).reshape(len(x), 12, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(len(x), -1)
        np.testing.assert_allclose(V.compute(old, rt, x), flat, atol=1e-5)
        ref = Router.decide(back, rt, x.astype(np.float64))
        assert (ref.best == got.best).mean() >= 0.99


def test_patches_view_decides_as_the_old_sampled_view(digits):
    """At the old view's positions and grid, a patches view is the old sampled view times
    a constant plus a constant (sums, not means; the bias in the activation's bounds), so
    the router's decisions and novelty floors are the same: its speed costs no accuracy."""
    from edgecl.models.data import fit_input
    from edgecl.runtime.routers import view as V

    rng = np.random.default_rng(0)
    g, last = _conv_graph(32, 1, [1, 1, 1, 1], 1, 1, ("Relu",))
    w = {"w": rng.standard_normal((12, 3, 3, 3)).astype(np.float32),
         "b": rng.standard_normal(12).astype(np.float32)}
    rt = _Rt(g, w)
    routers = []
    for view in (V.View("sampled", last, 4), V.View("patches", last, 4, V.SAMPLES)):
        r = PrototypeRouter()
        r.view = view
        for t in digits.tasks:
            r.add_task(rt, t.name, fit_input(t.x_train, (3, 32, 32)), t.y_train)
        routers.append(r)
    old, new = routers
    np.testing.assert_allclose(new.novelty, old.novelty, rtol=1e-4)
    x = np.concatenate([fit_input(t.x_test, (3, 32, 32)) for t in digits.tasks]).astype(np.float32)
    a, b = old.decide(rt, x), new.decide(rt, x)
    assert (a.best == b.best).mean() >= 0.995 and (a.task == b.task).mean() >= 0.99
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-3, atol=1e-2)
