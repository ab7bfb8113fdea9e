"""Layer tables for the backbones (plain data, no torch: the bundle stores them).

See ``edgecl.runtime.executor`` for the ops. Maskable layers are the linear and conv2d
entries; their weights are ``<name>.weight`` / ``<name>.bias`` in the backbone file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgecl.runtime.layers import weight_shape, weighted

__all__ = ["ARCHS", "build", "cnn", "feature_dim", "mlp", "n_weights", "weight_shape", "weighted"]

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


def build(arch: str, input_shape: Sequence[int], *, hidden: Sequence[int] | None = None,
          bias: bool = True) -> list[dict]:
    """The layer table of ``arch`` for inputs of ``input_shape`` (without the batch axis)."""
    if arch == "mlp":
        return mlp(math.prod(input_shape), hidden or (256, 256), bias)
    if arch == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"cnn takes (channels, height, width) inputs, got {tuple(input_shape)}")
        return cnn(input_shape, hidden[:-1] if hidden else (16, 32),
                   hidden[-1] if hidden else 128, bias)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def feature_dim(layers: Sequence[dict]) -> int:
    return weighted(layers)[-1]["out_features"]


def n_weights(layers: Sequence[dict]) -> int:
    """Backbone weights (not biases): what a weight-level mask covers."""
    return sum(math.prod(weight_shape(layer)) for layer in weighted(layers))
