"""The layer table run in PyTorch, functionally, so each method supplies its own weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .architectures import weight_shape, weighted

Params = Mapping[str, tuple[torch.Tensor, torch.Tensor | None]]


def features(layers: Sequence[dict], params: Params, x: torch.Tensor,
             gates: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Backbone features. ``gates[name]`` (HAT) scales that layer's output units."""
    h = x
    for layer in layers:
        op = layer["op"]
        if op in ("linear", "conv2d"):
            w, b = params[layer["name"]]
            if op == "linear":
                h = F.linear(h, w, b)
            else:
                h = F.conv2d(h, w, b, stride=layer["stride"], padding=layer["padding"])
            if gates is not None and layer["name"] in gates:
                g = gates[layer["name"]]
                h = h * (g.view(1, -1, 1, 1) if op == "conv2d" else g)
        elif op == "relu":
            h = F.relu(h)
        elif op == "maxpool2d":
            h = F.max_pool2d(h, layer["kernel_size"])
        elif op == "flatten":
            h = h.flatten(1)
        else:
            raise ValueError(f"unknown op {op!r}")
    return h


def init_backbone(layers: Sequence[dict], gen: torch.Generator, *,
                  signed_constant: bool = False) -> dict[str, torch.Tensor]:
    """Kaiming-uniform weights (PyTorch's default), or SupSup's signed Kaiming constant."""
    out: dict[str, torch.Tensor] = {}
    for layer in weighted(layers):
        shape = weight_shape(layer)
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        bound = 1.0 / fan_in**0.5
        if signed_constant:
            std = (2.0 / fan_in) ** 0.5
            sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
            out[f"{layer['name']}.weight"] = sign * std
        else:
            out[f"{layer['name']}.weight"] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        if layer["bias"]:
            out[f"{layer['name']}.bias"] = (torch.rand(shape[0], generator=gen) * 2 - 1) * bound
    return out


def init_head(n_in: int, n_out: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    bound = 1.0 / n_in**0.5
    w = (torch.rand((n_out, n_in), generator=gen) * 2 - 1) * bound
    b = (torch.rand(n_out, generator=gen) * 2 - 1) * bound
    return w, b
