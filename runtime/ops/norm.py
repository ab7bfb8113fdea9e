"""Normalization: BatchNormalization (inference form) and LayerNormalization."""

from __future__ import annotations

import numpy as np

from .base import FLOAT, INT, Op, OpError, norm_axis


class BatchNormalization(Op):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` per channel (axis 1), with the
    running statistics: the inference form. Import folds it into the Conv before it
    where it can; this op is for the rest."""

    name = "BatchNormalization"
    attrs = {"epsilon": (FLOAT, 1e-5)}
    fresh_output = True
    param_roles = {1: "scale", 2: "bias", 3: "mean", 4: "var"}
    n_inputs = (5, 5)

    def infer(self, shapes, a):
        x = shapes[0]
        if len(x) < 2 or any(tuple(s) != (x[1],) for s in shapes[1:]):
            raise OpError(f"BatchNormalization: input {tuple(x)} and parameters "
                          f"{[tuple(s) for s in shapes[1:]]} do not agree")
        return [tuple(x)]

    def _affine(self, xs, a, rank):
        x, scale, bias, mean, var = xs
        k = scale / np.sqrt(var + np.float32(a["epsilon"]))
        shape = (1, -1) + (1,) * (rank - 2)
        return k.reshape(shape), (bias - mean * k).reshape(shape)

    def forward(self, xs, a):
        k, c = self._affine(xs, a, xs[0].ndim)
        return [(xs[0] * k + c).astype(xs[0].dtype)]

    def backward(self, xs, ys, gys, a, need):
        x, g = xs[0], gys[0]
        k, _ = self._affine(xs, a, x.ndim)
        out: list[np.ndarray | None] = [g * k if need[0] else None, None, None, None, None]
        axes = (0,) + tuple(range(2, x.ndim))
        if need[1] or need[2]:
            xhat = (x - xs[3].reshape(k.shape)) / np.sqrt(xs[4].reshape(k.shape) + np.float32(a["epsilon"]))
            out[1] = (g * xhat).sum(axis=axes) if need[1] else None
            out[2] = g.sum(axis=axes) if need[2] else None
        return out

    def torch(self, xs, a):
        import torch.nn.functional as F

        x, scale, bias, mean, var = xs
        return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, a["epsilon"])]

    def onnx(self, b, inputs, outputs, a):
        b.node("BatchNormalization", inputs, outputs, epsilon=a["epsilon"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        # the inference form as x * k + c, k = scale / sqrt(var + eps), c = bias - mean * k
        # (as forward above): k and c depend on parameters only, so a compiler lifts them out
        # of the per-call code (LiftTransformParams), and every piece is differentiable
        x, scale, bias, mean, var = xs
        shape = [1, -1] + [1] * (len(shapes[0]) - 2)
        eps = relax.const(a["epsilon"], "float32")
        k = bb.emit(relax.op.divide(scale, relax.op.sqrt(relax.op.add(var, eps))))
        c = bb.emit(relax.op.subtract(bias, relax.op.multiply(mean, k)))
        y = relax.op.add(relax.op.multiply(x, relax.op.reshape(k, shape)), relax.op.reshape(c, shape))
        return [bb.emit(y)]

    def tflite(self, b, inputs, outputs, a, shapes):
        # no builtin: k = scale / SQRT(var + eps) and c = bias - mean * k from the parameters
        # (per channel, a few ops on [C]), then y = x * k + c; NHWC for 4-D input (channels
        # last), else channels on axis 1 ([C, 1, ...] after a RESHAPE of k and c)
        rank, ch = len(shapes[0]), shapes[0][1]
        scale, bias, mean, var = (b.param(i) for i in inputs[1:])
        ve, sd, k, mk, c = (b.tensor([ch]) for _ in range(5))
        b.op("ADD", [var, b.scalar(a["epsilon"])], [ve])
        b.op("SQRT", [ve], [sd])
        b.op("DIV", [scale, sd], [k])
        b.op("MUL", [mean, k], [mk])
        b.op("SUB", [bias, mk], [c])
        lay = "nhwc" if rank == 4 else "graph"
        if lay == "graph" and rank > 2:
            shape = [ch] + [1] * (rank - 2)
            sc = b.const(np.array(shape, np.int32))
            k2, c2 = b.tensor(shape), b.tensor(shape)
            b.op("RESHAPE", [k, sc], [k2], new_shape=shape)
            b.op("RESHAPE", [c, sc], [c2], new_shape=shape)
            k, c = k2, c2
        x = b.get(inputs[0], lay)
        t = b.tensor(like=x)
        b.op("MUL", [x, k], [t])
        b.op("ADD", [t, c], [b.output(outputs[0], lay)])


class LayerNormalization(Op):
    """Normalize over the axes from ``axis`` to the last, then scale and shift."""

    name = "LayerNormalization"
    attrs = {"axis": (INT, -1), "epsilon": (FLOAT, 1e-5)}
    param_roles = {1: "scale", 2: "bias"}
    n_inputs = (2, 3)

    def _axes(self, a, rank):
        return tuple(range(norm_axis(a["axis"], rank), rank))

    def infer(self, shapes, a):
        x = shapes[0]
        norm_shape = tuple(x[i] for i in self._axes(a, len(x)))
        if any(tuple(s) != norm_shape for s in shapes[1:]):
            raise OpError(f"LayerNormalization: parameters {[tuple(s) for s in shapes[1:]]} "
                          f"do not match the normalized shape {norm_shape}")
        return [tuple(x)]

    def forward(self, xs, a):
        x = xs[0]
        axes = self._axes(a, x.ndim)
        mu = x.mean(axis=axes, keepdims=True)
        d = x - mu
        var = (d * d).mean(axis=axes, keepdims=True)
        y = d / np.sqrt(var + np.float32(a["epsilon"])) * xs[1]
        if len(xs) > 2:
            y = y + xs[2]
        return [y.astype(x.dtype)]

    def backward(self, xs, ys, gys, a, need):
        x, g = xs[0], gys[0]
        axes = self._axes(a, x.ndim)
        n = int(np.prod([x.shape[i] for i in axes]))
        mu = x.mean(axis=axes, keepdims=True)
        d = x - mu
        inv = 1 / np.sqrt((d * d).mean(axis=axes, keepdims=True) + np.float32(a["epsilon"]))
        xhat = d * inv
        lead = tuple(range(x.ndim - len(axes)))
        out: list[np.ndarray | None] = [None] * len(xs)
        if need[1]:
            out[1] = (g * xhat).sum(axis=lead)
        if len(xs) > 2 and need[2]:
            out[2] = g.sum(axis=lead)
        if need[0]:
            gh = g * xs[1]
            out[0] = (inv / n * (n * gh - gh.sum(axis=axes, keepdims=True)
                                 - xhat * (gh * xhat).sum(axis=axes, keepdims=True))).astype(x.dtype)
        return out

    def torch(self, xs, a):
        import torch.nn.functional as F

        x = xs[0]
        shape = tuple(x.shape[i] for i in self._axes(a, x.dim()))
        return [F.layer_norm(x, shape, xs[1], xs[2] if len(xs) > 2 else None, a["epsilon"])]

    def onnx(self, b, inputs, outputs, a):
        b.node("LayerNormalization", inputs, outputs, axis=a["axis"], epsilon=a["epsilon"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        axes = list(self._axes(a, len(shapes[0])))
        beta = xs[2] if len(xs) > 2 else relax.const(np.zeros(shapes[1], np.float32))
        return [bb.emit(relax.op.nn.layer_norm(xs[0], xs[1], beta, axes, epsilon=a["epsilon"]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # no builtin: mu = MEAN(x), d = x - mu, var = MEAN(d * d),
        # y = d / SQRT(var + eps) * scale (+ bias), on the graph layout
        axes = self._axes(a, len(shapes[0]))
        ax = b.const(np.array(axes, np.int32))
        x = b.get(inputs[0])
        red = [1 if i in axes else s for i, s in enumerate(b.tshape(x))]
        mu, var, ve, sd = (b.tensor(red, like=x) for _ in range(4))
        d, sq, xn = (b.tensor(like=x) for _ in range(3))
        b.op("MEAN", [x, ax], [mu], keep_dims=1)
        b.op("SUB", [x, mu], [d])
        b.op("MUL", [d, d], [sq])
        b.op("MEAN", [sq, ax], [var], keep_dims=1)
        b.op("ADD", [var, b.scalar(a["epsilon"])], [ve])
        b.op("SQRT", [ve], [sd])
        b.op("DIV", [d, sd], [xn])
        y = b.output(outputs[0])
        if len(inputs) > 2:
            t = b.tensor(like=x)
            b.op("MUL", [xn, b.param(inputs[1])], [t])
            b.op("ADD", [t, b.param(inputs[2])], [y])
        else:
            b.op("MUL", [xn, b.param(inputs[1])], [y])


