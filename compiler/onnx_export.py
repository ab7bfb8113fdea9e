"""ONNX export of a bundle's model graph, op by op through the registry (no torch).

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

import numpy as np

from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_write import commit_files
from edgecl.runtime.graph import Graph
from edgecl.runtime.ops import get_op

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


class OnnxBuilder:
    """What an op's ``onnx`` emission writes into: nodes, constants, and the shapes of
    the graph's values (so an op can choose, e.g. Gemm for 2-D input)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        from onnx import helper, numpy_helper

        self._helper, self._numpy = helper, numpy_helper
        self.nodes: list = []
        self.consts: list = []
        self._shapes = dict(shapes)
        self._n = 0

    def node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs) -> None:
        self.nodes.append(self._helper.make_node(op_type, list(inputs), list(outputs),
                                                 name=f"n{len(self.nodes)}_{op_type}", **attrs))

    def tmp(self) -> str:
        self._n += 1
        return f"_t{self._n}"

    def const(self, value: np.ndarray) -> str:
        name = self.tmp()
        self.consts.append(self._numpy.from_array(np.asarray(value), name))
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]


def build_model(graph: Graph, classes: int, name: str = "model"):
    """The ONNX ModelProto: input ``x`` [N, *input_shape], output ``logits`` [N, classes];
    every node through its op's ``onnx`` emission in the registry."""
    from onnx import TensorProto, helper

    b = OnnxBuilder(graph.shapes())
    for n in graph.backbone_nodes:
        get_op(n.op).onnx(b, list(n.inputs), list(n.outputs), n.attrs)
    used = {i for n in graph.backbone_nodes for i in n.inputs}
    inits = [_external(p.name, p.shape) for p in graph.params.values() if p.name in used]
    feat = graph.feature_dim
    inits += [_external("head.weight", (classes, feat)), _external("head.bias", (classes,))]
    b.node("Gemm", [graph.features, "head.weight", "head.bias"], ["logits"], transB=1)
    x = graph.input
    elem = TensorProto.INT64 if x.dtype == "int64" else TensorProto.FLOAT
    g = helper.make_graph(
        b.nodes, f"edgecl-{name}",
        [helper.make_tensor_value_info(x.name, elem, ["N", *x.shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits + b.consts)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgecl")
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
        data = build_model(bundle.graph, n, bundle.model.get("arch", "model")).SerializeToString()
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
