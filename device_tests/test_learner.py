"""On-device learning of a small new task under a small RAM budget; old tasks unchanged.

Needs ``edgecl.runtime.learn`` (the on-device learner). Where it is missing this test
fails with that message: a device without its learner is not a passing device.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from edgecl.runtime.bundle import Bundle
from edgecl.runtime.session import Runtime


def test_learn_a_new_task_under_a_ram_budget(bundle_path, tmp_path, request):
    if importlib.util.find_spec("edgecl.runtime.learn") is None:
        pytest.fail("pending: this edgecl has no on-device learner (edgecl.runtime.learn / `edgecl learn`); "
                    "the learning check cannot run")
    from edgecl.runtime.learn import learn

    work = tmp_path / "bundle"
    shutil.copytree(bundle_path, work, ignore=shutil.ignore_patterns(".lock"))
    before = Bundle.open(work)
    shape = tuple(before.model["input_shape"])
    rng = np.random.default_rng(7)
    x = rng.random((96, *shape), dtype=np.float32)
    score = x.reshape(len(x), -1)[:, : x[0].size // 2].mean(axis=1)
    y = np.where(score > np.median(score), 11, 10).astype(np.int64)  # two new classes
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=x, y=y)
    probe = rng.random((8, *shape), dtype=np.float32)
    old = {t: Runtime(before).logits(probe, t).tobytes() for t in before.task_names}
    ram_mb = float(request.config.getoption("--learn-ram-mb"))
    report = learn(str(work), "device-new", str(samples), method="supsup", epochs=2, ram_mb=ram_mb,
                   quiet=True)
    assert report.get("status") == "committed", report
    after = Bundle.open(work)
    assert "device-new" in after.task_names
    rt = Runtime(after)
    for t, raw in old.items():
        assert rt.logits(probe, t).tobytes() == raw, f"task {t} changed: forgetting"
    assert np.isfinite(rt.logits(probe, "device-new")).all()
