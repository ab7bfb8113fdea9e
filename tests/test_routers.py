"""Task-agnostic inference: routers, calibrated confidence, unknown inputs, updates."""

from __future__ import annotations

import json
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


def test_sampled_view_is_the_first_layer_exactly():
    """Large image inputs: the router looks at the first Conv (+ its activation) at a grid
    of output positions; those values equal the full layer's at the same positions."""
    from edgecl.runtime import executor
    from edgecl.runtime.graph import Graph, Node, Param, Value
    from edgecl.runtime.routers import view as V

    rng = np.random.default_rng(0)
    for size, stride, pads, dil, group in [(32, 1, [1, 1, 1, 1], 1, 1), (97, 2, [0, 1, 1, 0], 1, 1),
                                           (49, 2, [2, 2, 3, 2], 2, 3)]:
        params = [Param("w", (12, 3 // group, 3, 3), "weight"), Param("b", (12,), "bias")]
        nodes = [Node("c", "Conv", ("x", "w", "b"), ("c",),
                      {"strides": [stride, stride], "pads": pads, "dilations": [dil, dil], "group": group}),
                 Node("r", "Clip", ("c",), ("r",), {"min": 0.0, "max": 6.0}),
                 Node("g", "GlobalAveragePool", ("r",), ("g",)), Node("f", "Flatten", ("g",), ("f",))]
        g = Graph([Value("x", (3, size, size))], params, nodes, "f")
        w = {"w": rng.standard_normal((12, 3 // group, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(12).astype(np.float32)}
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        view = V.choose(g)
        assert view.kind == "sampled" and view.value == "r"
        full = executor.value(g, w, x, "r")
        rows = np.linspace(0, full.shape[2] - 1, V.SAMPLES).round().astype(int)
        cols = np.linspace(0, full.shape[3] - 1, V.SAMPLES).round().astype(int)
        np.testing.assert_allclose(V._sampled(g, w, x, view), full[:, :, rows][:, :, :, cols], atol=1e-5)
