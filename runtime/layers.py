"""Facts about a layer table (see ``executor``), shared by the host and the device."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def weighted(layers: Sequence[Mapping]) -> list:
    """The layers that own weights (linear, conv2d), in order."""
    return [layer for layer in layers if layer["op"] in ("linear", "conv2d")]


def weight_shape(layer: Mapping) -> tuple[int, ...]:
    if layer["op"] == "linear":
        return (int(layer["out_features"]), int(layer["in_features"]))
    k = int(layer["kernel_size"])
    return (int(layer["out_channels"]), int(layer["in_channels"]), k, k)


def weight_count(layer: Mapping) -> int:
    return math.prod(weight_shape(layer))


def output_shapes(layers: Sequence[Mapping], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per layer, the (batch-less, NCHW) shape of its output."""
    shape = tuple(int(s) for s in input_shape)
    out = []
    for layer in layers:
        op = layer["op"]
        if op == "linear":
            shape = (int(layer["out_features"]),)
        elif op == "conv2d":
            _, h, w = shape
            k, s, p = int(layer["kernel_size"]), int(layer.get("stride", 1)), int(layer.get("padding", 0))
            shape = (int(layer["out_channels"]), (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        elif op == "maxpool2d":
            c, h, w = shape
            k = int(layer["kernel_size"])
            shape = (c, h // k, w // k)
        elif op == "flatten":
            shape = (math.prod(shape),)
        out.append(shape)
    return out
