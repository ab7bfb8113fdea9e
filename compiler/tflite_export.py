"""TFLite export of a bundle's architecture, written as a flatbuffer by hand (no TensorFlow).

One *template* per distinct class count, like the ONNX export: a complete ``.tflite``
model (schema version 3) built from the layer table, whose weight and bias buffers are
cut out of the stored file. The manifest lists the cut-outs ("holes": offset in the full
model, bytes, tensor, layout); on task activation the device writes the task's
materialized ``W ⊙ M`` and head at those offsets (``runtime/backends/tflite.py``,
numpy only) and hands the bytes to the TFLite interpreter, which then treats them as
constants (XNNPACK packs them once per task switch, not per call). The stored template
is a few KiB; the backbone is never stored twice.

The graph (float32, batch dimension dynamic: shape ``[1, ...]``, signature ``[-1, ...]``):

* input ``x`` in the bundle's layout ``[N, *input_shape]`` (NCHW for convolutions);
  a conv stack starts with ``TRANSPOSE`` to NHWC, TFLite's only layout;
* ``linear`` -> ``FULLY_CONNECTED`` (weights ``[out, in]`` as in PyTorch); a linear layer
  (or the head) right after the ``flatten`` of a conv stack takes its input columns in
  NHWC order (h, w, c), so its weight columns are permuted from (c, h, w) at activation
  (layout ``oi-from-chw``);
* ``conv2d`` -> ``CONV_2D`` with weights ``OHWI`` (layout ``ohwi``); padding ``p`` is
  ``SAME`` when stride 1 and ``k = 2p + 1``, else an explicit ``PAD`` then ``VALID``;
* ``relu`` after a linear/conv is fused (``fused_activation_function = RELU``), else ``RELU``;
* ``maxpool2d`` -> ``MAX_POOL_2D`` (VALID, stride = kernel, floor like PyTorch);
* ``flatten`` -> ``RESHAPE`` to ``[-1, F]``;
* the head -> ``FULLY_CONNECTED``, output ``logits`` ``[N, classes]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgecl.runtime.backends.tflite import fill_template, to_layout  # noqa: F401  (the device half)
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_write import commit_files
from edgecl.runtime.layers import output_shapes

SCHEMA_VERSION = 3
FILE_ID = b"TFL3"
BUFFER_ALIGN = 16

# schema.fbs enums (checked against ai_edge_litert/schema_py_generated.py)
FLOAT32, INT32 = 0, 2
OP_CONV_2D, OP_FULLY_CONNECTED, OP_MAX_POOL_2D, OP_RELU, OP_RESHAPE, OP_PAD, OP_TRANSPOSE = (
    3, 9, 17, 19, 22, 34, 39)
OPT_CONV2D, OPT_POOL2D, OPT_FC, OPT_RESHAPE, OPT_PAD, OPT_TRANSPOSE = 1, 5, 8, 17, 22, 26
SAME, VALID = 0, 1
ACT_NONE, ACT_RELU = 0, 1


class _Graph:
    """Tensors, constant buffers and operators, collected before serialization."""

    def __init__(self) -> None:
        self.tensors: list[dict] = []
        self.buffers: list[dict] = [{"data": b""}]  # buffer 0: the empty sentinel
        self.ops: list[dict] = []
        self.opcodes: list[int] = []

    def tensor(self, name: str, shape, dtype: int = FLOAT32, *, buffer: int = 0,
               dynamic_batch: bool = False) -> int:
        shape = [int(s) for s in shape]
        sig = [-1, *shape[1:]] if dynamic_batch else None
        self.tensors.append({"name": name, "shape": shape, "type": dtype, "buffer": buffer, "sig": sig})
        return len(self.tensors) - 1

    def const(self, name: str, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        dtype = {np.dtype(np.float32): FLOAT32, np.dtype(np.int32): INT32}[array.dtype]
        self.buffers.append({"data": array.astype(array.dtype.newbyteorder("<")).tobytes()})
        return self.tensor(name, array.shape, dtype, buffer=len(self.buffers) - 1)

    def hole(self, name: str, shape, layout: str, **extra) -> int:
        """A float32 constant whose bytes the device writes at activation."""
        nbytes = 4 * int(np.prod(shape))
        self.buffers.append({"data": bytes(nbytes), "hole": dict(tensor=name, shape=[int(s) for s in shape],
                                                                  layout=layout, **extra)})
        return self.tensor(name, shape, FLOAT32, buffer=len(self.buffers) - 1)

    def op(self, code: int, inputs, outputs, options: tuple[int, dict] | None = None) -> None:
        if code not in self.opcodes:
            self.opcodes.append(code)
        self.ops.append({"opcode": self.opcodes.index(code), "inputs": list(inputs),
                         "outputs": list(outputs), "options": options})


def _options(b, kind: int, fields: Mapping) -> int:
    """Serialize one builtin options table; ``fields`` maps slot -> (kind, value)."""
    vectors = {slot: _int32_vector(b, v) for slot, (k, v) in fields.items() if k == "vec32"}
    b.StartObject(max([*fields, -1]) + 1 if fields else 0)
    for slot, (k, v) in fields.items():
        if k == "i8":
            b.PrependInt8Slot(slot, v, -1)  # never equal to the default: always written
        elif k == "i32":
            b.PrependInt32Slot(slot, v, -(1 << 31))
        elif k == "vec32":
            b.PrependUOffsetTRelativeSlot(slot, vectors[slot], 0)
    return b.EndObject()


def _int32_vector(b, values) -> int:
    return b.CreateNumpyVector(np.asarray(list(values), dtype="<i4"))


def _offsets_vector(b, offsets) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def serialize(g: _Graph, description: str = "edgecl") -> tuple[bytes, list[dict]]:
    """The .tflite bytes and the holes (``offset``/``bytes`` into those bytes)."""
    import flatbuffers

    b = flatbuffers.Builder(1 << 16)
    # buffer data first (vectors may not nest inside tables), 16-byte aligned
    data_off, holes = [], []
    for buf in g.buffers:
        data = buf["data"]
        if not data:
            data_off.append(None)
            continue
        b.StartVector(1, len(data), BUFFER_ALIGN)
        b.head -= len(data)
        b.Bytes[b.head:b.head + len(data)] = data
        b.vectorNumElems = len(data)
        data_off.append(b.EndVector())
    buffers = []
    for off in data_off:
        b.StartObject(3)
        if off is not None:
            b.PrependUOffsetTRelativeSlot(0, off, 0)
        buffers.append(b.EndObject())
    tensors = []
    for t in g.tensors:
        name = b.CreateString(t["name"])
        shape = _int32_vector(b, t["shape"])
        sig = _int32_vector(b, t["sig"]) if t["sig"] is not None else None
        b.StartObject(11)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        b.PrependInt8Slot(1, t["type"], 0)
        b.PrependUint32Slot(2, t["buffer"], 0)
        b.PrependUOffsetTRelativeSlot(3, name, 0)
        if sig is not None:
            b.PrependUOffsetTRelativeSlot(7, sig, 0)
        tensors.append(b.EndObject())
    ops = []
    for o in g.ops:
        ins, outs = _int32_vector(b, o["inputs"]), _int32_vector(b, o["outputs"])
        opt = _options(b, o["options"][0], o["options"][1]) if o["options"] else None
        b.StartObject(14)
        b.PrependUint32Slot(0, o["opcode"], 0)
        b.PrependUOffsetTRelativeSlot(1, ins, 0)
        b.PrependUOffsetTRelativeSlot(2, outs, 0)
        if opt is not None:
            b.PrependUint8Slot(3, o["options"][0], 0)
            b.PrependUOffsetTRelativeSlot(4, opt, 0)
        ops.append(b.EndObject())
    codes = []
    for code in g.opcodes:
        b.StartObject(4)
        b.PrependInt8Slot(0, min(code, 127), 0)  # deprecated_builtin_code (all ours are < 127)
        b.PrependInt32Slot(2, 1, 0)  # version 1 of every op
        b.PrependInt32Slot(3, code, 0)
        codes.append(b.EndObject())
    t_vec = _offsets_vector(b, tensors)
    in_vec = _int32_vector(b, [0])
    out_vec = _int32_vector(b, [len(g.tensors) - 1])
    op_vec = _offsets_vector(b, ops)
    sg_name = b.CreateString("main")
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, t_vec, 0)
    b.PrependUOffsetTRelativeSlot(1, in_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, out_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, op_vec, 0)
    b.PrependUOffsetTRelativeSlot(4, sg_name, 0)
    subgraph = b.EndObject()
    sg_vec = _offsets_vector(b, [subgraph])
    oc_vec = _offsets_vector(b, codes)
    buf_vec = _offsets_vector(b, buffers)
    desc = b.CreateString(description)
    b.StartObject(10)
    b.PrependUint32Slot(0, SCHEMA_VERSION, 0)
    b.PrependUOffsetTRelativeSlot(1, oc_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, sg_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, buf_vec, 0)
    root = b.EndObject()
    b.Finish(root, file_identifier=FILE_ID)
    out = bytes(b.Output())
    for buf, off in zip(g.buffers, data_off, strict=True):
        if "hole" in buf:
            pos = len(out) - off  # offsets count from the end; the length prefix is here
            n = len(buf["data"])
            assert int.from_bytes(out[pos:pos + 4], "little") == n and (pos + 4) % BUFFER_ALIGN == 0
            holes.append(dict(buf["hole"], offset=pos + 4, bytes=n))
    return out, sorted(holes, key=lambda h: h["offset"])


def build_graph(model: Mapping, classes: int) -> _Graph:
    """The TFLite graph of ``model`` with a head of ``classes`` outputs (weights as holes)."""
    g = _Graph()
    layers = list(model["layers"])
    in_shape = [int(s) for s in model["input_shape"]]
    shapes = output_shapes(layers, in_shape)
    cur = g.tensor("x", [1, *in_shape], dynamic_batch=True)
    nhwc = False
    chw_pending = None  # (c, h, w) of a flattened conv output, for the next fully connected layer
    if len(in_shape) == 3 and any(lay["op"] == "conv2d" for lay in layers):
        c, h, w = in_shape
        perm = g.const("nchw_to_nhwc", np.array([0, 2, 3, 1], np.int32))
        t = g.tensor("x_nhwc", [1, h, w, c], dynamic_batch=True)
        g.op(OP_TRANSPOSE, [cur, perm], [t], (OPT_TRANSPOSE, {}))
        cur, nhwc = t, True

    def act_shape(shape):
        if len(shape) == 3 and nhwc:
            c, h, w = shape
            return [1, h, w, c]
        return [1, *shape]

    i = 0
    prev_shape = tuple(in_shape)
    while i < len(layers):
        layer, op = layers[i], layers[i]["op"]
        out_shape = shapes[i]
        fuse = op in ("linear", "conv2d") and i + 1 < len(layers) and layers[i + 1]["op"] == "relu"
        act = ACT_RELU if fuse else ACT_NONE
        name = layer.get("name", f"{op}{i}")
        if op == "linear":
            o, k = int(layer["out_features"]), int(layer["in_features"])
            extra = {"chw": list(chw_pending)} if chw_pending else {}
            wt = g.hole(f"{name}.weight", [o, k], "oi-from-chw" if chw_pending else "oi", **extra)
            bt = (g.hole(f"{name}.bias", [o], "o") if layer.get("bias", True)
                  else g.const(f"{name}.bias", np.zeros(o, np.float32)))
            chw_pending = None
            t = g.tensor(name, [1, o], dynamic_batch=True)
            g.op(OP_FULLY_CONNECTED, [cur, wt, bt], [t], (OPT_FC, {0: ("i8", act)}))
        elif op == "conv2d":
            o, c = int(layer["out_channels"]), int(layer["in_channels"])
            k, s, p = int(layer["kernel_size"]), int(layer.get("stride", 1)), int(layer.get("padding", 0))
            if p and not (s == 1 and k == 2 * p + 1):
                _, h, w = prev_shape
                pads = g.const(f"{name}.pads", np.array([[0, 0], [p, p], [p, p], [0, 0]], np.int32))
                t = g.tensor(f"{name}.padded", [1, h + 2 * p, w + 2 * p, c], dynamic_batch=True)
                g.op(OP_PAD, [cur, pads], [t], (OPT_PAD, {}))
                cur, padding = t, VALID
            else:
                padding = SAME if p else VALID
            wt = g.hole(f"{name}.weight", [o, k, k, c], "ohwi")
            bt = (g.hole(f"{name}.bias", [o], "o") if layer.get("bias", True)
                  else g.const(f"{name}.bias", np.zeros(o, np.float32)))
            t = g.tensor(name, act_shape(out_shape), dynamic_batch=True)
            g.op(OP_CONV_2D, [cur, wt, bt], [t],
                 (OPT_CONV2D, {0: ("i8", padding), 1: ("i32", s), 2: ("i32", s), 3: ("i8", act),
                               4: ("i32", 1), 5: ("i32", 1)}))
        elif op == "relu":
            t = g.tensor(f"relu{i}", act_shape(out_shape), dynamic_batch=True)
            g.op(OP_RELU, [cur], [t])
        elif op == "maxpool2d":
            k = int(layer["kernel_size"])
            t = g.tensor(f"pool{i}", act_shape(out_shape), dynamic_batch=True)
            g.op(OP_MAX_POOL_2D, [cur], [t],
                 (OPT_POOL2D, {0: ("i8", VALID), 1: ("i32", k), 2: ("i32", k), 3: ("i32", k),
                               4: ("i32", k), 5: ("i8", ACT_NONE)}))
        elif op == "flatten":
            f = int(out_shape[0])
            if len(prev_shape) == 3 and nhwc and prev_shape[1] * prev_shape[2] > 1 and prev_shape[0] > 1:
                chw_pending = tuple(int(v) for v in prev_shape)
            shape_t = g.const(f"flatten{i}.shape", np.array([-1, f], np.int32))
            t = g.tensor(f"flatten{i}", [1, f], dynamic_batch=True)
            g.op(OP_RESHAPE, [cur, shape_t], [t], (OPT_RESHAPE, {0: ("vec32", [-1, f])}))
        else:
            raise ValueError(f"layer table: unknown op {op!r}")
        cur = t
        prev_shape = tuple(out_shape)
        i += 2 if fuse else 1
    feat = int(model["feature_dim"])
    extra = {"chw": list(chw_pending)} if chw_pending else {}
    wt = g.hole("head.weight", [classes, feat], "oi-from-chw" if chw_pending else "oi", **extra)
    bt = g.hole("head.bias", [classes], "o")
    t = g.tensor("logits", [1, classes], dynamic_batch=True)
    g.op(OP_FULLY_CONNECTED, [cur, wt, bt], [t], (OPT_FC, {0: ("i8", ACT_NONE)}))
    return g


def build_template(model: Mapping, classes: int) -> tuple[bytes, dict]:
    """(stored template bytes, manifest entry): the model with every hole cut out."""
    full, holes = serialize(build_graph(model, classes), f"edgecl {model.get('arch', 'model')} c{classes}")
    parts, pos = [], 0
    for h in holes:
        parts.append(full[pos:h["offset"]])
        pos = h["offset"] + h["bytes"]
    parts.append(full[pos:])
    return b"".join(parts), {"bytes": len(full), "holes": holes}


def export_bundle(bundle_dir: str | Path) -> int:
    """Add TFLite templates (one per distinct class count) to the bundle; returns the version."""
    root = Path(bundle_dir)
    bundle = Bundle.open(root)
    files, graphs = {}, {}
    for n in sorted({len(t["classes"]) for t in bundle.tasks} or {2}):
        data, entry = build_template(bundle.model, n)
        rel = f"targets/tflite/forward-c{n}-{hashlib.sha256(data).hexdigest()[:16]}.tflite-template"
        files[rel] = data
        graphs[str(n)] = dict(entry, file=rel)

    def update(manifest: dict) -> None:
        old = manifest.get("exports", {}).get("tflite", {})
        for g in old.get("graphs", {}).values():
            if g["file"] not in files:
                manifest["files"].pop(g["file"], None)
        manifest.setdefault("exports", {})["tflite"] = {
            "schema_version": SCHEMA_VERSION, "graphs": graphs, "weights": "template-holes",
            "inputs": ["x"], "outputs": ["logits"], "layout": "nhwc-inside"}

    return commit_files(root, files, update)
