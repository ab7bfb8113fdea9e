"""The three methods (and Piggyback): accuracy through the runtime, exact zero forgetting,
runtime/PyTorch parity, storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.compiler.from_run import bundle_run
from edgecl.models.data import split_digits
from edgecl.models.training import load_run, train
from edgecl.runtime import Runtime
from edgecl.runtime.evaluate import evaluate

from .conftest import METHODS, _quiet


def _test_data(stream):
    return [(t.name, t.x_test, t.y_test) for t in stream.tasks]


@pytest.mark.parametrize("method", METHODS)
def test_split_digits_accuracy_and_zero_bwt_through_runtime(trained, digits, method):
    _, bundle = trained(method)
    r = evaluate(bundle, _test_data(digits))
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0
    for i, row in enumerate(r["acc_matrix"]):  # every row measured on its own version
        assert all(a is not None for a in row[: i + 1]) and all(a is None for a in row[i + 1:])
        for j in range(i):
            assert row[j] == r["acc_matrix"][j][j]
    assert r["fwt"] is not None


@pytest.mark.parametrize("method", ["packnet", "supsup"])
def test_weight_level_tasks_add_at_most_one_bit_per_weight(trained, digits, method):
    r = evaluate(trained(method)[1], _test_data(digits))
    assert len(r["bits_per_weight_per_task"]) == 5
    assert all(0 < b <= 1.0 for b in r["bits_per_weight_per_task"])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_runtime_matches_pytorch(trained, run_of, digits, method, arch):
    run = run_of(method, arch)
    rt = Runtime(trained(method, arch)[1])
    for t, task in enumerate(digits.tasks):
        x = task.x_test.reshape(len(task.x_test), *rt.input_shape)
        want = run.method.logits(x, t).numpy()
        got = rt.logits(x, task.name)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _logit_bytes(method_obj, stream, k):
    return [method_obj.logits(t.x_test, j).numpy().tobytes() for j, t in enumerate(stream.tasks[:k])]


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_learning_a_task_leaves_old_outputs_byte_identical(tmp_path, method, arch):
    """Learn task k+1: tasks 1..k give the same bytes in PyTorch and through the bundle."""
    k = 3
    stream = split_digits(0)
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    run = train("split-digits", method, run_dir, n_tasks=k, arch=arch, log=_quiet)
    before_torch = _logit_bytes(run.method, stream, k)
    assert bundle_run(run_dir, bundle) == [1, 2, 3]  # one version per task, routers included
    rt = Runtime(bundle)
    shape = rt.input_shape
    before_rt = [rt.logits(t.x_test.reshape(-1, *shape), t.name).tobytes() for t in stream.tasks[:k]]
    backbone_before = (bundle / rt.bundle.backbone_file()).read_bytes()

    run = train("split-digits", method, run_dir, n_tasks=k + 1, arch=arch, log=_quiet)
    assert len(run.tasks) == k + 1
    assert _logit_bytes(run.method, stream, k) == before_torch
    assert bundle_run(run_dir, bundle) == [4]
    rt2 = Runtime(bundle)
    assert rt2.bundle.version == 4 and len(rt2.tasks) == k + 1
    after_rt = [rt2.logits(t.x_test.reshape(-1, *shape), t.name).tobytes() for t in stream.tasks[:k]]
    assert after_rt == before_rt
    # the previous version is still there and still gives the same bytes
    rt_old = Runtime(bundle, version=3)
    assert [rt_old.logits(t.x_test.reshape(-1, *shape), t.name).tobytes()
            for t in stream.tasks[:k]] == before_rt
    if method in ("supsup", "piggyback"):  # a frozen backbone is never written again
        assert rt2.bundle.backbone_file() == rt.bundle.backbone_file()
        assert (bundle / rt2.bundle.backbone_file()).read_bytes() == backbone_before


def test_packnet_masks_are_nested_and_owned_weights_frozen(run_of):
    run = run_of("packnet")
    m = run.method
    masks = [{n: (o > 0) & (o <= t + 1) for n, o in m.owner.items()} for t in range(5)]
    for t in range(4):
        for n in masks[t]:
            assert bool((masks[t][n] <= masks[t + 1][n]).all())
            assert int(masks[t + 1][n].sum()) > int(masks[t][n].sum())
    assert 0 < m.free_fraction() < 1  # capacity left for tasks learned on the device


def test_supsup_backbone_is_the_random_signed_constant(run_of):
    run = run_of("supsup")
    m = run.method
    init = m._initial_backbone()
    for k, v in m.params.items():
        assert torch.equal(v, init[k])
        assert len(torch.unique(v.abs())) == 1


def test_hat_gates_are_binary_and_units_stay_free(run_of):
    m = run_of("hat").method
    for t in range(5):
        for g in m.task_gates(t).values():
            assert set(torch.unique(g).tolist()) <= {0.0, 1.0}
    assert m.used_fraction() < 1.0


def test_training_resumes_after_a_crash(tmp_path, monkeypatch):
    """A run killed during task 3 keeps tasks 1-2; continuing ends where a clean run ends."""
    from edgecl.models.methods.supsup import SupSup

    clean = train("split-digits", "supsup", tmp_path / "clean", n_tasks=3, log=_quiet)
    calls = {"n": 0}
    original = SupSup._train_task

    def dying(self, task, gen):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, task, gen)

    monkeypatch.setattr(SupSup, "_train_task", dying)
    with pytest.raises(KeyboardInterrupt):
        train("split-digits", "supsup", tmp_path / "crashed", n_tasks=3, log=_quiet)
    monkeypatch.setattr(SupSup, "_train_task", original)
    assert len(load_run(tmp_path / "crashed").tasks) == 2
    resumed = train("split-digits", "supsup", tmp_path / "crashed", n_tasks=3, log=_quiet)
    s = split_digits(0)
    assert _logit_bytes(resumed.method, s, 3) == _logit_bytes(clean.method, s, 3)
