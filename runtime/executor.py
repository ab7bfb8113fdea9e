"""The numpy reference executor: runs a model graph with a task's effective parameters.

Every other backend must match this one (to 1e-5 against PyTorch on the small models,
1e-4 on the zoo). Values are freed after their last use, so peak memory is the live
set, not the whole graph. An op never writes into the caller's arrays or the weights
(which may be mapped, read-only); the only thing computed in place is an activation
over the fresh output of the node before it, when nothing else reads that
(``Graph.inplace``, :func:`run_node`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .graph import Graph, GraphError, Node
from .ops import OpError, get_op

Params = Mapping[str, np.ndarray]


def _last_use(nodes: list[Node], keep: set[str]) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for name in n.inputs:
            last[name] = i
    for name in keep:
        last[name] = len(nodes)
    return last


def run_node(graph: Graph, n: Node, xs: list[np.ndarray], ran: set[str]) -> list[np.ndarray]:
    """The outputs of node ``n`` on ``xs``, in one pass of a forward: ``ran`` holds the
    names of the nodes this pass has run (``n`` is added). In place over ``xs[0]`` when
    ``graph.inplace`` allows it and that value's producer ran in this pass."""
    op = get_op(n.op)
    try:
        ys = op.forward_inplace(xs, n.attrs) if graph.inplace.get(n.name) in ran else op.forward(xs, n.attrs)
    except OpError as e:
        raise GraphError(f"node {n.name!r} ({n.op}): {e}") from None
    ran.add(n.name)
    return ys


@dataclass
class Tape:
    """What a forward pass kept for the backward pass of ``backward``."""

    nodes: list[Node] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)


def features(graph: Graph, params: Params, x: np.ndarray, *, tape: Tape | None = None) -> np.ndarray:
    """Backbone features ([batch, feature_dim]) of ``x``; ``params`` maps every
    parameter name to its (task-effective) array."""
    return value(graph, params, x, graph.features, tape=tape)


def value(graph: Graph, params: Params, x: np.ndarray, name: str, *, tape: Tape | None = None) -> np.ndarray:
    """One value of the graph: only the nodes it depends on run."""
    nodes = graph.backbone_nodes
    if name != graph.features:
        cut = next((i for i, n in enumerate(nodes) if name in n.outputs), None)
        if cut is None:
            raise GraphError(f"no value {name!r} in the backbone")
        nodes = nodes[: cut + 1]
    values: dict[str, np.ndarray] = {graph.input.name: x}
    last = _last_use(nodes, {name})
    ran: set[str] = set()
    for i, n in enumerate(nodes):
        xs = [values[v] if v in values else params[v] for v in n.inputs]
        for v, y in zip(n.outputs, run_node(graph, n, xs, ran), strict=True):
            values[v] = y
        if tape is None:
            for v in n.inputs:
                if last.get(v) == i and v in values:
                    del values[v]
    if tape is not None:
        tape.nodes = nodes
        tape.values = values
    return values[name]


def forward(graph: Graph, params: Params, head: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits of one task: backbone features, then the task's head."""
    h = features(graph, params, x)
    hw, hb = head
    return h @ hw.T + hb


def backward(graph: Graph, params: Params, tape: Tape, g_features: np.ndarray,
             wanted: set[str]) -> dict[str, np.ndarray]:
    """Gradients of the loss w.r.t. the parameters in ``wanted``, given its gradient
    w.r.t. the features. Only nodes between a wanted parameter and the features run
    backward: a frozen prefix of the graph costs its forward pass only."""
    # Which values carry a gradient: those downstream of a wanted parameter.
    live = set(wanted)
    for n in tape.nodes:
        if live & set(n.inputs):
            live |= set(n.outputs)
    grads: dict[str, np.ndarray] = {graph.features: g_features}
    out: dict[str, np.ndarray] = {}
    for n in reversed(tape.nodes):
        gys = [grads.pop(o, None) for o in n.outputs]
        if all(g is None for g in gys) or not live & set(n.outputs):
            continue
        need = [name in live for name in n.inputs]
        if not any(need):
            continue
        xs = [tape.values[name] if name in tape.values else params[name] for name in n.inputs]
        ys = [tape.values[o] for o in n.outputs]
        gys = [np.zeros_like(y) if g is None else g for g, y in zip(gys, ys, strict=True)]
        try:
            gxs = get_op(n.op).backward(xs, ys, gys, n.attrs, need)
        except OpError as e:
            raise GraphError(f"node {n.name!r} ({n.op}): {e}") from None
        for name, g, nd in zip(n.inputs, gxs, need, strict=True):
            if not nd or g is None:
                continue
            target = out if name in wanted else grads
            target[name] = g if name not in target else target[name] + g
    return out
