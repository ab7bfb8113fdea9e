"""Weight pre-packing for the compiled (TVM) forward pass: numpy only, device side.

The compiled code is built once per architecture with the weights as inputs, in a
layout that suits its loops; a task's activation packs ``W ⊙ M`` into that layout once,
so no inference pays for a transpose. The layout (manifest ``targets.<t>.layout``):

* activations are NHWC inside the compiled code (the input stays NCHW);
* linear ``W[N, K]`` -> ``[N / v, K, v]`` (``v`` output features side by side); a linear
  layer right after the flatten of a conv stack has its ``K`` axis permuted from
  PyTorch's (c, h, w) order to NHWC's (h, w, c);
* conv2d ``W[O, C, kh, kw]`` -> ``[O / v, kh, kw, C, v]``;
* the head ``[classes, F]`` is padded with zero rows to ``head_rows`` and packed like a
  linear layer; its bias is padded too; the caller slices the logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..layers import output_shapes

ALIGN = 64


def aligned_empty(shape: Sequence[int], dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(n * dtype.itemsize + ALIGN, dtype=np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n * dtype.itemsize].view(dtype).reshape(tuple(shape))


def aligned_copy(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def vec_for(n: int, vec: int) -> int:
    """The widest lane count <= ``vec`` that divides ``n`` (a power of two, else 1)."""
    v = vec
    while v > 1 and n % v:
        v //= 2
    return max(v, 1)


def _pack_linear(w: np.ndarray, v: int, chw: tuple[int, int, int] | None) -> np.ndarray:
    n, k = w.shape
    if chw is not None:  # K in (c, h, w) order -> (h, w, c)
        c, h, wd = chw
        w = w.reshape(n, c, h, wd).transpose(0, 2, 3, 1).reshape(n, k)
    return w.reshape(n // v, v, k).transpose(0, 2, 1)


def _pack_conv(w: np.ndarray, v: int) -> np.ndarray:
    o, c, kh, kw = w.shape
    return w.reshape(o // v, v, c, kh, kw).transpose(0, 3, 4, 2, 1)


def pack_params(layers: Sequence[Mapping], input_shape: Sequence[int], params: Mapping,
                head: tuple[np.ndarray, np.ndarray], layout: Mapping) -> list[np.ndarray]:
    """The compiled function's weight arguments, in order, 64-byte aligned."""
    vec, head_rows = int(layout["vec"]), int(layout["head_rows"])
    out: list[np.ndarray] = []
    shapes = output_shapes(layers, input_shape)
    prev: tuple[int, ...] = tuple(int(s) for s in input_shape)
    before_flatten: tuple[int, ...] | None = None
    nhwc = False  # the running tensor is NHWC once a conv2d produced it
    for layer, shape in zip(layers, shapes, strict=True):
        op = layer["op"]
        if op == "conv2d":
            nhwc = True
        if op == "flatten":
            before_flatten = prev if (nhwc and len(prev) == 3) else None
            nhwc = False
        elif op in ("linear", "conv2d"):
            w, b = params[layer["name"]]
            w = np.asarray(w, dtype=np.float32)
            n = w.shape[0]
            v = vec_for(n, vec)
            if op == "linear":
                out.append(aligned_copy(_pack_linear(w, v, before_flatten)))
                before_flatten = None
            else:
                out.append(aligned_copy(_pack_conv(w, v)))
            out.append(aligned_copy(np.zeros(n, np.float32) if b is None else np.asarray(b, np.float32)))
        prev = shape
    hw, hb = (np.asarray(a, dtype=np.float32) for a in head)
    classes, feat = hw.shape
    if classes > head_rows:
        raise ValueError(f"the task has {classes} classes; the compiled head holds {head_rows}")
    hwp = np.zeros((head_rows, feat), np.float32)
    hwp[:classes] = hw
    hbp = np.zeros(head_rows, np.float32)
    hbp[:classes] = hb
    # a head after a conv stack with no linear layer between would need the permutation
    out.append(aligned_copy(_pack_linear(hwp, vec_for(head_rows, vec), before_flatten)))
    out.append(aligned_copy(hbp))
    return out
