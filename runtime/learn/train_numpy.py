"""The device's training math in numpy, on any model graph: the executor's forward with a
tape, the head and cross-entropy, and the executor's backward.

There is no op switch here: every node runs through its op in the registry
(:mod:`edgecl.runtime.ops`), forward by :func:`edgecl.runtime.executor` semantics and
backward by :func:`edgecl.runtime.executor.backward`, so the learner trains through any
op that has a numpy backward.

Only what the backward needs is kept (:func:`tape_forward`): the inputs and outputs of
the nodes between a trained parameter and the features. Everything upstream of the
first trained parameter (a frozen prefix) runs forward only and is freed after its last
use, as in inference; no gradient is formed for it, nor for the graph's input.

Everything is float32. Cross-entropy is PyTorch's mean over the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .. import executor
from ..executor import Tape
from ..graph import Graph, GraphError, Node
from ..ops import OpError, get_op

Params = Mapping[str, np.ndarray]


_PLANS: dict[tuple[int, frozenset], tuple[Graph, list[Node], frozenset]] = {}


def _plan(graph: Graph, wanted: Iterable[str]) -> tuple[list[Node], frozenset]:
    key = (id(graph), frozenset(wanted))
    hit = _PLANS.get(key)
    if hit is None or hit[0] is not graph:
        live = set(key[1])
        nodes = []
        for n in graph.backbone_nodes:
            if live & set(n.inputs):
                live |= set(n.outputs)
                nodes.append(n)
        keep = frozenset(v for n in nodes for v in (*n.inputs, *n.outputs)) - set(graph.params)
        if len(_PLANS) > 64:
            _PLANS.clear()
        hit = _PLANS[key] = (graph, nodes, keep)
    return hit[1], hit[2]


def backward_nodes(graph: Graph, wanted: Iterable[str]) -> list[Node]:
    """The backbone nodes a backward pass for ``wanted`` runs through: those with an input
    downstream of (or equal to) a wanted parameter, in order."""
    return list(_plan(graph, wanted)[0])


def kept_values(graph: Graph, wanted: Iterable[str]) -> set[str]:
    """The values (not parameters) the backward for ``wanted`` reads: the inputs and
    outputs of :func:`backward_nodes`."""
    return set(_plan(graph, wanted)[1])


def tape_forward(graph: Graph, params: Params, x: np.ndarray,
                 wanted: Iterable[str]) -> tuple[np.ndarray, Tape]:
    """Features of ``x`` and the tape :func:`edgecl.runtime.executor.backward` needs for
    the parameters in ``wanted``. Values the backward never reads are freed after their
    last use (the frozen prefix costs what inference costs). With every value needed this
    is ``executor.features(graph, params, x, tape=Tape(...))``."""
    bnodes, kept = _plan(graph, wanted)
    nodes = graph.backbone_nodes
    if len(bnodes) == len(nodes) and graph.input.name in kept:  # every value is read
        tape = Tape(nodes=nodes)
        return executor.features(graph, params, x, tape=tape), tape
    keep = kept | {graph.features}
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for name in n.inputs:
            last[name] = i
    values: dict[str, np.ndarray] = {graph.input.name: x}
    for i, n in enumerate(nodes):
        xs = [values[name] if name in values else params[name] for name in n.inputs]
        try:
            ys = get_op(n.op).forward(xs, n.attrs)
        except OpError as e:
            raise GraphError(f"node {n.name!r} ({n.op}): {e}") from None
        values.update(zip(n.outputs, ys, strict=True))
        for name in n.inputs:
            if last.get(name) == i and name in values and name not in keep:
                del values[name]
    return values[graph.features], Tape(nodes=nodes, values=values)


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(np.mean(np.log(s[:, 0]) - z[np.arange(n), y]))
    g = e / s
    g[np.arange(n), y] -= 1
    return loss, (g / np.float32(n)).astype(np.float32, copy=False)


def grads(graph: Graph, params: Params, head: tuple[np.ndarray, np.ndarray], x: np.ndarray,
          y: np.ndarray, wanted: Iterable[str]
          ) -> tuple[float, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One forward and backward: (loss, {wanted parameter: dL/d(it)}, dL/d head.weight,
    dL/d head.bias). ``params`` maps every parameter to its effective array (the one the
    forward uses), so a masked weight's gradient is dL/dW_eff."""
    wanted = set(wanted)
    feats, tape = tape_forward(graph, params, x, wanted)
    hw, hb = head
    logits = feats @ hw.T + hb
    loss, g = cross_entropy(logits, y)
    g_hw = g.T @ feats
    g_hb = g.sum(axis=0)
    gp = executor.backward(graph, params, tape, g @ hw, wanted) if wanted else {}
    return loss, gp, g_hw, g_hb
