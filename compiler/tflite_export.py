"""TFLite export of a bundle's model graph, op by op through the registry (no TensorFlow).

One *template* per distinct class count, like the ONNX export: a complete ``.tflite``
model (schema version 3, written as a flatbuffer by hand) whose weight buffers are cut
out of the stored file. Every node of ``graph.backbone_nodes`` is emitted by its op's
``tflite(b, inputs, outputs, attrs, shapes)`` method in the registry
(``edgecl.runtime.ops``) into a :class:`TfliteBuilder` ``b``; the task's head is a
``FULLY_CONNECTED`` on the features, output ``logits`` ``[N, classes]``.

**Weights are holes.** Every parameter the backbone uses (and the head) is a float32
constant buffer whose bytes are zero when serialized and cut out of the stored template.
The manifest lists the cut-outs ("holes": ``offset`` in the full model, ``bytes``, the
TFLite ``tensor``, the graph ``param`` (or ``head``), a ``layout`` and optional ``rows``).
On task activation the device takes ``ActiveTask.params[param]`` (``W ⊙ M``), puts it
in the hole's layout and writes it at the offset (``runtime/backends/tflite.py``, numpy
only), then hands the bytes to the interpreter, which treats them as constants (XNNPACK
packs them once per task switch, not per call). Hole layouts (from the graph's array):
``as-is``; ``ohwi`` (Conv weight OIHW -> OHWI); ``1hwo`` (depthwise weight
[O, 1, kh, kw] -> [1, kh, kw, O]); ``nhwc`` (a constant operand of an elementwise op
on an NHWC value: leading 1s up to rank 4, then NCHW -> NHWC); ``rows: [a, b]`` slices
axis 0 first (one group of a grouped Conv). The stored template is a few KiB; the
backbone is never stored twice.

**Layout: 4-D values live in NHWC, everything else keeps the graph's layout.** The
graph is NCHW; TFLite's convolutions and pools are NHWC only. The builder tracks, for
every graph value, the layout(s) it has been materialized in:

* Conv, MaxPool, AveragePool, GlobalAveragePool (4-D) and BatchNormalization on 4-D
  input read their input in NHWC and write NHWC.
* Elementwise unary ops keep their input's layout; binary ops (and Concat) work in
  NHWC when a 4-D operand already is NHWC and every operand can follow (4-D, or a
  parameter), with Concat's axis permuted; else in graph layout.
* ReduceMean, Transpose and Softmax permute their axes / perm when their input is
  NHWC; every other op (Flatten, Reshape, Linear, MatMul, Gather, LayerNormalization,
  ...) reads the graph layout.
* When a consumer needs the other layout, one ``TRANSPOSE`` (``[0, 2, 3, 1]`` or
  ``[0, 3, 1, 2]``) is inserted, once per value; when both layouts have the same memory
  order (C == 1, or H == W == 1 as after a global pool) it is a ``RESHAPE`` instead.
  A 4-D graph input is therefore transposed once, right after the input.

So weights never need column permutations (a Flatten of an NHWC map transposes the
map back to NCHW first) and each op's emission stays local.

The batch axis is dynamic (tensor shape ``[1, ...]``, ``shape_signature`` ``-1`` on the
axes that scale with the batch, found from the graph's shapes at batch 1 and 2); the
backend resizes the input per batch size. An op without a TFLite emission raises
``NotImplementedError``; :func:`export_bundle` then records the reason (naming the node
and op) in the manifest instead of models, and the backend is unavailable with it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgecl.runtime.backends.tflite import fill_template, hole_tensors, to_layout  # noqa: F401  (device half)
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_write import commit_files
from edgecl.runtime.graph import Graph, GraphError
from edgecl.runtime.ops import get_op

SCHEMA_VERSION = 3
FILE_ID = b"TFL3"
BUFFER_ALIGN = 16
LAYOUT = "nhwc-4d"

# schema.fbs enums (checked against ai_edge_litert/schema_py_generated.py)
FLOAT32, INT32, INT64 = 0, 2, 4
DTYPES = {"float32": FLOAT32, "int32": INT32, "int64": INT64}
SAME, VALID = 0, 1
NHWC, GRAPH, ANY, ORDER = "nhwc", "graph", "any", "order"
TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)

# builtin -> (operator code, builtin options type, ((field, kind, default), ...) in slot order);
# every field listed is always written (the schema's defaults are not always usable: a
# stride of 0, a softmax beta of 0).
_ACT = ("fused_activation_function", "i8", 0)
_WINDOW = (("padding", "i8", VALID), ("stride_w", "i32", 1), ("stride_h", "i32", 1))
_DIL = (("dilation_w_factor", "i32", 1), ("dilation_h_factor", "i32", 1))
_POOL = (*_WINDOW, ("filter_width", "i32", 1), ("filter_height", "i32", 1), _ACT)
BUILTINS: dict[str, tuple[int, int, tuple]] = {
    "ADD": (0, 11, (_ACT,)),
    "AVERAGE_POOL_2D": (1, 5, _POOL),
    "CONCATENATION": (2, 10, (("axis", "i32", 0), _ACT)),
    "CONV_2D": (3, 1, (*_WINDOW, _ACT, *_DIL)),
    "DEPTHWISE_CONV_2D": (4, 2, (*_WINDOW, ("depth_multiplier", "i32", 1), _ACT, *_DIL)),
    "FULLY_CONNECTED": (9, 8, (_ACT, ("weights_format", "i8", 0), ("keep_num_dims", "i8", 0))),
    "LOGISTIC": (14, 0, ()),
    "MAX_POOL_2D": (17, 5, _POOL),
    "MUL": (18, 21, (_ACT,)),
    "RELU": (19, 0, ()),
    "RELU_N1_TO_1": (20, 0, ()),
    "RELU6": (21, 0, ()),
    "RESHAPE": (22, 17, (("new_shape", "vec32", None),)),
    "SOFTMAX": (25, 9, (("beta", "f32", 1.0),)),
    "TANH": (28, 0, ()),
    "PAD": (34, 22, ()),
    "GATHER": (36, 23, (("axis", "i32", 0), ("batch_dims", "i32", 0))),
    "TRANSPOSE": (39, 26, ()),
    "MEAN": (40, 27, (("keep_dims", "i8", 0),)),
    "SUB": (41, 28, (_ACT,)),
    "DIV": (42, 29, (_ACT,)),
    "SPLIT": (49, 35, (("num_splits", "i32", 1),)),
    "MAXIMUM": (55, 39, ()),
    "MINIMUM": (57, 39, ()),
    "PADV2": (60, 43, ()),
    "SQRT": (75, 0, ()),
    "HARD_SWISH": (117, 91, ()),
    "BATCH_MATMUL": (126, 101, (("adj_x", "i8", 0), ("adj_y", "i8", 0))),
    "GELU": (150, 116, (("approximate", "i8", 0),)),
}


class TfliteUnsupported(ValueError):
    """The graph holds an op (or an op configuration) TFLite cannot express; the
    message names the node and op."""


def _perm(seq: Sequence, perm: Sequence[int]) -> list:
    return [seq[p] for p in perm]


class TfliteBuilder:
    """Tensors, constant buffers, holes and operators of one TFLite subgraph, built from a
    model graph. What an op's ``tflite`` emission uses:

    * ``shape(name)``: a value's or parameter's graph (NCHW) shape at batch 1;
    * ``layout(name)``: ``"nhwc"`` or ``"graph"``, the layout the value was produced in;
    * ``get(name, layout)``: the tensor of a value in ``"graph"``, ``"nhwc"`` (4-D only;
      other ranks are always graph layout), ``"any"`` (as produced) layout, or
      ``"order"`` (the graph's memory order, any shape: what a RESHAPE needs), a
      transpose inserted on first need; a parameter name gives ``param(name)``;
    * ``param(name, layout, rows)``: a weight tensor filled at activation (a hole);
    * ``output(name, layout)``: the tensor to write a node's output value into;
    * ``tensor(shape, like=t)``: a temporary (batch axis dynamic where ``t``'s is);
    * ``const(array)``: a constant; ``op(BUILTIN, inputs, outputs, **options)``;
    * ``padded(...)``, ``target(name)``, ``common_layout(...)``: helpers for
      padding, reshape targets and the layout of an elementwise op.
    """

    SAME, VALID = SAME, VALID

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._shapes = dict(graph.shapes(1))
        try:
            at2 = graph.shapes(2)
        except GraphError as e:
            raise TfliteUnsupported(f"the graph does not take a batch of 2, so TFLite's batch axis "
                                    f"cannot be dynamic: {e}") from None
        self._dyn = {k: tuple(a != b for a, b in zip(s, at2[k], strict=True))
                     for k, s in self._shapes.items()}
        self._param_shapes = {p.name: tuple(p.shape) for p in graph.params.values()}
        self.tensors: list[dict] = []
        self.buffers: list[dict] = [{"data": b""}]  # buffer 0: the empty sentinel
        self.ops: list[dict] = []
        self.opcodes: list[int] = []
        self._names: set[str] = set()
        self._values: dict[str, dict[str, int]] = {}
        self._params: dict[tuple, int] = {}
        self._head: dict[str, tuple[int, ...]] = {}
        self._n = 0
        self.node = "input"
        x = graph.input
        self.inputs = [self.output(x.name, GRAPH, dtype=DTYPES[x.dtype])]
        self.outputs: list[int] = []

    # -- facts ----------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name] if name in self._shapes else self._param_shapes[name]

    def is_param(self, name: str) -> bool:
        return name in self._param_shapes and name not in self._values

    def layout(self, name: str) -> str:
        if self.is_param(name) or len(self.shape(name)) != 4:
            return GRAPH
        return next(iter(self._values[name]))

    def tshape(self, t: int) -> list[int]:
        """A tensor's TFLite shape (batch 1)."""
        return list(self.tensors[t]["shape"])

    # -- tensors --------------------------------------------------------------------
    def _unique(self, name: str) -> str:
        out, i = name, 0
        while out in self._names:
            i += 1
            out = f"{name}_{i}"
        self._names.add(out)
        return out

    def _new(self, name: str, shape: Sequence[int], dyn: Sequence[bool] | None = None,
             dtype: int = FLOAT32, buffer: int = 0) -> int:
        shape = [int(s) for s in shape]
        sig = [-1 if d else s for s, d in zip(shape, dyn, strict=True)] if dyn and any(dyn) else None
        self.tensors.append({"name": self._unique(name), "shape": shape, "type": dtype, "buffer": buffer,
                             "sig": sig})
        return len(self.tensors) - 1

    def _value_tensor(self, name: str, layout: str, dtype: int = FLOAT32) -> int:
        shape, dyn = self._shapes[name], self._dyn[name]
        if layout == NHWC:
            shape, dyn = _perm(shape, TO_NHWC), _perm(dyn, TO_NHWC)
        return self._new(name if layout == GRAPH else f"{name}@nhwc", shape, dyn, dtype)

    def output(self, name: str, layout: str = GRAPH, *, dtype: int = FLOAT32) -> int:
        if len(self._shapes[name]) != 4:
            layout = GRAPH
        t = self._value_tensor(name, layout, dtype)
        self._values[name] = {layout: t}
        return t

    def get(self, name: str, layout: str = GRAPH) -> int:
        if self.is_param(name):
            return self.param(name, "nhwc" if layout == NHWC and len(self.shape(name)) <= 4 else "as-is")
        have = self._values[name]
        shape = self._shapes[name]
        same_order = len(shape) == 4 and (shape[1] == 1 or shape[2] * shape[3] == 1)
        if layout == ORDER:
            layout = next(iter(have)) if same_order else GRAPH
        if layout == ANY or len(shape) != 4:
            layout = next(iter(have)) if layout == ANY else GRAPH
        if layout in have:
            return have[layout]
        src = next(iter(have.values()))
        t = self._value_tensor(name, layout, self.tensors[src]["type"])
        if same_order:  # C == 1 or H == W == 1: a reshape
            tgt = self.target_of(t)
            self.op("RESHAPE", [src, self.const(np.array(tgt, np.int32))], [t], new_shape=tgt)
        else:
            perm = TO_NHWC if layout == NHWC else TO_NCHW
            self.op("TRANSPOSE", [src, self.const(np.array(perm, np.int32))], [t])
        have[layout] = t
        return t

    def param(self, name: str, layout: str = "as-is", rows: tuple[int, int] | None = None, *,
              head: bool = False) -> int:
        """A float32 constant the device writes at activation (a hole): the graph's
        parameter ``name`` (or the head's ``head.weight`` / ``head.bias``) in ``layout``."""
        key = (name, layout, rows, head)
        if key in self._params:
            return self._params[key]
        hole: dict = {"param": name, "layout": layout}
        if rows is not None:
            hole["rows"] = [int(rows[0]), int(rows[1])]
        if head:
            hole["head"] = True
        src = self._head[name] if head else self.shape(name)
        shape = to_layout(np.empty(src, np.float32), hole).shape
        tname = name if layout == "as-is" and rows is None else f"{name}@{layout}"
        if rows is not None:
            tname += f"[{rows[0]}:{rows[1]}]"
        self.buffers.append({"data": bytes(4 * math.prod(shape))})
        t = self._new(tname, shape, buffer=len(self.buffers) - 1)
        self.buffers[-1]["hole"] = dict(hole, tensor=self.tensors[t]["name"], shape=[int(s) for s in shape])
        self._params[key] = t
        return t

    def tensor(self, shape: Sequence[int] | None = None, *, like: int | None = None,
               dtype: int | None = None) -> int:
        """A temporary of the current node; axes where ``like``'s batch axis is dynamic
        (and the size is unchanged) stay dynamic."""
        self._n += 1
        ref = self.tensors[like] if like is not None else None
        shape = list(ref["shape"]) if shape is None else [int(s) for s in shape]
        dyn = None
        if ref is not None and ref["sig"] is not None and len(ref["sig"]) == len(shape):
            dyn = [g == -1 and s == r for g, s, r in zip(ref["sig"], shape, ref["shape"], strict=True)]
        dtype = dtype if dtype is not None else (ref["type"] if ref is not None else FLOAT32)
        return self._new(f"{self.node}/t{self._n}", shape, dyn, dtype)

    def const(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        dtype = {np.dtype(np.float32): FLOAT32, np.dtype(np.int32): INT32}[array.dtype]
        self._n += 1
        self.buffers.append({"data": array.astype(array.dtype.newbyteorder("<")).tobytes()})
        return self._new(f"{self.node}/c{self._n}", array.shape, dtype=dtype, buffer=len(self.buffers) - 1)

    def scalar(self, value: float) -> int:
        return self.const(np.array(value, np.float32))

    def op(self, builtin: str, inputs: Sequence[int], outputs: Sequence[int], **options) -> None:
        code, opt_type, fields = BUILTINS[builtin]
        unknown = set(options) - {f[0] for f in fields}
        if unknown:
            raise ValueError(f"{builtin}: unknown option(s) {sorted(unknown)}")
        if code not in self.opcodes:
            self.opcodes.append(code)
        opts = None
        if opt_type:
            opts = (opt_type, [(slot, kind, options.get(field, default))
                               for slot, (field, kind, default) in enumerate(fields)])
        self.ops.append({"opcode": self.opcodes.index(code), "inputs": [int(i) for i in inputs],
                         "outputs": [int(o) for o in outputs], "options": opts})

    # -- helpers for emissions ------------------------------------------------------
    def target_of(self, t: int) -> list[int]:
        """A RESHAPE target giving tensor ``t``'s shape: its sizes, -1 on the batch axis."""
        rec = self.tensors[t]
        tgt = list(rec["sig"] or rec["shape"])
        if tgt.count(-1) > 1:
            raise NotImplementedError(f"a reshape to {rec['shape']} with several batch-dependent axes")
        return tgt

    def target(self, name: str) -> list[int]:
        """The RESHAPE target of value ``name`` in graph layout (-1 on the batch axis)."""
        shape, dyn = self._shapes[name], self._dyn[name]
        if sum(dyn) > 1:
            raise NotImplementedError(f"a reshape to {list(shape)} with several batch-dependent axes")
        return [-1 if d else int(s) for s, d in zip(shape, dyn, strict=True)]

    def common_layout(self, names: Sequence[str], out: str) -> str:
        """NHWC when the output is 4-D, some 4-D operand already is NHWC and every operand
        can follow (a 4-D value, or a parameter of rank <= 4); else graph."""
        if len(self._shapes[out]) != 4:
            return GRAPH
        nhwc = False
        for n in names:
            rank = len(self.shape(n))
            if self.is_param(n):
                if rank > 4:
                    return GRAPH
            elif rank == 4:
                nhwc |= self.layout(n) == NHWC
            else:  # a lower-rank activation broadcasting against the graph's axes
                return GRAPH
        return NHWC if nhwc else GRAPH

    def padded(self, name: str, pads: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int], out_hw: Sequence[int], *, value: float = 0.0,
               same: bool = True) -> tuple[int, int]:
        """Value ``name`` in NHWC, ready for a VALID or SAME window op with the graph's
        ``pads`` (top, left, bottom, right): (tensor, padding). SAME where TFLite's SAME
        padding is exactly ``pads`` (and ``same`` allows it), else an explicit PAD
        (PADV2 with ``value`` when it is not 0) and VALID."""
        x = self.get(name, NHWC)
        pads = [int(p) for p in pads]
        if not any(pads):
            return x, VALID
        n, h, w, c = self.tshape(x)
        if same:
            want = []
            for size, k, s, d, o in zip((h, w), kernel, strides, dilations, out_hw, strict=True):
                out = -(-size // s)
                total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
                want.append((total // 2, total - total // 2) if out == o else None)
            if None not in want and pads == [want[0][0], want[1][0], want[0][1], want[1][1]]:
                return x, SAME
        pt, pl, pb, pr = pads
        t = self.tensor([n, h + pt + pb, w + pl + pr, c], like=x)
        paddings = self.const(np.array([[0, 0], [pt, pb], [pl, pr], [0, 0]], np.int32))
        if value == 0:
            self.op("PAD", [x, paddings], [t])
        else:
            self.op("PADV2", [x, paddings, self.scalar(value)], [t])
        return t, VALID


# -- building and serializing ------------------------------------------------------------
def build_graph(graph: Graph, classes: int) -> TfliteBuilder:
    """The TFLite subgraph of ``graph`` with a head of ``classes`` outputs (weights as holes).
    Raises :class:`TfliteUnsupported` naming the first node TFLite cannot express."""
    b = TfliteBuilder(graph)
    for n in graph.backbone_nodes:
        b.node = n.name
        try:
            get_op(n.op).tflite(b, list(n.inputs), list(n.outputs), n.attrs, [b.shape(i) for i in n.inputs])
        except NotImplementedError as e:
            raise TfliteUnsupported(f"node {n.name!r} ({n.op}): {e or 'no TFLite emission'}") from None
        missing = [o for o in n.outputs if o not in b._values]
        if missing:
            raise TfliteUnsupported(f"node {n.name!r} ({n.op}): its TFLite emission left {missing} unwritten")
    b.node = "head"
    dim = graph.feature_dim
    b._head = {"head.weight": (classes, dim), "head.bias": (classes,)}
    feat = b.get(graph.features)
    w = b.param("head.weight", head=True)
    bias = b.param("head.bias", head=True)
    y = b._new("logits", [1, classes], b._dyn[graph.features][:1] + (False,))
    b.op("FULLY_CONNECTED", [feat, w, bias], [y])
    b.outputs = [y]
    return b


def _int32_vector(fb, values) -> int:
    return fb.CreateNumpyVector(np.asarray(list(values), dtype="<i4"))


def _offsets_vector(fb, offsets) -> int:
    fb.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        fb.PrependUOffsetTRelative(off)
    return fb.EndVector()


def _options(fb, fields) -> int:
    """One builtin options table; ``fields`` is [(slot, kind, value)], all written."""
    vectors = {slot: _int32_vector(fb, v) for slot, kind, v in fields if kind == "vec32" and v is not None}
    fb.ForceDefaults(True)
    fb.StartObject(len(fields))
    for slot, kind, v in fields:
        if kind == "i8":
            fb.PrependInt8Slot(slot, int(v), 0)
        elif kind == "i32":
            fb.PrependInt32Slot(slot, int(v), 0)
        elif kind == "f32":
            fb.PrependFloat32Slot(slot, float(v), 0.0)
        elif kind == "vec32" and v is not None:
            fb.PrependUOffsetTRelativeSlot(slot, vectors[slot], 0)
    out = fb.EndObject()
    fb.ForceDefaults(False)
    return out


def serialize(g: TfliteBuilder, description: str = "edgecl") -> tuple[bytes, list[dict]]:
    """The .tflite bytes and the holes (``offset``/``bytes`` into those bytes)."""
    import flatbuffers

    fb = flatbuffers.Builder(1 << 16)
    # buffer data first (vectors may not nest inside tables), 16-byte aligned
    data_off = []
    for buf in g.buffers:
        data = buf["data"]
        if not data:
            data_off.append(None)
            continue
        fb.StartVector(1, len(data), BUFFER_ALIGN)
        fb.head -= len(data)
        fb.Bytes[fb.head:fb.head + len(data)] = data
        fb.vectorNumElems = len(data)
        data_off.append(fb.EndVector())
    buffers = []
    for off in data_off:
        fb.StartObject(3)
        if off is not None:
            fb.PrependUOffsetTRelativeSlot(0, off, 0)
        buffers.append(fb.EndObject())
    tensors = []
    for t in g.tensors:
        name = fb.CreateString(t["name"])
        shape = _int32_vector(fb, t["shape"])
        sig = _int32_vector(fb, t["sig"]) if t["sig"] is not None else None
        fb.StartObject(11)
        fb.PrependUOffsetTRelativeSlot(0, shape, 0)
        fb.PrependInt8Slot(1, t["type"], 0)
        fb.PrependUint32Slot(2, t["buffer"], 0)
        fb.PrependUOffsetTRelativeSlot(3, name, 0)
        if sig is not None:
            fb.PrependUOffsetTRelativeSlot(7, sig, 0)
        tensors.append(fb.EndObject())
    ops = []
    for o in g.ops:
        ins, outs = _int32_vector(fb, o["inputs"]), _int32_vector(fb, o["outputs"])
        opt = _options(fb, o["options"][1]) if o["options"] else None
        fb.StartObject(14)
        fb.PrependUint32Slot(0, o["opcode"], 0)
        fb.PrependUOffsetTRelativeSlot(1, ins, 0)
        fb.PrependUOffsetTRelativeSlot(2, outs, 0)
        if opt is not None:
            fb.PrependUint8Slot(3, o["options"][0], 0)
            fb.PrependUOffsetTRelativeSlot(4, opt, 0)
        ops.append(fb.EndObject())
    codes = []
    for code in g.opcodes:
        fb.StartObject(4)
        fb.PrependInt8Slot(0, min(code, 127), 0)  # deprecated_builtin_code (127: see builtin_code)
        fb.PrependInt32Slot(2, 1, 0)  # version 1 of every op
        fb.PrependInt32Slot(3, code, 0)
        codes.append(fb.EndObject())
    t_vec = _offsets_vector(fb, tensors)
    in_vec = _int32_vector(fb, g.inputs)
    out_vec = _int32_vector(fb, g.outputs)
    op_vec = _offsets_vector(fb, ops)
    sg_name = fb.CreateString("main")
    fb.StartObject(6)
    fb.PrependUOffsetTRelativeSlot(0, t_vec, 0)
    fb.PrependUOffsetTRelativeSlot(1, in_vec, 0)
    fb.PrependUOffsetTRelativeSlot(2, out_vec, 0)
    fb.PrependUOffsetTRelativeSlot(3, op_vec, 0)
    fb.PrependUOffsetTRelativeSlot(4, sg_name, 0)
    subgraph = fb.EndObject()
    sg_vec = _offsets_vector(fb, [subgraph])
    oc_vec = _offsets_vector(fb, codes)
    buf_vec = _offsets_vector(fb, buffers)
    desc = fb.CreateString(description)
    fb.StartObject(10)
    fb.PrependUint32Slot(0, SCHEMA_VERSION, 0)
    fb.PrependUOffsetTRelativeSlot(1, oc_vec, 0)
    fb.PrependUOffsetTRelativeSlot(2, sg_vec, 0)
    fb.PrependUOffsetTRelativeSlot(3, desc, 0)
    fb.PrependUOffsetTRelativeSlot(4, buf_vec, 0)
    root = fb.EndObject()
    fb.Finish(root, file_identifier=FILE_ID)
    out = bytes(fb.Output())
    holes = []
    for buf, off in zip(g.buffers, data_off, strict=True):
        if "hole" in buf:
            pos = len(out) - off  # offsets count from the end; the length prefix is here
            n = len(buf["data"])
            assert int.from_bytes(out[pos:pos + 4], "little") == n and (pos + 4) % BUFFER_ALIGN == 0
            holes.append(dict(buf["hole"], offset=pos + 4, bytes=n))
    return out, sorted(holes, key=lambda h: h["offset"])


def build_template(graph: Graph, classes: int, name: str | None = None) -> tuple[bytes, dict]:
    """(stored template bytes, manifest entry): the model with every hole cut out."""
    full, holes = serialize(build_graph(graph, classes), f"edgecl {name or graph.name} c{classes}")
    parts, pos = [], 0
    for h in holes:
        parts.append(full[pos:h["offset"]])
        pos = h["offset"] + h["bytes"]
    parts.append(full[pos:])
    return b"".join(parts), {"bytes": len(full), "holes": holes}


def export_bundle(bundle_dir: str | Path, *, strict: bool = False) -> int:
    """Add TFLite templates (one per distinct class count) to the bundle; returns the version.

    A graph TFLite cannot express raises :class:`TfliteUnsupported` when ``strict``;
    otherwise the manifest records why (``exports.tflite.unavailable``, naming the node
    and op) and the TFLite backend reports that reason."""
    root = Path(bundle_dir)
    bundle = Bundle.open(root)
    graph = bundle.graph
    files, graphs, reason = {}, {}, None
    try:
        for n in sorted({len(t["classes"]) for t in bundle.tasks} or {2}):
            data, entry = build_template(graph, n, bundle.model.get("arch"))
            rel = f"targets/tflite/forward-c{n}-{hashlib.sha256(data).hexdigest()[:16]}.tflite-template"
            files[rel] = data
            graphs[str(n)] = dict(entry, file=rel)
    except TfliteUnsupported as e:
        if strict:
            raise
        files, graphs, reason = {}, {}, str(e)

    def update(manifest: dict) -> None:
        old = manifest.get("exports", {}).get("tflite", {})
        for g in old.get("graphs", {}).values():
            if g["file"] not in files:
                manifest["files"].pop(g["file"], None)
        entry: dict = {"schema_version": SCHEMA_VERSION, "graphs": graphs, "weights": "template-holes",
                       "inputs": [graph.input.name], "outputs": ["logits"], "layout": LAYOUT}
        if reason is not None:
            entry["unavailable"] = f"TFLite cannot run this graph: {reason}"
        manifest.setdefault("exports", {})["tflite"] = entry

    return commit_files(root, files, update)
