"""Ops that move data without arithmetic: Flatten, Reshape, Transpose, Concat."""

from __future__ import annotations

import numpy as np

from .base import INT, INTS, Op, OpError, norm_axis, prod


class Flatten(Op):
    """[d0, ..., d(axis-1), rest] -> [prod(d0..d(axis-1)), prod(rest)] (ONNX)."""

    name = "Flatten"
    attrs = {"axis": (INT, 1)}

    def infer(self, shapes, a):
        x = shapes[0]
        ax = a["axis"] + len(x) if a["axis"] < 0 else a["axis"]
        if not 0 <= ax <= len(x):
            raise OpError(f"Flatten: axis {a['axis']} is out of range for rank {len(x)}")
        return [(prod(x[:ax]), prod(x[ax:]))]

    def forward(self, xs, a):
        return [xs[0].reshape(self.infer([xs[0].shape], a)[0])]

    def backward(self, xs, ys, gys, a, need):
        return [gys[0].reshape(xs[0].shape)]

    def torch(self, xs, a):
        return [xs[0].reshape(self.infer([tuple(xs[0].shape)], a)[0])]

    def onnx(self, b, inputs, outputs, a):
        b.node("Flatten", inputs, outputs, axis=a["axis"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.reshape(xs[0], self.infer(shapes, a)[0]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # RESHAPE of the value in the graph's memory order (an NHWC map is transposed back)
        tgt = b.target(outputs[0])
        b.op("RESHAPE", [b.get(inputs[0], "order"), b.const(np.array(tgt, np.int32))], [b.output(outputs[0])],
             new_shape=tgt)


def reshape_target(x: tuple[int, ...], spec: list[int]) -> tuple[int, ...]:
    """ONNX Reshape: 0 copies the input's size at that axis, one -1 is inferred."""
    out = [x[i] if s == 0 else s for i, s in enumerate(spec)]
    if out.count(-1) > 1 or any(s < -1 for s in out):
        raise OpError(f"Reshape: invalid target {spec}")
    if -1 in out:
        known = prod(s for s in out if s != -1)
        if known == 0 or prod(x) % known:
            raise OpError(f"Reshape: cannot reshape {tuple(x)} to {spec}")
        out[out.index(-1)] = prod(x) // known
    if prod(out) != prod(x):
        raise OpError(f"Reshape: cannot reshape {tuple(x)} to {spec}")
    return tuple(out)


class Reshape(Op):
    """The target shape is an attribute (batch axis first, usually 0 = keep it)."""

    name = "Reshape"
    attrs = {"shape": (INTS, None)}

    def infer(self, shapes, a):
        return [reshape_target(tuple(shapes[0]), a["shape"])]

    def forward(self, xs, a):
        return [xs[0].reshape(reshape_target(xs[0].shape, a["shape"]))]

    def backward(self, xs, ys, gys, a, need):
        return [gys[0].reshape(xs[0].shape)]

    def torch(self, xs, a):
        return [xs[0].reshape(reshape_target(tuple(xs[0].shape), a["shape"]))]

    def onnx(self, b, inputs, outputs, a):
        b.node("Reshape", [inputs[0], b.const(np.array(a["shape"], np.int64))], outputs)

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.reshape(xs[0], reshape_target(tuple(shapes[0]), a["shape"])))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # RESHAPE of the value in the graph's memory order (an NHWC map is transposed back)
        tgt = b.target(outputs[0])
        b.op("RESHAPE", [b.get(inputs[0], "order"), b.const(np.array(tgt, np.int32))], [b.output(outputs[0])],
             new_shape=tgt)


class Transpose(Op):
    name = "Transpose"
    attrs = {"perm": (INTS, None)}

    def infer(self, shapes, a):
        x = shapes[0]
        if sorted(a["perm"]) != list(range(len(x))):
            raise OpError(f"Transpose: perm {a['perm']} is not a permutation of rank {len(x)}")
        return [tuple(x[p] for p in a["perm"])]

    def forward(self, xs, a):
        return [np.transpose(xs[0], a["perm"])]

    def backward(self, xs, ys, gys, a, need):
        return [np.transpose(gys[0], np.argsort(a["perm"]))]

    def torch(self, xs, a):
        return [xs[0].permute(*a["perm"])]

    def onnx(self, b, inputs, outputs, a):
        b.node("Transpose", inputs, outputs, perm=a["perm"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.permute_dims(xs[0], a["perm"]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # TRANSPOSE; from an NHWC value with the perm composed (no transpose back first)
        lay = b.layout(inputs[0])
        perm = a["perm"] if lay == "graph" else [(0, 3, 1, 2)[p] for p in a["perm"]]
        b.op("TRANSPOSE", [b.get(inputs[0], lay), b.const(np.array(perm, np.int32))], [b.output(outputs[0])])


class Concat(Op):
    name = "Concat"
    attrs = {"axis": (INT, 1)}
    n_inputs = (1, 1 << 16)

    def infer(self, shapes, a):
        rank = len(shapes[0])
        ax = norm_axis(a["axis"], rank)
        for s in shapes[1:]:
            if len(s) != rank or any(s[i] != shapes[0][i] for i in range(rank) if i != ax):
                raise OpError(f"Concat: shapes {[tuple(s) for s in shapes]} differ off axis {a['axis']}")
        out = list(shapes[0])
        out[ax] = sum(s[ax] for s in shapes)
        return [tuple(out)]

    def forward(self, xs, a):
        return [np.concatenate(xs, axis=a["axis"])]

    def backward(self, xs, ys, gys, a, need):
        ax = norm_axis(a["axis"], xs[0].ndim)
        cuts = np.cumsum([x.shape[ax] for x in xs])[:-1]
        parts = np.split(gys[0], cuts, axis=ax)
        return [p if n else None for p, n in zip(parts, need, strict=True)]

    def torch(self, xs, a):
        import torch

        return [torch.cat(list(xs), dim=a["axis"])]

    def onnx(self, b, inputs, outputs, a):
        b.node("Concat", inputs, outputs, axis=a["axis"])

    def tvm(self, bb, xs, a, shapes):
        from tvm import relax

        return [bb.emit(relax.op.concat(list(xs), axis=a["axis"]))]

    def tflite(self, b, inputs, outputs, a, shapes):
        # CONCATENATION; 4-D inputs of which one is NHWC are joined in NHWC (axis permuted)
        rank = len(shapes[0])
        ax = norm_axis(a["axis"], rank)
        lay = "nhwc" if rank == 4 and any(b.layout(i) == "nhwc" for i in inputs) else "graph"
        if lay == "nhwc":
            ax = (0, 3, 1, 2)[ax]
        b.op("CONCATENATION", [b.get(i, lay) for i in inputs], [b.output(outputs[0], lay)], axis=ax)
