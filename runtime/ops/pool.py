"""Pooling and reductions: MaxPool, AveragePool, GlobalAveragePool, ReduceMean."""

from __future__ import annotations

import numpy as np

from .base import INT, INTS, Op, OpError, norm_axis
from .nn import fold, pad_nchw, unpad, windows


def _pool_out(x, a, name: str) -> tuple[int, int]:
    if len(x) != 4:
        raise OpError(f"{name}: takes NCHW input, got {tuple(x)}")
    kh, kw = a["kernel_shape"]
    sh, sw = a["strides"] or a["kernel_shape"]
    pt, pl, pb, pr = a["pads"]
    num_h, num_w = x[2] + pt + pb - kh, x[3] + pl + pr - kw
    if a["ceil_mode"]:
        ho, wo = -(-num_h // sh) + 1, -(-num_w // sw) + 1
    else:
        ho, wo = num_h // sh + 1, num_w // sw + 1
    if ho < 1 or wo < 1:
        raise OpError(f"{name}: input {tuple(x)} is smaller than the kernel {a['kernel_shape']}")
    return ho, wo


def _attrs(a: dict) -> dict:
    """Strides default to the kernel (PyTorch's convention, explicit in the graph)."""
    return {**a, "strides": a["strides"] or a["kernel_shape"], "dilations": [1, 1]}


def _extra(x_shape, a, ho, wo) -> list[int]:
    """Pads with the ceil-mode overhang added at the bottom and right."""
    kh, kw = a["kernel_shape"]
    sh, sw = a["strides"]
    pt, pl, pb, pr = a["pads"]
    eh = max(0, (ho - 1) * sh + kh - (x_shape[2] + pt + pb))
    ew = max(0, (wo - 1) * sw + kw - (x_shape[3] + pl + pr))
    return [pt, pl, pb + eh, pr + ew]


class MaxPool(Op):
    name = "MaxPool"
    attrs = {"kernel_shape": (INTS, None), "strides": (INTS, []), "pads": (INTS, [0, 0, 0, 0]),
             "ceil_mode": (INT, 0)}

    def infer(self, shapes, a):
        ho, wo = _pool_out(shapes[0], a, self.name)
        return [(shapes[0][0], shapes[0][1], ho, wo)]

    def _win(self, x, a):
        a = _attrs(a)
        ho, wo = _pool_out(x.shape, a, self.name)
        pads = _extra(x.shape, a, ho, wo)
        xp = pad_nchw(x, pads, -np.inf)
        return a, pads, xp, windows(xp, *a["kernel_shape"], *a["strides"], 1, 1, ho, wo)

    def forward(self, xs, a):
        _, _, _, win = self._win(xs[0], a)
        return [win.max(axis=(4, 5))]

    def backward(self, xs, ys, gys, a, need):
        a2, pads, xp, win = self._win(xs[0], a)
        n, c, ho, wo, kh, kw = win.shape
        flat = win.reshape(n, c, ho, wo, kh * kw)
        hit = np.zeros(flat.shape, dtype=gys[0].dtype)
        # The first maximum of each window takes the gradient (as PyTorch does).
        np.put_along_axis(hit, flat.argmax(axis=-1)[..., None], gys[0][..., None], axis=-1)
        g = fold(hit.reshape(n, c, ho, wo, kh, kw), xp.shape, a2, kh, kw)
        return [unpad(g, pads)]

    def torch(self, xs, a):
        import torch.nn.functional as F

        a2 = _attrs(a)
        x = xs[0]
        pt, pl, pb, pr = a["pads"]
        if (pt, pl) != (pb, pr):
            x, pad = F.pad(x, (pl, pr, pt, pb), value=float("-inf")), (0, 0)
        else:
            pad = (pt, pl)
        return [F.max_pool2d(x, tuple(a["kernel_shape"]), tuple(a2["strides"]), pad,
                             ceil_mode=bool(a["ceil_mode"]))]

    def onnx(self, b, inputs, outputs, a):
        a2 = _attrs(a)
        b.node("MaxPool", inputs, outputs, kernel_shape=a["kernel_shape"], strides=a2["strides"],
               pads=a["pads"], ceil_mode=a["ceil_mode"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        # ceil mode as explicit bottom/right padding (as forward does): TVM, like PyTorch,
        # drops a last window that starts in the padding, the registry's shapes keep it
        a2 = _attrs(a)
        ho, wo = _pool_out(shapes[0], a2, self.name)
        pads = _extra(shapes[0], a2, ho, wo)
        return [bb.emit(relax.op.nn.max_pool2d(xs[0], a["kernel_shape"], a2["strides"], pads))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # NHWC MAX_POOL_2D; pads and the ceil-mode overhang as SAME (which ignores padded
        # cells) or PADV2 with -inf and VALID
        a2 = _attrs(a)
        ho, wo = _pool_out(shapes[0], a2, self.name)
        (kh, kw), (sh, sw) = a2["kernel_shape"], a2["strides"]
        x, padding = b.padded(inputs[0], _extra(shapes[0], a2, ho, wo), (kh, kw), (sh, sw), (1, 1), (ho, wo),
                              value=-np.inf)
        b.op("MAX_POOL_2D", [x], [b.output(outputs[0], "nhwc")], padding=padding, stride_w=sw, stride_h=sh,
             filter_width=kw, filter_height=kh)


class AveragePool(Op):
    name = "AveragePool"
    attrs = {"kernel_shape": (INTS, None), "strides": (INTS, []), "pads": (INTS, [0, 0, 0, 0]),
             "ceil_mode": (INT, 0), "count_include_pad": (INT, 1)}

    def infer(self, shapes, a):
        ho, wo = _pool_out(shapes[0], a, self.name)
        return [(shapes[0][0], shapes[0][1], ho, wo)]

    def _counts(self, x_shape, a, pads, ho, wo) -> np.ndarray:
        ones = np.ones((1, 1, *x_shape[2:]), np.float32)
        if a["count_include_pad"]:
            pt, pl, pb, pr = a["pads"]
            ones = pad_nchw(ones, [pt, pl, pb, pr], 1.0)
            pads = [0, 0, pads[2] - pb, pads[3] - pr]
        win = windows(pad_nchw(ones, pads), *a["kernel_shape"], *a["strides"], 1, 1, ho, wo)
        return win.sum(axis=(4, 5))

    def forward(self, xs, a):
        x = xs[0]
        a2 = _attrs(a)
        ho, wo = _pool_out(x.shape, a2, self.name)
        pads = _extra(x.shape, a2, ho, wo)
        win = windows(pad_nchw(x, pads), *a2["kernel_shape"], *a2["strides"], 1, 1, ho, wo)
        return [(win.sum(axis=(4, 5)) / self._counts(x.shape, a2, pads, ho, wo)).astype(x.dtype)]

    def backward(self, xs, ys, gys, a, need):
        x = xs[0]
        a2 = _attrs(a)
        ho, wo = _pool_out(x.shape, a2, self.name)
        pads = _extra(x.shape, a2, ho, wo)
        kh, kw = a2["kernel_shape"]
        g = gys[0] / self._counts(x.shape, a2, pads, ho, wo)
        gcol = np.broadcast_to(g[..., None, None], (*g.shape, kh, kw))
        padded = (x.shape[0], x.shape[1], x.shape[2] + pads[0] + pads[2], x.shape[3] + pads[1] + pads[3])
        return [unpad(fold(gcol, padded, a2, kh, kw), pads).astype(x.dtype)]

    def torch(self, xs, a):
        import torch.nn.functional as F

        a2 = _attrs(a)
        pt, pl, pb, pr = a["pads"]
        if (pt, pl) != (pb, pr):
            raise OpError("AveragePool: asymmetric pads have no PyTorch equivalent")
        return [F.avg_pool2d(xs[0], tuple(a["kernel_shape"]), tuple(a2["strides"]), (pt, pl),
                             ceil_mode=bool(a["ceil_mode"]),
                             count_include_pad=bool(a["count_include_pad"]))]

    def onnx(self, b, inputs, outputs, a):
        a2 = _attrs(a)
        b.node("AveragePool", inputs, outputs, kernel_shape=a["kernel_shape"], strides=a2["strides"],
               pads=a["pads"], ceil_mode=a["ceil_mode"], count_include_pad=a["count_include_pad"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        # the window sums (ceil mode as explicit padding, see MaxPool) divided by forward's
        # own element counts, a constant: exact for every pads / ceil_mode / count_include_pad
        a2 = _attrs(a)
        ho, wo = _pool_out(shapes[0], a2, self.name)
        pads = _extra(shapes[0], a2, ho, wo)
        kh, kw = a2["kernel_shape"]
        mean = relax.op.nn.avg_pool2d(xs[0], a2["kernel_shape"], a2["strides"], pads, count_include_pad=True)
        counts = self._counts(shapes[0], a2, pads, ho, wo).astype(np.float32)
        return [bb.emit(relax.op.multiply(mean, relax.const(np.float32(kh * kw) / counts)))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # NHWC AVERAGE_POOL_2D. TFLite's SAME averages the real cells only (count_include_pad
        # 0); otherwise PAD with zeros, VALID (which divides by kh * kw), then MUL by
        # kh * kw / count wherever the graph's count differs.
        a2 = _attrs(a)
        ho, wo = _pool_out(shapes[0], a2, self.name)
        pads = _extra(shapes[0], a2, ho, wo)
        (kh, kw), (sh, sw) = a2["kernel_shape"], a2["strides"]
        x, padding = b.padded(inputs[0], pads, (kh, kw), (sh, sw), (1, 1), (ho, wo),
                              same=not a["count_include_pad"])
        opts = dict(padding=padding, stride_w=sw, stride_h=sh, filter_width=kw, filter_height=kh)
        y = b.output(outputs[0], "nhwc")
        counts = self._counts(shapes[0], a2, pads, ho, wo)
        if padding == b.SAME or np.all(counts == kh * kw):
            b.op("AVERAGE_POOL_2D", [x], [y], **opts)
            return
        t = b.tensor(like=y)
        b.op("AVERAGE_POOL_2D", [x], [t], **opts)
        scale = (np.float32(kh * kw) / counts).astype(np.float32).transpose(0, 2, 3, 1)
        b.op("MUL", [t, b.const(scale)], [y])


class GlobalAveragePool(Op):
    """Mean over the spatial axes, kept as size 1 (ONNX): [N, C, H, W] -> [N, C, 1, 1]."""

    name = "GlobalAveragePool"

    def infer(self, shapes, a):
        x = shapes[0]
        if len(x) < 3:
            raise OpError(f"GlobalAveragePool: takes [N, C, spatial...], got {tuple(x)}")
        return [(x[0], x[1]) + (1,) * (len(x) - 2)]

    def forward(self, xs, a):
        x = xs[0]
        out = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        if x.dtype == np.float32:
            # each plane's sum by einsum's contiguous-row reduction, then / its size: a third
            # of np.mean's time on small planes ([32, 64, 25, 5]: 86 -> 27 us; numpy's
            # pairwise reduction pays per 125-value row); per plane, so the same bytes at any batch
            n = int(np.prod(x.shape[2:]))
            sums = np.einsum("ncp->nc", np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], n))
            return [(sums / np.float32(n)).reshape(out)]
        return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float32).astype(x.dtype)]

    def backward(self, xs, ys, gys, a, need):
        x = xs[0]
        n = int(np.prod(x.shape[2:]))
        return [np.broadcast_to(gys[0] / np.float32(n), x.shape).astype(x.dtype)]

    def torch(self, xs, a):
        x = xs[0]
        return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]

    def onnx(self, b, inputs, outputs, a):
        b.node("GlobalAveragePool", inputs, outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        axes = list(range(2, len(shapes[0])))
        return [bb.emit(relax.op.mean(xs[0], axis=axes, keepdims=True))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # MEAN over H, W of the NHWC value (other ranks: over the spatial axes, graph layout)
        rank = len(shapes[0])
        lay, axes = ("nhwc", [1, 2]) if rank == 4 else ("graph", list(range(2, rank)))
        b.op("MEAN", [b.get(inputs[0], lay), b.const(np.array(axes, np.int32))], [b.output(outputs[0], lay)],
             keep_dims=1)


class ReduceMean(Op):
    name = "ReduceMean"
    attrs = {"axes": (INTS, None), "keepdims": (INT, 1)}

    def _axes(self, a, rank):
        return tuple(sorted(norm_axis(ax, rank) for ax in a["axes"]))

    def infer(self, shapes, a):
        x = shapes[0]
        axes = self._axes(a, len(x))
        if a["keepdims"]:
            return [tuple(1 if i in axes else s for i, s in enumerate(x))]
        return [tuple(s for i, s in enumerate(x) if i not in axes)]

    def forward(self, xs, a):
        x = xs[0]
        return [x.mean(axis=self._axes(a, x.ndim), keepdims=bool(a["keepdims"])).astype(x.dtype)]

    def backward(self, xs, ys, gys, a, need):
        x = xs[0]
        axes = self._axes(a, x.ndim)
        g = gys[0] if a["keepdims"] else np.expand_dims(gys[0], axes)
        n = int(np.prod([x.shape[i] for i in axes]))
        return [np.broadcast_to(g / np.float32(n), x.shape).astype(x.dtype)]

    def torch(self, xs, a):
        x = xs[0]
        return [x.mean(dim=self._axes(a, x.dim()), keepdim=bool(a["keepdims"]))]

    def onnx(self, b, inputs, outputs, a):
        # axes is an attribute up to opset 17
        b.node("ReduceMean", inputs, outputs, axes=a["axes"], keepdims=a["keepdims"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.mean(xs[0], axis=list(self._axes(a, len(shapes[0]))),
                                      keepdims=bool(a["keepdims"])))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # MEAN; on an NHWC value with its axes permuted (unless dropping axes would leave
        # the kept ones out of graph order: then on the graph layout)
        axes = self._axes(a, len(shapes[0]))
        lay = b.layout(inputs[0])
        if lay == "nhwc":
            kept = [ax for ax in (0, 2, 3, 1) if ax not in axes]  # NHWC storage order
            if not a["keepdims"] and kept != sorted(kept):
                lay = "graph"
            else:
                axes = tuple(sorted((0, 3, 1, 2)[ax] for ax in axes))
        b.op("MEAN", [b.get(inputs[0], lay), b.const(np.array(axes, np.int32))],
             [b.output(outputs[0], lay if a["keepdims"] else "graph")], keep_dims=a["keepdims"])
