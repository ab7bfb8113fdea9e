"""Ops that own weights: Conv, Linear, and the activation-by-activation MatMul; Gather
(an embedding table lookup)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ... import kernels
from .base import INT, INTS, MaskRule, Op, OpError, Shape, unbroadcast


def _pair(v: list[int], n: int, what: str) -> list[int]:
    if len(v) != n:
        raise OpError(f"Conv: {what} needs {n} values, got {v}")
    return v


def conv_geometry(x: Shape, w: Shape, a: dict) -> tuple[int, int, int, int]:
    """(groups, out height, out width, channels per group) of a 2-D convolution."""
    if len(x) != 4 or len(w) != 4:
        raise OpError(f"Conv: takes NCHW input and OIHW weight, got {x} and {w}")
    g = a["group"]
    kh, kw = w[2], w[3]
    sh, sw = _pair(a["strides"], 2, "strides")
    dh, dw = _pair(a["dilations"], 2, "dilations")
    pt, pl, pb, pr = _pair(a["pads"], 4, "pads")
    if g < 1 or x[1] % g or w[0] % g or w[1] * g != x[1]:
        raise OpError(f"Conv: {x[1]} input channels, weight {w} and group {g} do not agree")
    ho = (x[2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (x[3] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise OpError(f"Conv: input {x} is too small for kernel {w[2:]}")
    return g, ho, wo, w[1]


def windows(xp: np.ndarray, kh: int, kw: int, sh: int, sw: int, dh: int, dw: int,
            ho: int, wo: int) -> np.ndarray:
    """[N, C, Ho, Wo, kh, kw] strided view of a padded NCHW array."""
    v = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return v[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw, ::dh, ::dw]


def pad_nchw(x: np.ndarray, pads: Sequence[int], value: float = 0.0) -> np.ndarray:
    pt, pl, pb, pr = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


def fold(gcol: np.ndarray, padded: Shape, a: dict, kh: int, kw: int) -> np.ndarray:
    """Scatter-add window gradients [N, C, Ho, Wo, kh, kw] back into a padded input."""
    sh, sw = a["strides"]
    dh, dw = a.get("dilations", [1, 1])
    ho, wo = gcol.shape[2], gcol.shape[3]
    g = np.zeros(padded, dtype=gcol.dtype)
    for i in range(kh):
        for j in range(kw):
            g[:, :, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw] += \
                gcol[:, :, :, :, i, j]
    return g


def unpad(g: np.ndarray, pads: Sequence[int]) -> np.ndarray:
    pt, pl, pb, pr = pads
    return g[:, :, pt : g.shape[2] - pb, pl : g.shape[3] - pr]


def _taps(kh: int, kw: int, a: dict, ho: int, wo: int):
    """(i, j, index of the tap's samples in the padded input) for each tap, in order."""
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(None), slice(None), slice(i * dh, i * dh + (ho - 1) * sh + 1, sh),
                         slice(j * dw, j * dw + (wo - 1) * sw + 1, sw))


def im2col(xp: np.ndarray, kh: int, kw: int, a: dict, ho: int, wo: int) -> np.ndarray:
    """[N, C, kh, kw, Ho, Wo], contiguous: the padded input's samples under each tap (one
    strided copy per tap; reshaped to [N, C*kh*kw, Ho*Wo] it is the matmul operand)."""
    n, c = xp.shape[:2]
    cols = np.empty((n, c, kh, kw, ho, wo), xp.dtype)
    for i, j, sl in _taps(kh, kw, a, ho, wo):
        cols[:, :, i, j] = xp[sl]
    return cols


def col2im(gcols: np.ndarray, padded: Shape, a: dict) -> np.ndarray:
    """The adjoint of :func:`im2col`: window gradients [N, C, kh, kw, Ho, Wo] added back
    into a zero padded input, tap by tap in order."""
    kh, kw, ho, wo = gcols.shape[2:]
    g = np.zeros(padded, dtype=gcols.dtype)
    for i, j, sl in _taps(kh, kw, a, ho, wo):
        g[sl] += gcols[:, :, i, j]
    return g


def conv_kind(x: Shape, w: Shape, a: dict) -> str:
    """How the numpy Conv computes: ``pointwise`` (1x1, group 1: a matmul on the input as
    it is, strided/padded inputs subsampled first), ``depthwise`` (one input channel per
    group, any channel multiplier: the C kernels, or their per-tap numpy twins) or
    ``im2col`` (any other: one contiguous im2col, one matmul per group)."""
    if a["group"] == 1 and w[2] == w[3] == 1:
        return "pointwise"
    if a["group"] > 1 and w[1] == 1:
        return "depthwise"
    return "im2col"


# A 1x1 conv's weight gradient on planes of at least this many positions is a GEMM per
# sample; smaller planes take one GEMM over the batch (tensordot, whose transposed copies
# are then small). Measured at batch 32, one thread: DS-CNN's 64x64 on 25x5 planes 1.47 ms
# (tensordot) vs 0.54 (per sample); 64x64 on 5x5 0.11 vs 0.16; 320->1280 on 3x3 2.6 vs 4.8.
GEMM_PER_SAMPLE = 64


def _pointwise_input(x: np.ndarray, a: dict, ho: int, wo: int) -> np.ndarray:
    """The input samples a 1x1 kernel reads: padded, then every stride-th row and column."""
    sh, sw = a["strides"]
    if (sh, sw) == (1, 1) and not any(a["pads"]):
        return x
    xp = pad_nchw(x, a["pads"])
    return xp[:, :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]


def _dw_native(*arrays: np.ndarray) -> bool:
    """Depthwise through edgecl.kernels (C, or its numpy twin): float32 operands only."""
    return all(v.dtype == np.float32 for v in arrays)


def _live_taps(size: int, k: int, stride: int, p0: int, p1: int) -> tuple[int, int, int, int]:
    """Along one axis: the kernel taps ``lo:hi`` that read any input at some output
    position, and the pads that keep the output size with only those taps. On a small map
    (EfficientNet-Lite0 at 32x32 ends in 1x1 maps under 5x5 depthwise kernels) the other
    taps read padding only, and oneDNN still computes them (13 ms a call for [32, 1152, 1, 1]
    under 5x5): slicing them away took its whole training step (batch 32, one thread) from
    200 to 104 ms. The output is unchanged (the dropped taps multiply zeros; their gradient
    stays zero)."""
    out = (size + p0 + p1 - k) // stride + 1
    lo = max(0, p0 - (out - 1) * stride)  # taps before lo only ever read the top padding
    hi = min(k, size + p0)  # taps from hi on only ever read the bottom padding
    if (lo == 0 and hi == k) or hi <= lo:  # all live, or none (the output is the bias)
        return p0, p1, 0, k
    q0 = p0 - lo
    return q0, max(0, (out - 1) * stride + (hi - lo) - size - q0), lo, hi


def add_channel_bias(y: np.ndarray, bias: np.ndarray) -> None:
    """``y += bias`` on axis 1 of a contiguous [N, C, ...] array, in place. Past batch 1 the
    bias is repeated over a sample's positions once and added to each sample as one flat
    row: numpy's broadcast add runs one short inner loop per (sample, channel) plane
    ([32, 64, 25, 5]: 50 -> 27 us; [32, 1280, 3, 3]: 187 -> 41 us). Same sums either way."""
    if y.shape[0] == 1 or not y.flags.c_contiguous:
        y += bias.reshape(1, -1, *([1] * (y.ndim - 2)))
        return
    rows = y.reshape(y.shape[0], -1)
    rows += np.repeat(bias, rows.shape[1] // bias.shape[0])


class Conv(Op):
    """2-D convolution, NCHW / OIHW; groups (depthwise when group == channels), strides,
    pads (ONNX order: top, left, bottom, right), dilations, rectangular kernels."""

    name = "Conv"
    attrs = {"strides": (INTS, [1, 1]), "pads": (INTS, [0, 0, 0, 0]), "dilations": (INTS, [1, 1]),
             "group": (INT, 1)}
    param_roles = {1: "weight", 2: "bias"}
    n_inputs = (2, 3)
    mask = MaskRule(weight=1, bias=2, unit_axis=0, out_axis=1)
    fresh_output = True

    def infer(self, shapes, a):
        x, w = shapes[0], shapes[1]
        _, ho, wo, _ = conv_geometry(x, w, a)
        if len(shapes) > 2 and tuple(shapes[2]) != (w[0],):
            raise OpError(f"Conv: bias of shape {shapes[2]}, need ({w[0]},)")
        return [(x[0], w[0], ho, wo)]

    def working_set(self, shapes: Sequence[Shape], a: dict) -> tuple[int, int]:
        """Elements the numpy forward and backward hold besides the node's inputs, output
        and gradients (for the RAM planner): a padded copy of the input, the im2col
        columns (and their gradient), a 1x1 conv's subsampled input, tensordot's
        transposed copies; nothing for a depthwise conv (the C kernels) or the forward of
        a plain 1x1 conv."""
        x, w = shapes[0], shapes[1]
        g, ho, wo, cg = conv_geometry(x, w, a)
        n, c = x[0], x[1]
        pt, pl, pb, pr = a["pads"]
        xin, yout = n * c * x[2] * x[3], n * w[0] * ho * wo
        padded = n * c * (x[2] + pt + pb) * (x[3] + pl + pr) if any(a["pads"]) else 0
        kind = conv_kind(x, w, a)
        if kind == "depthwise":
            return 0, 0
        if kind == "pointwise":
            if not any(a["pads"]) and list(a["strides"]) == [1, 1]:
                return 0, (xin + yout if ho * wo < GEMM_PER_SAMPLE else 0)
            sub = n * c * ho * wo
            return padded + sub, padded + 2 * sub + max(padded, xin)
        cols = n * c * w[2] * w[3] * ho * wo
        return padded + cols, padded + 2 * cols + max(padded, xin)

    def forward(self, xs, a):
        x, w = xs[0], xs[1]
        g, ho, wo, cg = conv_geometry(x.shape, w.shape, a)
        n, o = x.shape[0], w.shape[0]
        kh, kw = w.shape[2], w.shape[3]
        kind = conv_kind(x.shape, w.shape, a)
        if kind == "depthwise" and _dw_native(x, w):
            out = kernels.depthwise_conv2d(np.ascontiguousarray(x), np.ascontiguousarray(w), a["strides"],
                                           a["pads"], a["dilations"])
        elif kind == "pointwise":
            xs1 = _pointwise_input(x, a, ho, wo)
            out = np.matmul(w.reshape(o, -1), xs1.reshape(n, xs1.shape[1], ho * wo))
        else:  # im2col: [N, g, cg*kh*kw, Ho*Wo], one matmul per group and sample
            cols = im2col(pad_nchw(x, a["pads"]), kh, kw, a, ho, wo)
            out = np.matmul(w.reshape(g, o // g, cg * kh * kw), cols.reshape(n, g, cg * kh * kw, ho * wo))
        out = np.ascontiguousarray(out.reshape(n, o, ho, wo), dtype=x.dtype)
        if len(xs) > 2 and xs[2] is not None:
            add_channel_bias(out, xs[2])
        return [out]

    def backward(self, xs, ys, gys, a, need):
        x, w = xs[0], xs[1]
        gy = np.ascontiguousarray(gys[0])
        g, ho, wo, cg = conv_geometry(x.shape, w.shape, a)
        n, o = x.shape[0], w.shape[0]
        kh, kw = w.shape[2], w.shape[3]
        gy3 = gy.reshape(n, o, ho * wo)
        out: list[np.ndarray | None] = [None] * len(xs)
        if len(xs) > 2 and need[2]:
            # each plane's sum as one BLAS product with ones, then over the batch: 4x faster
            # than numpy's reduction over axes (0, 2, 3) (DS-CNN's [32, 64, 25, 5]: 0.08 -> 0.02 ms)
            out[2] = np.matmul(gy3, np.ones(ho * wo, gy3.dtype)).sum(axis=0)
        kind = conv_kind(x.shape, w.shape, a)
        if kind == "depthwise" and _dw_native(x, w, gy):
            geo = (a["strides"], a["pads"], a["dilations"])
            if need[1]:
                out[1] = kernels.depthwise_conv2d_grad_weight(np.ascontiguousarray(x), gy, (kh, kw), *geo)
            if need[0]:
                out[0] = kernels.depthwise_conv2d_grad_input(gy, np.ascontiguousarray(w), x.shape, *geo)
            return out
        if kind == "pointwise":
            xs1 = _pointwise_input(x, a, ho, wo)
            if need[1]:
                x3 = xs1.reshape(n, xs1.shape[1], ho * wo)
                if ho * wo >= GEMM_PER_SAMPLE:  # a GEMM per sample, no transposed copies
                    gw = np.zeros((o, x3.shape[1]), np.result_type(gy3, x3))
                    part = np.empty_like(gw)
                    for s in range(n):
                        np.matmul(gy3[s], x3[s].T, out=part)
                        gw += part
                else:  # small planes: one GEMM over the batch (tensordot's transposed copies are small)
                    gw = np.tensordot(gy3, x3, axes=([0, 2], [0, 2]))
                out[1] = gw.reshape(w.shape).astype(w.dtype, copy=False)
            if need[0]:
                gx = np.matmul(w.reshape(o, -1).T, gy3).reshape(xs1.shape)
                if xs1 is not x:  # strided or padded: back to the samples read
                    gxp = np.zeros((n, x.shape[1], x.shape[2] + a["pads"][0] + a["pads"][2],
                                    x.shape[3] + a["pads"][1] + a["pads"][3]), gx.dtype)
                    gxp[:, :, : (ho - 1) * a["strides"][0] + 1 : a["strides"][0],
                        : (wo - 1) * a["strides"][1] + 1 : a["strides"][1]] = gx
                    gx = np.ascontiguousarray(unpad(gxp, a["pads"]))
                out[0] = gx.astype(x.dtype, copy=False)
            return out
        k = cg * kh * kw
        xp = pad_nchw(x, a["pads"])
        gy4 = gy.reshape(n, g, o // g, ho * wo)
        if need[1]:
            cols = im2col(xp, kh, kw, a, ho, wo).reshape(n, g, k, ho * wo)
            gw = np.zeros((g, o // g, k), np.result_type(gy, x))
            part = np.empty_like(gw)
            for s in range(n):  # one sample at a time: no transposed copy of the columns
                np.matmul(gy4[s], cols[s].swapaxes(-1, -2), out=part)
                gw += part
            out[1] = gw.reshape(w.shape).astype(w.dtype, copy=False)
        if need[0]:
            gcols = np.matmul(w.reshape(g, o // g, k).swapaxes(-1, -2), gy4)
            gxp = col2im(gcols.reshape(n, x.shape[1], kh, kw, ho, wo), xp.shape, a)
            out[0] = np.ascontiguousarray(unpad(gxp, a["pads"])).astype(x.dtype, copy=False)
        return out

    def torch(self, xs, a):
        import torch
        import torch.nn.functional as F

        x, w = xs[0], xs[1]
        pt, pl, pb, pr = a["pads"]
        if list(a["dilations"]) == [1, 1] and any(a["pads"]):
            (pt, pb, lo_h, hi_h), (pl, pr, lo_w, hi_w) = (
                _live_taps(x.shape[2], w.shape[2], a["strides"][0], pt, pb),
                _live_taps(x.shape[3], w.shape[3], a["strides"][1], pl, pr))
            w = w[:, :, lo_h:hi_h, lo_w:hi_w]
        if (pt, pl) != (pb, pr):
            x, pad = F.pad(x, (pl, pr, pt, pb)), (0, 0)
        else:
            pad = (pt, pl)
        # channels-last: oneDNN's depthwise and 1x1 kernels are faster in NHWC (EfficientNet-
        # Lite0's host training step at 32x32: 104 -> 79 ms); the output is NHWC too
        nhwc = torch.channels_last
        x, w = x.contiguous(memory_format=nhwc), w.contiguous(memory_format=nhwc)
        b = xs[2] if len(xs) > 2 else None
        return [F.conv2d(x, w, b, tuple(a["strides"]), pad, tuple(a["dilations"]), a["group"])]

    def onnx(self, b, inputs, outputs, a):
        kernel = list(b.shape(inputs[1])[2:])
        b.node("Conv", inputs, outputs, kernel_shape=kernel, strides=a["strides"], pads=a["pads"],
               dilations=a["dilations"], group=a["group"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        pt, pl, pb, pr = a["pads"]
        y = bb.emit(relax.op.nn.conv2d(xs[0], xs[1], strides=a["strides"], padding=[pt, pl, pb, pr],
                                       dilation=a["dilations"], groups=a["group"]))
        if len(xs) > 2:
            y = bb.emit(relax.op.add(y, relax.op.reshape(xs[2], (1, -1, 1, 1))))
        return [y]

    def tflite(self, b, inputs, outputs, a, shapes):
        # NHWC. group 1: CONV_2D; depthwise (one input channel per group): DEPTHWISE_CONV_2D
        # (any channel multiplier); other groups: SPLIT the channels, one CONV_2D per group
        # on its rows of the weight, CONCATENATION.
        x, w = shapes[0], shapes[1]
        g, ho, wo, cg = conv_geometry(x, w, a)
        (sh, sw), (dh, dw) = a["strides"], a["dilations"]
        xt, padding = b.padded(inputs[0], a["pads"], w[2:], a["strides"], a["dilations"], (ho, wo))
        opts = dict(padding=padding, stride_w=sw, stride_h=sh, dilation_w_factor=dw, dilation_h_factor=dh)
        bias = inputs[2] if len(inputs) > 2 else None
        y = b.output(outputs[0], "nhwc")

        def bias_of(rows):  # TFLite's conv kernels need a bias: zeros when the node has none
            if bias is None:
                return b.const(np.zeros(rows[1] - rows[0], np.float32))
            return b.param(bias, rows=None if rows == (0, w[0]) else rows)

        if g == 1 or cg == 1:
            depthwise = g > 1
            ins = [xt, b.param(inputs[1], "1hwo" if depthwise else "ohwi"), bias_of((0, w[0]))]
            if depthwise:
                b.op("DEPTHWISE_CONV_2D", ins, [y], depth_multiplier=w[0] // g, **opts)
            else:
                b.op("CONV_2D", ins, [y], **opts)
            return
        parts = [b.tensor([*b.tshape(xt)[:3], cg], like=xt) for _ in range(g)]
        b.op("SPLIT", [b.const(np.array(3, np.int32)), xt], parts, num_splits=g)
        og, ys = w[0] // g, []
        for i, part in enumerate(parts):
            rows = (i * og, (i + 1) * og)
            ys.append(b.tensor([*b.tshape(y)[:3], og], like=y))
            b.op("CONV_2D", [part, b.param(inputs[1], "ohwi", rows), bias_of(rows)], [ys[-1]], **opts)
        b.op("CONCATENATION", ys, [y], axis=3)


class Linear(Op):
    """``y = x @ weight.T + bias`` over the last axis (PyTorch's layout, weight [out, in])."""

    name = "Linear"
    param_roles = {1: "weight", 2: "bias"}
    n_inputs = (2, 3)
    mask = MaskRule(weight=1, bias=2, unit_axis=0, out_axis=-1)
    fresh_output = True

    def infer(self, shapes, a):
        x, w = shapes[0], shapes[1]
        if len(w) != 2 or len(x) < 2 or x[-1] != w[1]:
            raise OpError(f"Linear: input {tuple(x)} does not fit weight {tuple(w)} ([out, in])")
        if len(shapes) > 2 and tuple(shapes[2]) != (w[0],):
            raise OpError(f"Linear: bias of shape {shapes[2]}, need ({w[0]},)")
        return [(*x[:-1], w[0])]

    def forward(self, xs, a):
        y = xs[0] @ xs[1].T
        if len(xs) > 2 and xs[2] is not None:
            y += xs[2]
        return [y]

    def backward(self, xs, ys, gys, a, need):
        x, w, gy = xs[0], xs[1], gys[0]
        out: list[np.ndarray | None] = [None] * len(xs)
        if need[0]:
            out[0] = gy @ w
        if need[1]:
            out[1] = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if len(xs) > 2 and need[2]:
            out[2] = gy.reshape(-1, gy.shape[-1]).sum(axis=0)
        return out

    def torch(self, xs, a):
        import torch.nn.functional as F

        return [F.linear(xs[0], xs[1], xs[2] if len(xs) > 2 else None)]

    def onnx(self, b, inputs, outputs, a):
        if len(b.shape(inputs[0])) == 2:
            b.node("Gemm", inputs, outputs, transB=1)
            return
        wt = b.tmp()
        b.node("Transpose", [inputs[1]], [wt], perm=[1, 0])
        if len(inputs) == 2:
            b.node("MatMul", [inputs[0], wt], outputs)
        else:
            mm = b.tmp()
            b.node("MatMul", [inputs[0], wt], [mm])
            b.node("Add", [mm, inputs[2]], outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        y = bb.emit(relax.op.linear(xs[0], xs[1], xs[2] if len(xs) > 2 else None))
        return [y]

    def tflite(self, b, inputs, outputs, a, shapes):
        bias = b.param(inputs[2]) if len(inputs) > 2 else -1  # -1: no bias (an optional input)
        b.op("FULLY_CONNECTED", [b.get(inputs[0]), b.param(inputs[1]), bias], [b.output(outputs[0])],
             keep_num_dims=int(len(shapes[0]) > 2))


class MatMul(Op):
    """numpy's ``a @ b`` (batched over leading axes), e.g. attention scores."""

    name = "MatMul"
    n_inputs = (2, 2)

    def infer(self, shapes, a):
        x, y = shapes
        if len(x) < 2 or len(y) < 2 or x[-1] != y[-2]:
            raise OpError(f"MatMul: shapes {tuple(x)} and {tuple(y)} do not multiply")
        try:
            lead = np.broadcast_shapes(tuple(x[:-2]), tuple(y[:-2]))
        except ValueError:
            raise OpError(f"MatMul: batch axes of {tuple(x)} and {tuple(y)} do not broadcast") from None
        return [(*lead, x[-2], y[-1])]

    def forward(self, xs, a):
        return [np.matmul(xs[0], xs[1])]

    def backward(self, xs, ys, gys, a, need):
        x, y, gy = xs[0], xs[1], gys[0]
        gx = unbroadcast(gy @ np.swapaxes(y, -1, -2), x.shape) if need[0] else None
        gw = unbroadcast(np.swapaxes(x, -1, -2) @ gy, y.shape) if need[1] else None
        return [gx, gw]

    def torch(self, xs, a):
        import torch

        return [torch.matmul(xs[0], xs[1])]

    def onnx(self, b, inputs, outputs, a):
        b.node("MatMul", inputs, outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.matmul(xs[0], xs[1]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        b.op("BATCH_MATMUL", [b.get(inputs[0]), b.get(inputs[1])], [b.output(outputs[0])])


class Gather(Op):
    """Rows of a table (an embedding lookup): ``table[indices]`` (ONNX Gather, axis 0).

    Input 0 is the table (a parameter), input 1 the int64 indices."""

    name = "Gather"
    param_roles = {0: "embedding"}
    n_inputs = (2, 2)
    mask = MaskRule(weight=0, bias=None, unit_axis=1, out_axis=-1)

    def infer(self, shapes, a):
        table, idx = shapes
        if len(table) != 2:
            raise OpError(f"Gather: the table must be 2-D [rows, dim], got {tuple(table)}")
        return [(*idx, table[1])]

    def forward(self, xs, a):
        table, idx = xs
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= table.shape[0]):
            raise OpError(f"Gather: indices outside [0, {table.shape[0]})")
        return [table[idx]]

    def backward(self, xs, ys, gys, a, need):
        table, idx = xs
        out: list[np.ndarray | None] = [None, None]
        if need[0]:
            g = np.zeros_like(table)
            np.add.at(g, np.asarray(idx, dtype=np.int64).reshape(-1), gys[0].reshape(-1, table.shape[1]))
            out[0] = g
        return out

    def torch(self, xs, a):
        import torch.nn.functional as F

        return [F.embedding(xs[1].long(), xs[0])]

    def onnx(self, b, inputs, outputs, a):
        b.node("Gather", inputs, outputs, axis=0)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.take(xs[0], xs[1], axis=0))]

    def tflite(self, b, inputs, outputs, a, shapes):
        b.op("GATHER", [b.param(inputs[0]), b.get(inputs[1])], [b.output(outputs[0])], axis=0)
