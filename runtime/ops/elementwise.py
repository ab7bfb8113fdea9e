"""Elementwise ops: binary arithmetic with broadcasting, activations, Softmax."""

from __future__ import annotations

import numpy as np

from ... import kernels
from .base import FLOAT, INT, STR, Op, broadcast_shapes, norm_axis, unbroadcast


class _Binary(Op):
    n_inputs = (2, 2)
    param_roles = {1: "const"}
    onnx_name = ""
    tvm_name = ""

    def infer(self, shapes, a):
        return [broadcast_shapes(shapes[0], shapes[1])]

    def onnx(self, b, inputs, outputs, a):
        b.node(self.onnx_name, inputs, outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(getattr(relax.op, self.tvm_name)(xs[0], xs[1]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # ADD / SUB / MUL / DIV with broadcasting; NHWC when a 4-D operand is (a parameter
        # operand is then written in NHWC at activation), else in graph layout.
        lay = b.common_layout(inputs, outputs[0])
        b.op(self.name.upper(), [b.get(i, lay) for i in inputs], [b.output(outputs[0], lay)])


class Add(_Binary):
    name, onnx_name, tvm_name = "Add", "Add", "add"
    fresh_output = True

    def forward(self, xs, a):
        return [np.add(xs[0], xs[1])]

    def backward(self, xs, ys, gys, a, need):
        return [unbroadcast(gys[0], xs[i].shape) if need[i] else None for i in range(2)]

    def torch(self, xs, a):
        return [xs[0] + xs[1]]


class Sub(_Binary):
    name, onnx_name, tvm_name = "Sub", "Sub", "subtract"

    def forward(self, xs, a):
        return [np.subtract(xs[0], xs[1])]

    def backward(self, xs, ys, gys, a, need):
        return [unbroadcast(gys[0], xs[0].shape) if need[0] else None,
                unbroadcast(-gys[0], xs[1].shape) if need[1] else None]

    def torch(self, xs, a):
        return [xs[0] - xs[1]]


class Mul(_Binary):
    name, onnx_name, tvm_name = "Mul", "Mul", "multiply"

    def forward(self, xs, a):
        return [np.multiply(xs[0], xs[1])]

    def backward(self, xs, ys, gys, a, need):
        g = gys[0]
        return [unbroadcast(g * xs[1], xs[0].shape) if need[0] else None,
                unbroadcast(g * xs[0], xs[1].shape) if need[1] else None]

    def torch(self, xs, a):
        return [xs[0] * xs[1]]


class Div(_Binary):
    name, onnx_name, tvm_name = "Div", "Div", "divide"

    def forward(self, xs, a):
        return [np.divide(xs[0], xs[1])]

    def backward(self, xs, ys, gys, a, need):
        g = gys[0]
        return [unbroadcast(g / xs[1], xs[0].shape) if need[0] else None,
                unbroadcast(-g * ys[0] / xs[1], xs[1].shape) if need[1] else None]

    def torch(self, xs, a):
        return [xs[0] / xs[1]]


class _Unary(Op):
    def infer(self, shapes, a):
        return [tuple(shapes[0])]


def _clamp_grad(gy: np.ndarray, x: np.ndarray, lo: float, hi: float | None) -> np.ndarray:
    """``gy * (lo < x < hi)`` (``hi`` None: ``gy * (x > lo)``): one pass of the C kernel
    (``kernels.clamp_grad``; [32, 64, 25, 5]: 41 us against numpy's 62-75) on float32,
    numpy's compare, cast and multiply (the same bytes) on anything else."""
    if gy.dtype == x.dtype == np.float32 and gy.shape == x.shape:
        return kernels.clamp_grad(np.ascontiguousarray(gy), np.ascontiguousarray(x), lo, hi)
    keep = np.greater(x, x.dtype.type(lo))
    if hi is not None:
        keep &= np.less(x, x.dtype.type(hi))
    g = keep.astype(gy.dtype)
    g *= gy
    return g


class Relu(_Unary):
    name = "Relu"
    inplace = True

    def forward(self, xs, a):
        # A fresh output: the input may be the caller's array or another node's input.
        x = xs[0]
        if x.dtype == np.float32:  # one C pass ([32, 64, 25, 5]: 26-32 us; np.maximum 97)
            return [kernels.relu(np.ascontiguousarray(x))]
        return [np.maximum(x, x.dtype.type(0))]

    def forward_inplace(self, xs, a):
        x = xs[0]
        if x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable:
            return [kernels.relu(x, out=x)]
        return self.forward(xs, a)

    def backward(self, xs, ys, gys, a, need):
        # gy * (x > 0); x > 0 where y > 0, so xs[0] may be either (see forward_inplace)
        return [_clamp_grad(gys[0], xs[0], 0.0, None)]

    def torch(self, xs, a):
        import torch.nn.functional as F

        return [F.relu(xs[0])]

    def onnx(self, b, inputs, outputs, a):
        b.node("Relu", inputs, outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        # maximum(0, x), not nn.relu: Relax's relu gradient passes at x == 0 (where a unit
        # switched off by a mask sits); maximum's, like backward above, does not.
        return [bb.emit(relax.op.maximum(relax.const(0.0, "float32"), xs[0]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        lay = b.layout(inputs[0])  # elementwise: any layout
        b.op("RELU", [b.get(inputs[0], lay)], [b.output(outputs[0], lay)])


class Clip(_Unary):
    """``min(max(x, min), max)``; ReLU6 is Clip(0, 6)."""

    name = "Clip"
    attrs = {"min": (FLOAT, float("-inf")), "max": (FLOAT, float("inf"))}
    inplace = True

    def forward(self, xs, a):
        # A fresh output (the input may be the caller's array or another node's input).
        # np.clip with bounds of the input's dtype: numpy's SIMD clip loop (about 3x
        # np.maximum then np.minimum in place, numpy 2.2-2.4).
        x = xs[0]
        return [np.clip(x, x.dtype.type(a["min"]), x.dtype.type(a["max"]))]

    def forward_inplace(self, xs, a):
        x = xs[0]
        return [np.clip(x, x.dtype.type(a["min"]), x.dtype.type(a["max"]), out=x)]

    def backward(self, xs, ys, gys, a, need):
        # the gradient passes where min < x < max, which is where min < y < max (xs[0] may
        # be either: see forward_inplace; NaN passes neither)
        return [_clamp_grad(gys[0], xs[0], a["min"], a["max"])]

    def torch(self, xs, a):
        import torch

        return [torch.clamp(xs[0], a["min"], a["max"])]

    def onnx(self, b, inputs, outputs, a):
        lo = b.const(np.array(a["min"], np.float32))
        hi = b.const(np.array(a["max"], np.float32))
        b.node("Clip", [inputs[0], lo, hi], outputs)

    def tvm(self, bb, xs, a, shapes):
        import math

        from tvm import relax

        # maximum/minimum (differentiable in Relax, unlike clip): the gradient passes
        # where min < x < max, as in backward above
        y = xs[0]
        if math.isfinite(a["min"]):
            y = relax.op.maximum(relax.const(a["min"], "float32"), y)
        if math.isfinite(a["max"]):
            y = relax.op.minimum(y, relax.const(a["max"], "float32"))
        return [bb.emit(y) if y is not xs[0] else y]

    def tflite(self, b, inputs, outputs, a, shapes):
        # RELU6 / RELU_N1_TO_1 / RELU where they fit, else MAXIMUM (lower) then MINIMUM (upper)
        lay = b.layout(inputs[0])
        x, y = b.get(inputs[0], lay), b.output(outputs[0], lay)
        lo, hi = a["min"], a["max"]
        named = {(0.0, 6.0): "RELU6", (-1.0, 1.0): "RELU_N1_TO_1", (0.0, float("inf")): "RELU"}
        if (lo, hi) in named:
            b.op(named[lo, hi], [x], [y])
            return
        steps = [(op, v) for op, v in (("MAXIMUM", lo), ("MINIMUM", hi)) if np.isfinite(v)]
        steps = steps or [("MAXIMUM", lo)]  # no bound: the identity
        for i, (op, v) in enumerate(steps):
            out = y if i == len(steps) - 1 else b.tensor(like=x)
            b.op(op, [x, b.scalar(v)], [out])
            x = out


class HardSigmoid(_Unary):
    """``clip(alpha * x + beta, 0, 1)`` (ONNX; PyTorch's hardsigmoid is alpha=1/6)."""

    name = "HardSigmoid"
    attrs = {"alpha": (FLOAT, 1 / 6), "beta": (FLOAT, 0.5)}

    def forward(self, xs, a):
        return [np.clip(xs[0] * np.float32(a["alpha"]) + np.float32(a["beta"]), 0, 1)]

    def backward(self, xs, ys, gys, a, need):
        t = xs[0] * a["alpha"] + a["beta"]
        return [np.where((t > 0) & (t < 1), gys[0] * np.float32(a["alpha"]), 0).astype(gys[0].dtype)]

    def torch(self, xs, a):
        import torch

        return [torch.clamp(xs[0] * a["alpha"] + a["beta"], 0, 1)]

    def onnx(self, b, inputs, outputs, a):
        b.node("HardSigmoid", inputs, outputs, alpha=a["alpha"], beta=a["beta"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        t = relax.op.add(relax.op.multiply(xs[0], relax.const(a["alpha"], "float32")),
                         relax.const(a["beta"], "float32"))
        t = relax.op.maximum(relax.const(0.0, "float32"), t)  # differentiable clip (see Clip)
        return [bb.emit(relax.op.minimum(t, relax.const(1.0, "float32")))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # no builtin: MUL alpha, ADD beta, MAXIMUM 0, MINIMUM 1
        lay = b.layout(inputs[0])
        x = b.get(inputs[0], lay)
        t1, t2, t3 = b.tensor(like=x), b.tensor(like=x), b.tensor(like=x)
        b.op("MUL", [x, b.scalar(a["alpha"])], [t1])
        b.op("ADD", [t1, b.scalar(a["beta"])], [t2])
        b.op("MAXIMUM", [t2, b.scalar(0.0)], [t3])
        b.op("MINIMUM", [t3, b.scalar(1.0)], [b.output(outputs[0], lay)])


class HardSwish(_Unary):
    """``x * relu6(x + 3) / 6``."""

    name = "HardSwish"

    def forward(self, xs, a):
        x = xs[0]
        return [x * np.clip(x + 3, 0, 6) / np.float32(6)]

    def backward(self, xs, ys, gys, a, need):
        x = xs[0]
        d = np.where(x <= -3, 0, np.where(x >= 3, 1, (2 * x + 3) / 6))
        return [(gys[0] * d).astype(gys[0].dtype)]

    def torch(self, xs, a):
        import torch.nn.functional as F

        return [F.hardswish(xs[0])]

    def onnx(self, b, inputs, outputs, a):
        b.node("HardSwish", inputs, outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        x = xs[0]
        t = relax.op.maximum(relax.const(0.0, "float32"), relax.op.add(x, relax.const(3.0, "float32")))
        r6 = relax.op.minimum(t, relax.const(6.0, "float32"))  # differentiable clip (see Clip)
        return [bb.emit(relax.op.divide(relax.op.multiply(x, r6), relax.const(6.0, "float32")))]

    def tflite(self, b, inputs, outputs, a, shapes):
        lay = b.layout(inputs[0])  # elementwise: any layout
        b.op("HARD_SWISH", [b.get(inputs[0], lay)], [b.output(outputs[0], lay)])


class Sigmoid(_Unary):
    name = "Sigmoid"

    def forward(self, xs, a):
        x = xs[0]
        # Two branches so that exp never overflows.
        e = np.exp(-np.abs(x))
        return [np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)]

    def backward(self, xs, ys, gys, a, need):
        y = ys[0]
        return [gys[0] * y * (1 - y)]

    def torch(self, xs, a):
        import torch

        return [torch.sigmoid(xs[0])]

    def onnx(self, b, inputs, outputs, a):
        b.node("Sigmoid", inputs, outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.sigmoid(xs[0]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        lay = b.layout(inputs[0])  # elementwise: any layout
        b.op("LOGISTIC", [b.get(inputs[0], lay)], [b.output(outputs[0], lay)])


class Tanh(_Unary):
    name = "Tanh"

    def forward(self, xs, a):
        return [np.tanh(xs[0])]

    def backward(self, xs, ys, gys, a, need):
        return [gys[0] * (1 - ys[0] * ys[0])]

    def torch(self, xs, a):
        import torch

        return [torch.tanh(xs[0])]

    def onnx(self, b, inputs, outputs, a):
        b.node("Tanh", inputs, outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.tanh(xs[0]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        lay = b.layout(inputs[0])  # elementwise: any layout
        b.op("TANH", [b.get(inputs[0], lay)], [b.output(outputs[0], lay)])


def erf(x: np.ndarray) -> np.ndarray:
    """erf without scipy (the device set has none): Abramowitz & Stegun 7.1.26 in
    float64, absolute error below 1.5e-7."""
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = 1.0 - poly * np.exp(-z * z)
    return np.sign(x) * y


class Gelu(_Unary):
    """GELU, the exact (erf) form or ``approximate="tanh"``."""

    name = "Gelu"
    attrs = {"approximate": (STR, "none")}

    def forward(self, xs, a):
        x = xs[0]
        if a["approximate"] == "tanh":
            inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
            return [(0.5 * x * (1 + np.tanh(inner))).astype(x.dtype)]
        return [(0.5 * x * (1 + erf(x / np.sqrt(2)))).astype(x.dtype)]

    def backward(self, xs, ys, gys, a, need):
        x = xs[0].astype(np.float64)
        if a["approximate"] == "tanh":
            c = np.sqrt(2 / np.pi)
            t = np.tanh(c * (x + 0.044715 * x**3))
            d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
            return [(gys[0] * d).astype(gys[0].dtype)]
        cdf = 0.5 * (1 + erf(x / np.sqrt(2)))
        pdf = np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
        return [(gys[0] * (cdf + x * pdf)).astype(gys[0].dtype)]

    def torch(self, xs, a):
        import torch.nn.functional as F

        return [F.gelu(xs[0], approximate=a["approximate"])]

    def onnx(self, b, inputs, outputs, a):
        # Gelu is an ONNX op from opset 20; below it, its erf form.
        x = inputs[0]
        t1, t2, t3, t4 = b.tmp(), b.tmp(), b.tmp(), b.tmp()
        b.node("Div", [x, b.const(np.array(np.sqrt(2), np.float32))], [t1])
        b.node("Erf", [t1], [t2])
        b.node("Add", [t2, b.const(np.array(1, np.float32))], [t3])
        b.node("Mul", [x, t3], [t4])
        b.node("Mul", [t4, b.const(np.array(0.5, np.float32))], outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        f = relax.op.nn.gelu_tanh if a["approximate"] == "tanh" else relax.op.nn.gelu
        return [bb.emit(f(xs[0]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        lay = b.layout(inputs[0])
        b.op("GELU", [b.get(inputs[0], lay)], [b.output(outputs[0], lay)],
             approximate=int(a["approximate"] == "tanh"))


class Softmax(_Unary):
    name = "Softmax"
    attrs = {"axis": (INT, -1)}

    def forward(self, xs, a):
        x = xs[0]
        m = x.max(axis=a["axis"], keepdims=True)
        e = np.exp(x - m)
        return [e / e.sum(axis=a["axis"], keepdims=True)]

    def backward(self, xs, ys, gys, a, need):
        y, g = ys[0], gys[0]
        return [y * (g - (g * y).sum(axis=a["axis"], keepdims=True))]

    def infer(self, shapes, a):
        norm_axis(a["axis"], len(shapes[0]))
        return [tuple(shapes[0])]

    def torch(self, xs, a):
        import torch

        return [torch.softmax(xs[0], dim=a["axis"])]

    def onnx(self, b, inputs, outputs, a):
        b.node("Softmax", inputs, outputs, axis=a["axis"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.nn.softmax(xs[0], axis=a["axis"]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # SOFTMAX works on the last axis: channels of an NHWC value are; another axis is
        # swapped with the last around it (TRANSPOSE, SOFTMAX, TRANSPOSE).
        rank = len(shapes[0])
        ax = norm_axis(a["axis"], rank)
        if rank == 4 and ax == 1 and b.layout(inputs[0]) == "nhwc":
            b.op("SOFTMAX", [b.get(inputs[0], "nhwc")], [b.output(outputs[0], "nhwc")])
            return
        x, y = b.get(inputs[0]), b.output(outputs[0])
        if ax == rank - 1:
            b.op("SOFTMAX", [x], [y])
            return
        perm = list(range(rank))
        perm[ax], perm[-1] = perm[-1], perm[ax]
        pc = b.const(np.array(perm, np.int32))
        t1 = b.tensor([b.tshape(x)[p] for p in perm], like=x)
        t2 = b.tensor(like=t1)
        b.op("TRANSPOSE", [x, pc], [t1])
        b.op("SOFTMAX", [t1], [t2])
        b.op("TRANSPOSE", [t2, pc], [y])


