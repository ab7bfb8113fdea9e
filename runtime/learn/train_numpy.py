"""Forward and backward of the layer table in numpy (the device's training math).

The ops are the executor's (``linear``, ``conv2d``, ``relu``, ``maxpool2d``,
``flatten``); the forward computes exactly what :mod:`edgecl.runtime.executor` does and
keeps what the backward needs. ``backward`` returns the gradients of the weights (and,
when asked, biases) of the layers named in ``want``; other layers get none, and the
gradient with respect to the input of the first layer is never formed.

Everything is float32. Cross-entropy is PyTorch's mean over the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Params = Mapping[str, tuple[np.ndarray, np.ndarray | None]]


def _windows(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]


def forward(layers: Sequence[Mapping], params: Params, head: tuple[np.ndarray, np.ndarray],
            x: np.ndarray, *, keep: bool = True) -> tuple[np.ndarray, list]:
    """Logits and the per-layer cache (inputs, relu masks, pool argmaxes) for backward."""
    cache: list = []
    h = x
    for layer in layers:
        op = layer["op"]
        if op == "linear":
            w, b = params[layer["name"]]
            cache.append(h if keep else None)
            h = h @ w.T
            if b is not None:
                h += b
        elif op == "conv2d":
            w, b = params[layer["name"]]
            k, s, p = w.shape[-1], int(layer.get("stride", 1)), int(layer.get("padding", 0))
            win = _windows(h, k, s, p)
            cache.append((h.shape, win) if keep else None)
            h = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
            if b is not None:
                h += b[None, :, None, None]
        elif op == "relu":
            cache.append(h > 0 if keep else None)
            h = np.maximum(h, 0, out=None if np.may_share_memory(h, x) else h)  # as the executor
        elif op == "maxpool2d":
            k = int(layer["kernel_size"])
            n, c, hh, ww = h.shape
            ho, wo = hh // k, ww // k
            blocks = h[:, :, : ho * k, : wo * k].reshape(n, c, ho, k, wo, k).transpose(0, 1, 2, 4, 3, 5)
            blocks = blocks.reshape(n, c, ho, wo, k * k)
            arg = blocks.argmax(axis=-1)  # the first maximum, as PyTorch
            cache.append((h.shape, arg) if keep else None)
            h = np.take_along_axis(blocks, arg[..., None], axis=-1)[..., 0]
        elif op == "flatten":
            cache.append(h.shape if keep else None)
            h = h.reshape(h.shape[0], -1)
        else:
            raise ValueError(f"layer table: unknown op {op!r}")
    cache.append(h if keep else None)  # the features, for the head
    hw, hb = head
    return h @ hw.T + hb, cache


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(np.mean(np.log(s[:, 0]) - z[np.arange(n), y]))
    g = e / s
    g[np.arange(n), y] -= 1
    return loss, (g / np.float32(n)).astype(np.float32, copy=False)


def backward(layers: Sequence[Mapping], params: Params, head: tuple[np.ndarray, np.ndarray],
             cache: list, g_logits: np.ndarray, want: set[str], *, bias: bool = False
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Gradients: ({layer: dW}, {layer: db}, d head.weight, d head.bias)."""
    feats = cache[-1]
    hw, _ = head
    g_hw = g_logits.T @ feats
    g_hb = g_logits.sum(axis=0)
    weighted = [i for i, layer in enumerate(layers) if layer["op"] in ("linear", "conv2d")]
    need = [i for i in weighted if layers[i]["name"] in want]
    g_w: dict[str, np.ndarray] = {}
    g_b: dict[str, np.ndarray] = {}
    if not need:
        return g_w, g_b, g_hw, g_hb
    first = min(need)  # no gradient flows below the lowest trainable layer
    g = g_logits @ hw
    for i in range(len(layers) - 1, first - 1, -1):
        layer, c = layers[i], cache[i]
        op = layer["op"]
        if op == "linear":
            name = layer["name"]
            w, _ = params[name]
            if name in want:
                g_w[name] = g.T @ c
                if bias:
                    g_b[name] = g.sum(axis=0)
            if i > first:
                g = g @ w
        elif op == "conv2d":
            name = layer["name"]
            w, _ = params[name]
            shape, win = c
            if name in want:
                g_w[name] = np.einsum("nohw,nchwij->ocij", g, win, optimize=True)
                if bias:
                    g_b[name] = g.sum(axis=(0, 2, 3))
            if i > first:
                g = _conv_input_grad(g, w, shape, int(layer.get("stride", 1)),
                                     int(layer.get("padding", 0)))
        elif op == "relu":
            g = np.multiply(g, c, out=g)  # g is this backward's own array
        elif op == "maxpool2d":
            shape, arg = c
            k = int(layer["kernel_size"])
            n, ch, hh, ww = shape
            ho, wo = arg.shape[2], arg.shape[3]
            blocks = np.zeros((n, ch, ho, wo, k * k), dtype=np.float32)
            np.put_along_axis(blocks, arg[..., None], g[..., None], axis=-1)
            blocks = blocks.reshape(n, ch, ho, wo, k, k).transpose(0, 1, 2, 4, 3, 5)
            out = np.zeros(shape, dtype=np.float32)
            out[:, :, : ho * k, : wo * k] = blocks.reshape(n, ch, ho * k, wo * k)
            g = out
        elif op == "flatten":
            g = g.reshape(c)
    return g_w, g_b, g_hw, g_hb


def _conv_input_grad(g: np.ndarray, w: np.ndarray, shape: tuple, stride: int, pad: int) -> np.ndarray:
    n, c, hh, ww = shape
    k = w.shape[-1]
    ho, wo = g.shape[2], g.shape[3]
    out = np.zeros((n, c, hh + 2 * pad, ww + 2 * pad), dtype=np.float32)
    for i in range(k):
        for j in range(k):
            out[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += np.einsum(
                "nohw,oc->nchw", g, w[:, :, i, j], optimize=True)
    return out[:, :, pad : pad + hh, pad : pad + ww]
