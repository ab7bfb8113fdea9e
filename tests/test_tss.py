"""TSS (sub-network discovery and soft-masking): accuracy and exact zero forgetting through
the runtime, scores inherited from the previous task, soft-masked score updates, the
figures a task records, and a zoo model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgecl.compiler.from_run import bundle_run
from edgecl.models.data import load_spec, permuted_digits, split_digits
from edgecl.models.methods import METHODS
from edgecl.models.methods.tss import TSS, normalize_importance
from edgecl.models.training import load_run, train
from edgecl.runtime import Runtime
from edgecl.runtime.evaluate import evaluate

from . import test_zoo_methods as zoo
from .conftest import _quiet


def _test_data(stream):
    return [(t.name, t.x_test, t.y_test) for t in stream.tasks]


def _logit_bytes(method_obj, stream, k):
    return [method_obj.logits(t.x_test, j).numpy().tobytes() for j, t in enumerate(stream.tasks[:k])]


def test_tss_is_a_weight_bits_method():
    assert METHODS["tss"] is TSS and TSS.kind == "weight_bits"


def test_split_digits_accuracy_zero_bwt_and_metrics_through_runtime(trained, digits):
    run_dir, bundle = trained("tss")
    r = evaluate(bundle, _test_data(digits))
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0
    for i, row in enumerate(r["acc_matrix"]):
        for j in range(i):
            assert row[j] == r["acc_matrix"][j][j]
    assert r["fwt"] is not None
    assert r["bits_per_weight_per_task"] == [1.0] * 5  # one bit per backbone weight, no more
    tasks = json.loads((bundle / "manifest.json").read_text())["tasks"]
    m = [t["metrics"] for t in tasks]
    assert all(x["tss_density"] == 0.5 for x in m)
    assert m[0]["tss_damped_gt50"] == 0.0 and m[0]["tss_scores_from_prev"] == 0.0
    # importance only grows, and later tasks are soft-masked on part of their scores
    after = [x["tss_mean_importance_after"] for x in m]
    assert all(0 < a <= b <= 1 for a, b in zip(after, after[1:], strict=False))
    assert all(0 < x["tss_damped_gt50"] < 1 and x["tss_scores_from_prev"] == 1.0 for x in m[1:])
    # the figures survive the run's state (the bundle is written from a loaded run)
    run = load_run(run_dir)
    for t, x in enumerate(m):
        assert set(x) >= {"host_acc", "before_acc", "init_acc"}
        assert run.method.task_metrics(t) == {k: v for k, v in x.items() if k.startswith("tss_")}


def test_learning_a_task_leaves_old_outputs_byte_identical(tmp_path):
    k = 3
    stream = split_digits(0)
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    hp = {"epochs": 5}
    run = train("split-digits", "tss", run_dir, n_tasks=k, hparams=hp, log=_quiet)
    before_torch = _logit_bytes(run.method, stream, k)
    assert bundle_run(run_dir, bundle, routers=False) == [1, 2, 3]
    rt = Runtime(bundle)
    before_rt = [rt.logits(t.x_test.reshape(-1, *rt.input_shape), t.name).tobytes() for t in stream.tasks[:k]]
    backbone_before = (bundle / rt.bundle.backbone_file()).read_bytes()

    run = train("split-digits", "tss", run_dir, n_tasks=k + 1, hparams=hp, log=_quiet)  # resumes
    assert _logit_bytes(run.method, stream, k) == before_torch
    assert bundle_run(run_dir, bundle, routers=False) == [4]
    rt2 = Runtime(bundle)
    after_rt = [rt2.logits(t.x_test.reshape(-1, *rt.input_shape), t.name).tobytes() for t in stream.tasks[:k]]
    assert after_rt == before_rt
    assert rt2.bundle.backbone_file() == rt.bundle.backbone_file()
    assert (bundle / rt2.bundle.backbone_file()).read_bytes() == backbone_before
    # the new task runs through the bundle as in PyTorch
    x = stream.tasks[k].x_test.reshape(-1, *rt.input_shape)
    np.testing.assert_allclose(rt2.logits(x, stream.tasks[k].name), run.method.logits(x, k).numpy(),
                               atol=1e-5, rtol=0)


def test_scores_start_from_the_previous_task_and_important_ones_are_held():
    """Task 2 starts from task 1's scores; a score of importance 1 never moves, one of
    importance 0 moves freely (soft-masking scales each update by 1 - importance)."""
    from edgecl.models import architectures

    stream = split_digits(0)
    graph = architectures.build("mlp", stream.input_shape, bias=False)
    m = TSS(graph, seed=0, epochs=2)
    m.learn(stream.tasks[0])
    first, second = m.sites[0].node, m.sites[1].node
    m.importance[first] = torch.ones_like(m.importance[first])
    m.importance[second] = torch.zeros_like(m.importance[second])
    m.learn(stream.tasks[1])
    assert torch.equal(m.scores[1][first], m.scores[0][first])
    assert not torch.equal(m.scores[1][second], m.scores[0][second])
    assert m.task_metrics(1)["tss_gate_overlap_prev"] > 0.5  # inherited, not drawn afresh
    # ablation: soft-masking off moves every layer's scores
    off = TSS(graph, seed=0, epochs=2, soft=0)
    off.learn(stream.tasks[0])
    off.importance[first] = torch.ones_like(off.importance[first])
    off.learn(stream.tasks[1])
    assert not torch.equal(off.scores[1][first], off.scores[0][first])


@pytest.mark.parametrize("mode", [0, 1])
def test_importance_is_normalized_per_layer_into_0_1(mode):
    g = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) ** 4
    out = normalize_importance(g, mode)
    assert out.shape == g.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > 0.5
    assert torch.equal(normalize_importance(torch.zeros(5), mode), torch.zeros(5))


def test_permuted_digits_three_tasks(tmp_path):
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train("permuted-digits", "tss", run_dir, n_tasks=3, hparams={"epochs": 10}, log=_quiet)
    bundle_run(run_dir, bundle, routers=False)
    r = evaluate(bundle, _test_data(permuted_digits(3, 0)))
    assert r["acc"] >= 0.95, r["acc_matrix"]
    assert r["bwt"] == 0.0


def test_ds_cnn_zero_forgetting(tmp_path, monkeypatch):
    monkeypatch.setitem(zoo.QUICK, "tss", {"epochs": 1, "batch_size": 32})
    zoo.check_zero_forgetting("ds-cnn", "tss", tmp_path)


@pytest.mark.slow
def test_ds_cnn_split_digits_accuracy(tmp_path):
    """The full Split-Digits stream on DS-CNN (a random signed-constant backbone)."""
    from edgecl.models.importer import import_model

    graph, _ = import_model("ds-cnn")
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train("split-digits", "tss", run_dir, graph=graph, log=_quiet)
    bundle_run(run_dir, bundle, routers=False)
    stream = load_spec(load_run(run_dir).config["stream"])
    r = evaluate(bundle, _test_data(stream))
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0
