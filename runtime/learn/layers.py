"""Small facts about the layer table (no torch: the device reads them from the manifest)."""

from __future__ import annotations

import math


def weight_shape(layer: dict) -> tuple[int, ...]:
    if layer["op"] == "linear":
        return (int(layer["out_features"]), int(layer["in_features"]))
    k = int(layer["kernel_size"])
    return (int(layer["out_channels"]), int(layer["in_channels"]), k, k)


def weight_count(layer: dict) -> int:
    return math.prod(weight_shape(layer))


def weighted(layers: list[dict]) -> list[dict]:
    return [layer for layer in layers if layer["op"] in ("linear", "conv2d")]
