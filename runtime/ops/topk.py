"""KeepTopK: the top-k selection of sparsely-gated mixture-of-experts layers (Shazeer et
al. 2017, eq. 5): keep the k largest entries along the last axis, set the others to
-inf, so that a Softmax after it gives exactly 0 to every expert not chosen."""

from __future__ import annotations

import numpy as np

from .base import INT, Op, OpError


def _kth(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest entry along the last axis (keepdims)."""
    return np.partition(x, x.shape[-1] - k, axis=-1)[..., x.shape[-1] - k : x.shape[-1] - k + 1]


class KeepTopK(Op):
    """``y = x`` where ``x >= `` the k-th largest entry of its row (last axis), else -inf.
    Ties at the k-th value are all kept (the rule every backend can express exactly: a
    threshold, not an index order), so a row with ties may keep more than k entries."""

    name = "KeepTopK"
    attrs = {"k": (INT, None)}

    def infer(self, shapes, a):
        x = shapes[0]
        if len(x) < 2:
            raise OpError(f"KeepTopK: takes [batch, ..., n], got {tuple(x)}")
        if not 1 <= a["k"] <= x[-1]:
            raise OpError(f"KeepTopK: k={a['k']} must lie in 1..{x[-1]} (the last axis of {tuple(x)})")
        return [tuple(x)]

    def forward(self, xs, a):
        x = xs[0]
        return [np.where(x >= _kth(x, a["k"]), x, np.array(-np.inf, dtype=x.dtype))]

    def backward(self, xs, ys, gys, a, need):
        if not need[0]:
            return [None]
        return [np.where(np.isfinite(ys[0]), gys[0], np.zeros((), dtype=gys[0].dtype))]

    def torch(self, xs, a):
        import torch

        x = xs[0]
        kth = torch.topk(x, a["k"], dim=-1).values[..., -1:]
        return [torch.where(x >= kth, x, torch.full_like(x, float("-inf")))]

    def onnx(self, b, inputs, outputs, a):
        vals, idx, kth, keep = b.tmp(), b.tmp(), b.tmp(), b.tmp()
        b.node("TopK", [inputs[0], b.const(np.array([a["k"]], np.int64))], [vals, idx], axis=-1)
        b.node("ReduceMin", [vals], [kth], axes=[-1], keepdims=1)
        b.node("GreaterOrEqual", [inputs[0], kth], [keep])
        b.node("Where", [keep, inputs[0], b.const(np.array(-np.inf, np.float32))], outputs)

    def tvm(self, bb, xs, a, shapes):
        raise NotImplementedError("KeepTopK: no TVM emission (an expert-routing task runs on a graph of its "
                                  "own, which the numpy backend serves)")

    def tflite(self, b, inputs, outputs, a, shapes):
        raise NotImplementedError("KeepTopK: no TFLite emission (an expert-routing task runs on a graph of "
                                  "its own, which the numpy backend serves)")
