"""Every backend on real backbones: small zoo models, imported, masked, bundled and run by
each compiled backend (ONNX Runtime, TFLite, TVM) and the numpy reference, against
PyTorch running the same masked weights to 1e-4. (That PyTorch graph run equals the
original module: tests/test_import.py. The big models: `edgecl bench zoo`'s `check`.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.compiler.from_run import bundle_run
from edgecl.models.importer import import_model
from edgecl.models.training import load_run, train
from edgecl.runtime import Session


@pytest.mark.parametrize("name", ["ds-cnn", "resnet8"])
def test_every_backend_matches_the_pytorch_module(name, tmp_path):
    from edgecl.compiler import tflite_export
    from edgecl.compiler.onnx_export import export_bundle
    from edgecl.compiler.tvm_build import compile_bundle

    graph, weights = import_model(name)
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train("split-digits", "supsup", run_dir, n_tasks=1, graph=graph, backbone=weights,
          hparams={"epochs": 1, "batch_size": 64}, log=lambda s: None)
    bundle_run(run_dir, bundle, routers=False)
    export_bundle(bundle)
    tflite_export.export_bundle(bundle)
    compile_bundle(bundle, "host", train=False, log=lambda s: None)
    # the reference: PyTorch with the task's masked weights and head
    run = load_run(run_dir)
    masked = dict(run.method.params)
    masked.update(run.method.task_params(0))
    x = np.random.default_rng(1).random((3, *graph.input_shape), dtype=np.float32)
    with torch.no_grad():
        from edgecl.models.torchnet import features

        feats = features(graph, masked, torch.from_numpy(x))
        hw, hb = run.method.heads[0]
        want = torch.nn.functional.linear(feats, hw, hb).numpy()
    scale = max(1.0, float(np.abs(want).max()))
    for provider in ("numpy", "onnxruntime", "tflite", "tvm"):
        s = Session(bundle, providers=[provider])
        assert s.provider == provider, s.skipped
        got = s.logits(x, 0)
        assert np.abs(got - want).max() <= 1e-4 * scale, (provider, np.abs(got - want).max())
