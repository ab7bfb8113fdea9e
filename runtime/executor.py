"""The numpy reference executor: runs a layer table with a task's materialized weights.

A layer table is the list of ops the manifest stores under ``model.layers``:

* ``{"op": "linear", "name", "in_features", "out_features", "bias"}``
* ``{"op": "conv2d", "name", "in_channels", "out_channels", "kernel_size", "stride",
  "padding", "bias"}`` (NCHW, square kernels)
* ``{"op": "relu"}``, ``{"op": "maxpool2d", "kernel_size"}``, ``{"op": "flatten"}``

The task's head (``head.weight`` [classes, features], ``head.bias``) follows the table.
Every other backend must match this one (to 1e-5 against PyTorch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Params = Mapping[str, tuple[np.ndarray, np.ndarray | None]]


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int) -> np.ndarray:
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    # win: N, C, Ho, Wo, k, k  ->  out: N, O, Ho, Wo
    out = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
    if b is not None:
        out += b[None, :, None, None]
    return out


def _maxpool2d(x: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = x.shape
    ho, wo = h // k, w // k
    x = x[:, :, : ho * k, : wo * k].reshape(n, c, ho, k, wo, k)
    return x.max(axis=(3, 5))


def features(layers: Sequence[Mapping], params: Params, x: np.ndarray) -> np.ndarray:
    """Run the backbone part of the table; ``params[name] = (weight, bias)``."""
    h = x
    for layer in layers:
        op = layer["op"]
        if op == "linear":
            w, b = params[layer["name"]]
            h = h @ w.T
            if b is not None:
                h += b
        elif op == "conv2d":
            w, b = params[layer["name"]]
            h = _conv2d(h, w, b, int(layer.get("stride", 1)), int(layer.get("padding", 0)))
        elif op == "relu":
            h = np.maximum(h, 0, out=h if h is not x else None)
        elif op == "maxpool2d":
            h = _maxpool2d(h, int(layer["kernel_size"]))
        elif op == "flatten":
            h = h.reshape(h.shape[0], -1)
        else:
            raise ValueError(f"layer table: unknown op {op!r}")
    return h


def forward(
    layers: Sequence[Mapping], params: Params, head: tuple[np.ndarray, np.ndarray], x: np.ndarray
) -> np.ndarray:
    """Logits of one task: backbone features, then the task's head."""
    h = features(layers, params, x)
    hw, hb = head
    return h @ hw.T + hb
