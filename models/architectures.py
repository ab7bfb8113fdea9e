"""The built-in small backbones (an MLP and a small CNN) as model graphs.

Both are written as the simple layer tables of format 1 and read through
:func:`edgecl.runtime.graph.from_layers`, so they are graphs like any imported model:
maskable weights are every Linear and Conv weight, ``<name>.weight`` / ``<name>.bias``.
Real backbones (MobileNet, DS-CNN, ResNet-8, ...) come from the zoo
(``edgecl.models.zoo``) or a user's own module through ``edgecl.models.importer``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgecl.runtime.graph import Graph, from_layers

ARCHS = ("mlp", "cnn")


def mlp(in_features: int = 64, hidden: Sequence[int] = (256, 256), bias: bool = True) -> list[dict]:
    layers: list[dict] = [{"op": "flatten"}]
    prev = in_features
    for i, width in enumerate(hidden, start=1):
        layers.append({"op": "linear", "name": f"fc{i}", "in_features": prev,
                       "out_features": int(width), "bias": bias})
        layers.append({"op": "relu"})
        prev = int(width)
    return layers


def cnn(input_shape: Sequence[int] = (1, 8, 8), channels: Sequence[int] = (16, 32),
        hidden: int = 128, bias: bool = True) -> list[dict]:
    """conv3x3(pad 1) -> relu -> maxpool2, per entry of ``channels``; then a linear layer."""
    c, h, w = (int(s) for s in input_shape)
    layers: list[dict] = []
    for i, out in enumerate(channels, start=1):
        layers += [
            {"op": "conv2d", "name": f"conv{i}", "in_channels": c, "out_channels": int(out),
             "kernel_size": 3, "stride": 1, "padding": 1, "bias": bias},
            {"op": "relu"},
            {"op": "maxpool2d", "kernel_size": 2},
        ]
        c, h, w = int(out), h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(input_shape)} is too small for {len(channels)} conv blocks")
    layers += [{"op": "flatten"},
               {"op": "linear", "name": "fc1", "in_features": c * h * w, "out_features": int(hidden),
                "bias": bias},
               {"op": "relu"}]
    return layers


def model_input_shape(arch: str, data_shape: Sequence[int]) -> tuple[int, ...]:
    return (math.prod(data_shape),) if arch == "mlp" else tuple(int(s) for s in data_shape)


def build(arch: str, input_shape: Sequence[int], *, hidden: Sequence[int] | None = None,
          bias: bool = True) -> Graph:
    """The graph of ``arch`` for data of ``input_shape`` (without the batch axis)."""
    shape = model_input_shape(arch, input_shape)
    if arch == "mlp":
        layers = mlp(math.prod(input_shape), hidden or (256, 256), bias)
    elif arch == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"cnn takes (channels, height, width) inputs, got {tuple(input_shape)}")
        layers = cnn(input_shape, hidden[:-1] if hidden else (16, 32), hidden[-1] if hidden else 128, bias)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    return from_layers(layers, shape, name=arch)
