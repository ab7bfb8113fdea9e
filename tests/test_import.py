"""Importing models: every zoo backbone from PyTorch (torch.export) and from its ONNX
export (PyTorch's exporter), features equal to the original module's; folding passes;
unsupported ops fail naming the node; a model directory round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.models.importer import (
    ImportError_,
    import_model,
    import_onnx,
    import_torch,
    load_model,
    save_model,
    zoo_module,
)
from edgecl.models.zoo import ZOO, build
from edgecl.runtime import executor

SMALL = ["ds-cnn", "resnet8", "mobilenet-v1-0.25", "fc-autoencoder"]
BIG = ["mobilenet-v2", "efficientnet-lite0", "minilm"]



def reference_features(name: str, module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The original module's features: the classifier's input, the encoder's output, or
    (MiniLM) the module's output."""
    got = {}
    inner = getattr(module, "model", module)  # behind the pixel preprocessing
    if name == "fc-autoencoder":
        inner.encoder.register_forward_hook(lambda m, i, o: got.setdefault("f", o))
    elif getattr(inner, "classifier", None) is not None:
        inner.classifier.register_forward_hook(lambda m, i, o: got.setdefault("f", i[0]))
    with torch.no_grad():
        out = module(x)
    return (got["f"] if got else out).numpy()


def check(name: str, via_onnx: bool, tmp_path) -> None:
    module, x = zoo_module(name)
    if via_onnx:
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "N"}})
        from edgecl.models.importer import ZOO_FEATURES

        feats = ZOO_FEATURES.get(name)
        if feats == "encoder":  # ONNX has no module paths: name the value (the encoder's last Relu)
            feats = None
        graph, weights = import_onnx(path, features=feats)
        if name == "fc-autoencoder":
            # the bottleneck is the output of the 5th Relu: pick it by position
            relus = [n.outputs[0] for n in graph.nodes if n.op == "Relu"]
            graph, weights = import_onnx(path, features=relus[4]) if len(relus) > 4 else (graph, weights)
    else:
        graph, weights = import_model(name)
    want = reference_features(name, zoo_module(name)[0], x)
    got = executor.features(graph, weights, x.numpy())
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 1e-4 * scale, (name, np.abs(got - want).max())


@pytest.mark.parametrize("name", SMALL)
def test_zoo_imports_from_pytorch(name, tmp_path):
    check(name, False, tmp_path)


@pytest.mark.parametrize("name", SMALL)
def test_zoo_imports_from_onnx(name, tmp_path):
    check(name, True, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_big_zoo_imports_from_pytorch(name, tmp_path):
    check(name, False, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_big_zoo_imports_from_onnx(name, tmp_path):
    check(name, True, tmp_path)


def test_batchnorm_and_pads_fold_into_convs():
    graph, _ = import_model("efficientnet-lite0")
    ops = {n.op for n in graph.nodes}
    assert "BatchNormalization" not in ops and "_Pad" not in ops
    assert any(n.op == "Conv" and n.attrs["pads"][0] != n.attrs["pads"][2] for n in graph.nodes)
    assert any(n.op == "Conv" and n.attrs["group"] > 1 for n in graph.nodes)


class _Unsupported(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.cumsum(self.fc(x), dim=1))


def test_unsupported_op_fails_naming_the_node():
    with pytest.raises(ImportError_, match=r"node 'cumsum'.*aten\.cumsum"):
        import_torch(_Unsupported(), torch.randn(2, 4))


def test_unsupported_onnx_op_fails_naming_the_node(tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(_Unsupported(), (torch.randn(2, 4),), str(path), dynamo=False, opset_version=17)
    with pytest.raises(ImportError_, match=r"CumSum"):
        import_onnx(path)


def test_features_by_module_and_default(tmp_path):
    g, _ = import_model("fc-autoencoder")
    assert g.feature_dim == 8
    g2, _ = import_torch(build("resnet8"), ZOO["resnet8"].example(2))
    assert g2.feature_dim == 64 and all(n.op != "Linear" for n in g2.nodes)  # the classifier is dropped
    with pytest.raises(ImportError_, match="neither a value"):
        import_torch(build("resnet8"), ZOO["resnet8"].example(2), features="nope")


def test_model_directory_round_trip_and_damage(tmp_path):
    graph, weights = import_model("ds-cnn")
    save_model(tmp_path / "m", graph, weights, "ds-cnn")
    g2, w2 = load_model(tmp_path / "m")
    assert g2 == graph and all(np.array_equal(w2[k], weights[k]) for k in weights)
    (tmp_path / "m" / "graph.json").write_text("{")
    with pytest.raises(ImportError_, match="graph.json"):
        load_model(tmp_path / "m")
