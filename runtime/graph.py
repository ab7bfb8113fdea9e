"""The model graph: a DAG with named values, ops from the registry, parameters by name.

The manifest's ``model.graph`` (and a run's ``graph``) holds it as JSON; its spec is
``docs/graph.md``. Every consumer (numpy executor, learner, planner, exports, compile,
routers, the torch side) reads a model through :class:`Graph` and the op registry.

    g = Graph.from_dict(doc)             # validated: ops, attributes, names, shapes
    g.shapes()                           # value -> shape at batch 1
    g.mask_sites()                       # the weights a task may mask, in order

A model written by format 1 (a ``layers`` table) is read as a graph by
:func:`from_layers`, so old bundles keep opening.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .ops import MaskRule, OpError, Shape, get_op

GRAPH_FORMAT = "edgecl-graph"
GRAPH_VERSION = 1
DTYPES = ("float32", "int64")


class GraphError(ValueError):
    """A graph that is malformed; the message names the node or value at fault."""


@dataclass(frozen=True)
class Value:
    name: str
    shape: tuple[int, ...]  # without the batch axis
    dtype: str = "float32"


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    role: str


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class MaskSite:
    """A weight a task can mask: the node, its weight and bias parameter names, the rule."""

    node: str
    op: str
    weight: str
    bias: str | None
    rule: MaskRule
    shape: tuple[int, ...]

    @property
    def units(self) -> int:
        return self.shape[self.rule.unit_axis]


class Graph:
    def __init__(self, inputs: Sequence[Value], params: Sequence[Param], nodes: Sequence[Node],
                 features: str, *, name: str = "model", mask: Sequence[str] | None = None) -> None:
        self.inputs = list(inputs)
        self.params = {p.name: p for p in params}
        self.nodes = list(nodes)
        self.features = features
        self.name = name
        self._mask = None if mask is None else list(mask)
        self._validate()

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Graph:
        if not isinstance(doc, Mapping):
            raise GraphError("graph: not an object")
        if doc.get("format") != GRAPH_FORMAT or doc.get("version") != GRAPH_VERSION:
            raise GraphError(f"graph: format {doc.get('format')!r} version {doc.get('version')!r}; "
                             f"this edgecl reads {GRAPH_FORMAT} version {GRAPH_VERSION}")
        try:
            inputs = [Value(v["name"], tuple(int(s) for s in v["shape"]), v.get("dtype", "float32"))
                      for v in doc["inputs"]]
            params = [Param(p["name"], tuple(int(s) for s in p["shape"]), p["role"]) for p in doc["params"]]
            nodes = [Node(n["name"], n["op"], tuple(n["inputs"]), tuple(n["outputs"]),
                          dict(n.get("attrs", {}))) for n in doc["nodes"]]
            return cls(inputs, params, nodes, doc["features"], name=doc.get("name", "model"),
                       mask=doc.get("mask"))
        except (KeyError, TypeError) as e:
            raise GraphError(f"graph: malformed ({type(e).__name__}: {e})") from None

    def to_dict(self) -> dict:
        return {
            "format": GRAPH_FORMAT, "version": GRAPH_VERSION, "name": self.name,
            "inputs": [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in self.inputs],
            "params": [{"name": p.name, "shape": list(p.shape), "role": p.role}
                       for p in self.params.values()],
            "nodes": [{"name": n.name, "op": n.op, "inputs": list(n.inputs), "outputs": list(n.outputs),
                       "attrs": n.attrs} for n in self.nodes],
            "features": self.features,
            "mask": [s.weight for s in self.mask_sites()],
        }

    def _validate(self) -> None:
        if len(self.inputs) != 1:
            raise GraphError(f"graph: takes exactly one input, has {len(self.inputs)}")
        for v in self.inputs:
            if v.dtype not in DTYPES:
                raise GraphError(f"graph input {v.name!r}: dtype {v.dtype!r}; use one of {DTYPES}")
        known = {v.name for v in self.inputs}
        clash = known & set(self.params)
        if clash:
            raise GraphError(f"graph: names {sorted(clash)} are both inputs and parameters")
        known |= set(self.params)
        seen_nodes: set[str] = set()
        checked = []
        for n in self.nodes:
            where = f"node {n.name!r} ({n.op})"
            if n.name in seen_nodes:
                raise GraphError(f"{where}: duplicate node name")
            seen_nodes.add(n.name)
            try:
                op = get_op(n.op)
                attrs = op.check_attrs(n.attrs)
            except OpError as e:
                raise GraphError(f"{where}: {e}") from None
            lo, hi = op.n_inputs
            if not lo <= len(n.inputs) <= hi:
                raise GraphError(f"{where}: takes {lo}..{hi} inputs, has {len(n.inputs)}")
            for i, name in enumerate(n.inputs):
                if name not in known:
                    raise GraphError(f"{where}: input {name!r} is not a graph input, a parameter, "
                                     "or an output of an earlier node (nodes must be in topological order)")
                if name in self.params and i not in op.param_roles:
                    raise GraphError(f"{where}: input {i} ({name!r}) cannot be a parameter")
            for out in n.outputs:
                if out in known:
                    raise GraphError(f"{where}: output {out!r} is already defined")
                known.add(out)
            checked.append(Node(n.name, n.op, n.inputs, n.outputs, attrs))
        self.nodes = checked
        if self.features not in known or self.features in self.params:
            raise GraphError(f"graph: features {self.features!r} is not a value of the graph")
        shape = self.shapes().get(self.features)
        if shape is None or len(shape) != 2:
            raise GraphError(f"graph: features {self.features!r} must be [batch, dim], is {shape}; "
                             "attach the heads after a Flatten or a pooling")
        if self._mask is not None:
            sites = {s.weight for s in self._all_sites()}
            bad = [m for m in self._mask if m not in sites]
            if bad:
                raise GraphError(f"graph: mask names {bad}, which are not weights of Conv/Linear/Gather "
                                 f"nodes; maskable: {sorted(sites)}")

    # -- facts --------------------------------------------------------------------
    @property
    def input(self) -> Value:
        return self.inputs[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input.shape

    def shapes(self, batch: int = 1) -> dict[str, Shape]:
        """Every value's shape (batch axis first), by the registry's shape inference."""
        if batch == 1 and "_shapes1" in self.__dict__:
            return self.__dict__["_shapes1"]
        out: dict[str, Shape] = {v.name: (batch, *v.shape) for v in self.inputs}
        out.update({p.name: p.shape for p in self.params.values()})
        for n in self.nodes:
            op = get_op(n.op)
            try:
                shapes = op.infer([out[i] for i in n.inputs], n.attrs)
            except OpError as e:
                raise GraphError(f"node {n.name!r} ({n.op}): {e}") from None
            if len(shapes) != len(n.outputs):
                raise GraphError(f"node {n.name!r} ({n.op}): makes {len(shapes)} outputs, "
                                 f"the graph names {len(n.outputs)}")
            out.update(zip(n.outputs, (tuple(int(d) for d in s) for s in shapes), strict=True))
        if batch == 1:
            self.__dict__["_shapes1"] = out
        return out

    @cached_property
    def feature_dim(self) -> int:
        return int(self.shapes()[self.features][1])

    @cached_property
    def backbone_nodes(self) -> list[Node]:
        """The nodes the features depend on, in order (anything else is dropped)."""
        need = {self.features}
        keep = []
        for n in reversed(self.nodes):
            if need & set(n.outputs):
                keep.append(n)
                need |= set(n.inputs)
        return keep[::-1]

    @cached_property
    def inplace(self) -> dict[str, str]:
        """Nodes whose forward may write over their input 0: node name -> the name of the
        node that makes that input. An executor runs a node in place only when that
        producer ran in the same pass (the array is the pass's own, not the caller's input,
        a parameter or a cached value). Here: an ``inplace`` op (Relu, Clip) whose input 0
        is made by a ``fresh_output`` op (Conv, Linear, Add, BatchNormalization: never a
        view, never read by its own backward), is read by no other node, and is not the
        features. The backward then finds the output under the input's name too, which the
        in-place op's backward allows. Saves a pass over a fresh array and, in training,
        one kept activation per Conv -> Relu."""
        made = {o: n for n in self.nodes for o in n.outputs}
        uses = self.consumers()
        out = {}
        for n in self.nodes:
            v = n.inputs[0] if n.inputs else None
            p = made.get(v)
            if (p is not None and get_op(n.op).inplace and get_op(p.op).fresh_output
                    and v != self.features and len(uses.get(v, ())) == 1 and n.inputs.count(v) == 1):
                out[n.name] = p.name
        return out

    def maskable_sites(self) -> list[MaskSite]:
        """Every weight a task could mask (Conv, Linear and Gather tables)."""
        return self._all_sites()

    def _all_sites(self) -> list[MaskSite]:
        sites = []
        for n in self.backbone_nodes:
            rule = get_op(n.op).mask
            if rule is None or len(n.inputs) <= rule.weight or n.inputs[rule.weight] not in self.params:
                continue
            w = n.inputs[rule.weight]
            if self.params[w].role != "weight" and n.op != "Gather":
                continue
            b = n.inputs[rule.bias] if rule.bias is not None and len(n.inputs) > rule.bias else None
            sites.append(MaskSite(n.name, n.op, w, b if b in self.params else None, rule,
                                  self.params[w].shape))
        return sites

    def mask_sites(self) -> list[MaskSite]:
        """The weights tasks mask: by default every Conv and Linear weight."""
        sites = self._all_sites()
        if self._mask is None:
            return [s for s in sites if s.op in ("Conv", "Linear")]
        chosen = set(self._mask)
        return [s for s in sites if s.weight in chosen]

    @property
    def n_weights(self) -> int:
        """Weights a weight-level mask covers (one bit each)."""
        return sum(math.prod(s.shape) for s in self.mask_sites())

    @property
    def n_params(self) -> int:
        return sum(math.prod(p.shape) for p in self.params.values())

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def with_mask(self, weights: Iterable[str] | None) -> Graph:
        """The same graph with another choice of masked weights (None: the default)."""
        return Graph(self.inputs, list(self.params.values()), self.nodes, self.features, name=self.name,
                     mask=None if weights is None else list(weights))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.name)


# -- format 1 ----------------------------------------------------------------------
def from_layers(layers: Sequence[Mapping], input_shape: Sequence[int], name: str = "model") -> Graph:
    """A format-1 layer table (linear, conv2d, relu, maxpool2d, flatten) as a graph."""
    cur, nodes, params = "x", [], []
    for i, layer in enumerate(layers):
        op = layer.get("op")
        lname = layer.get("name", f"{op}{i}")
        ins = [cur]
        if op in ("linear", "conv2d"):
            if op == "linear":
                shape = (int(layer["out_features"]), int(layer["in_features"]))
                attrs: dict = {}
            else:
                k = int(layer["kernel_size"])
                p, s = int(layer.get("padding", 0)), int(layer.get("stride", 1))
                shape = (int(layer["out_channels"]), int(layer["in_channels"]), k, k)
                attrs = {"strides": [s, s], "pads": [p, p, p, p]}
            params.append(Param(f"{lname}.weight", shape, "weight"))
            ins.append(f"{lname}.weight")
            if layer.get("bias", True):
                params.append(Param(f"{lname}.bias", shape[:1], "bias"))
                ins.append(f"{lname}.bias")
            node = Node(lname, "Linear" if op == "linear" else "Conv", tuple(ins), (lname,), attrs)
        elif op == "relu":
            node = Node(lname, "Relu", (cur,), (lname,))
        elif op == "maxpool2d":
            k = int(layer["kernel_size"])
            node = Node(lname, "MaxPool", (cur,), (lname,), {"kernel_shape": [k, k], "strides": [k, k]})
        elif op == "flatten":
            node = Node(lname, "Flatten", (cur,), (lname,), {"axis": 1})
        else:
            raise GraphError(f"layer {i}: unknown op {op!r} in a format-1 layer table")
        nodes.append(node)
        cur = lname
    return Graph([Value("x", tuple(int(s) for s in input_shape))], params, nodes, cur, name=name)


def from_model(model: Mapping[str, Any]) -> Graph:
    """The graph of a manifest's or run's ``model`` entry (format 2 or a format-1 table)."""
    if "graph" in model:
        return Graph.from_dict(model["graph"])
    if "layers" in model:
        return from_layers(model["layers"], model["input_shape"], model.get("arch", "model"))
    raise GraphError("model: holds neither a graph nor a layer table")


def model_entry(graph: Graph, arch: str) -> dict:
    """What the manifest stores under ``model``: the graph and the facts tools show."""
    return {"arch": arch, "input_shape": list(graph.input_shape), "input_dtype": graph.input.dtype,
            "feature_dim": graph.feature_dim, "n_weights": graph.n_weights, "graph": graph.to_dict()}
