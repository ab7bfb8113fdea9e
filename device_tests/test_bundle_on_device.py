"""Checks of a deployed bundle, on the device itself (numpy runtime, no torch)."""

from __future__ import annotations

import sys

import numpy as np

from edgecl.runtime import Bundle, Runtime


def test_bundle_verifies(bundle_path):
    b = Bundle.open(bundle_path)
    assert b.tasks, "the bundle holds no task"


def test_every_task_runs_and_is_deterministic(bundle_path):
    rt = Runtime(bundle_path)
    x = np.random.default_rng(0).random((8, *rt.input_shape), dtype=np.float32)
    for task in rt.tasks:
        a = rt.logits(x, task)
        info = rt.bundle.task(task)
        assert a.shape == (8, info["n_classes"]) and np.isfinite(a).all()
        rt._cache.clear()  # activate again from the mapped backbone: same bytes
        assert rt.logits(x, task).tobytes() == a.tobytes()


def test_no_torch_on_the_device_path(bundle_path):
    Runtime(bundle_path)
    assert "torch" not in sys.modules
