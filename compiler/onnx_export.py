"""ONNX export of a bundle's architecture, built from the layer table (no torch).

The graph is compiled once per architecture like the TVM artifacts: every weight is an
*external initializer* whose bytes are not in the file. The ONNX Runtime backend
supplies the task's materialized ``W ⊙ M`` and head at session creation
(``SessionOptions.add_external_initializers``), so ORT still treats them as constants
(and pre-packs them) while the stored model is a few hundred bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_write import commit_files

OPSET = 17
IR_VERSION = 8


def _external(name: str, dims: Sequence[int]):
    from onnx import TensorProto

    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(int(d) for d in dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", f"{name}.bin"), ("offset", "0"), ("length", str(4 * _prod(dims)))):
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def _prod(dims: Sequence[int]) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def build_model(model: Mapping, classes: int):
    """The ONNX ModelProto: input ``x`` [N, *input_shape], output ``logits`` [N, classes]."""
    from onnx import TensorProto, helper

    nodes, inits = [], []
    cur = "x"
    for i, layer in enumerate(model["layers"]):
        op, out = layer["op"], f"t{i}"
        if op in ("linear", "conv2d"):
            name = layer["name"]
            if op == "linear":
                shape = (layer["out_features"], layer["in_features"])
            else:
                k = layer["kernel_size"]
                shape = (layer["out_channels"], layer["in_channels"], k, k)
            inputs = [cur, f"{name}.weight"]
            inits.append(_external(f"{name}.weight", shape))
            if layer.get("bias", True):
                inputs.append(f"{name}.bias")
                inits.append(_external(f"{name}.bias", shape[:1]))
            if op == "linear":
                nodes.append(helper.make_node("Gemm", inputs, [out], transB=1))
            else:
                p, s = int(layer.get("padding", 0)), int(layer.get("stride", 1))
                nodes.append(helper.make_node("Conv", inputs, [out], kernel_shape=[k, k],
                                              pads=[p, p, p, p], strides=[s, s]))
        elif op == "relu":
            nodes.append(helper.make_node("Relu", [cur], [out]))
        elif op == "maxpool2d":
            k = int(layer["kernel_size"])
            nodes.append(helper.make_node("MaxPool", [cur], [out], kernel_shape=[k, k], strides=[k, k]))
        elif op == "flatten":
            nodes.append(helper.make_node("Flatten", [cur], [out], axis=1))
        else:
            raise ValueError(f"layer table: unknown op {op!r}")
        cur = out
    feat = int(model["feature_dim"])
    inits += [_external("head.weight", (classes, feat)), _external("head.bias", (classes,))]
    nodes.append(helper.make_node("Gemm", [cur, "head.weight", "head.bias"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, f"edgecl-{model.get('arch', 'model')}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *model["input_shape"]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name="edgecl")
    m.ir_version = IR_VERSION
    # checker.check_model would look for the external files; the graph is checked by
    # the tests through ONNX Runtime instead.
    return m


def export_bundle(bundle_dir: str | Path) -> int:
    """Add ONNX graphs (one per distinct class count) to the bundle; returns the version."""
    root = Path(bundle_dir)
    bundle = Bundle.open(root)
    files, graphs = {}, {}
    for n in sorted({len(t["classes"]) for t in bundle.tasks} or {2}):
        data = build_model(bundle.model, n).SerializeToString()
        rel = f"targets/onnx/forward-c{n}-{hashlib.sha256(data).hexdigest()[:16]}.onnx"
        files[rel] = data
        graphs[str(n)] = rel

    def update(manifest: dict) -> None:
        old = manifest.get("exports", {}).get("onnx", {})
        for rel in old.get("files", {}).values():
            if rel not in files:
                manifest["files"].pop(rel, None)
        manifest.setdefault("exports", {})["onnx"] = {
            "opset": OPSET, "files": graphs, "weights": "external-initializers",
            "inputs": ["x"], "outputs": ["logits"]}

    return commit_files(root, files, update)
