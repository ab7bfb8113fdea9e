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

With a frozen prefix, the values where the trained part starts (:func:`cut`: the
values the backward's nodes read that the prefix makes) depend on the sample only, not
on the training: :func:`prefix_values` computes them and :func:`grads` can start from
them (``start=``), running only the trained part forward and backward. The learner caches
them per sample (:class:`edgecl.runtime.learn.trainer.Problem`); the gradients are the
same bytes either way wherever the prefix computes each sample on its own (convolutions,
elementwise ops, pooling, normalization; not a ``Linear`` on ``[batch, features]``, one
BLAS GEMM whose rounding of a row may depend on the batch's size).

Everything is float32. Cross-entropy is PyTorch's mean over the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .. import executor
from ..executor import Tape, run_node
from ..graph import Graph, Node

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


@dataclass(frozen=True)
class Cut:
    """Where a graph's trained part starts, for the parameters ``wanted``.

    ``suffix``: the nodes a backward runs through (:func:`backward_nodes`); ``starts``:
    the values they read that no suffix node makes (not parameters; the graph input among
    them when the suffix reads it), in order of first use; ``prefix``: the other nodes
    those values need, in order. Nothing in the prefix depends on ``wanted``."""

    prefix: tuple[Node, ...]
    starts: tuple[str, ...]
    suffix: tuple[Node, ...]

    def cached(self, graph: Graph) -> tuple[str, ...]:
        """The start values worth keeping per sample: all but the graph input."""
        return tuple(v for v in self.starts if v != graph.input.name)


_CUTS: dict[tuple[int, frozenset], tuple[Graph, Cut]] = {}


def cut(graph: Graph, wanted: Iterable[str]) -> Cut:
    """The :class:`Cut` of ``graph`` for the trained parameters ``wanted``."""
    key = (id(graph), frozenset(wanted))
    hit = _CUTS.get(key)
    if hit is None or hit[0] is not graph:
        suffix = _plan(graph, key[1])[0]
        made = {o for n in suffix for o in n.outputs}
        starts: list[str] = []
        for n in suffix:
            for v in n.inputs:
                if v not in made and v not in graph.params and v not in starts:
                    starts.append(v)
        need = set(starts)
        in_suffix = {id(n) for n in suffix}
        prefix = []
        for n in reversed(graph.backbone_nodes):
            if id(n) not in in_suffix and need & set(n.outputs):
                prefix.append(n)
                need |= {v for v in n.inputs if v not in graph.params}
        if len(_CUTS) > 64:
            _CUTS.clear()
        hit = _CUTS[key] = (graph, Cut(tuple(reversed(prefix)), tuple(starts), tuple(suffix)))
    return hit[1]


def prefix_values(graph: Graph, params: Params, x: np.ndarray, wanted: Iterable[str],
                  chunk: int | None = None) -> dict[str, np.ndarray]:
    """The start values of the trained part (:meth:`Cut.cached`) for the samples ``x``:
    the frozen prefix forward, each value freed after its last use; ``chunk`` samples at
    a time when given (the learner's :func:`.planner.prefix_chunk`), so its activations
    are a chunk's, not the whole ``x``'s."""
    if chunk is not None and 0 < chunk < len(x):
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(x), chunk):
            for v, a in prefix_values(graph, params, x[i : i + chunk], wanted).items():
                if v not in out:
                    out[v] = np.empty((len(x), *a.shape[1:]), dtype=a.dtype)
                out[v][i : i + chunk] = a
        return out
    c = cut(graph, wanted)
    keep = set(c.cached(graph))
    last: dict[str, int] = {}
    for i, n in enumerate(c.prefix):
        for name in n.inputs:
            last[name] = i
    values: dict[str, np.ndarray] = {graph.input.name: x}
    ran: set[str] = set()
    for i, n in enumerate(c.prefix):
        values.update(zip(n.outputs, run_node(graph, n, [values[v] if v in values else params[v]
                                                         for v in n.inputs], ran), strict=True))
        for name in n.inputs:
            if last.get(name) == i and name in values and name not in keep:
                del values[name]
    return {v: values[v] for v in c.cached(graph)}


def suffix_forward(graph: Graph, params: Params, start: Mapping[str, np.ndarray],
                   wanted: Iterable[str]) -> tuple[np.ndarray, Tape]:
    """Features and tape from the start values of the trained part (every name in
    ``Cut.starts``): only the suffix runs. The tape is what :func:`tape_forward` keeps."""
    c = cut(graph, wanted)
    values: dict[str, np.ndarray] = {v: start[v] for v in c.starts}
    ran: set[str] = set()
    for n in c.suffix:
        values.update(zip(n.outputs, run_node(graph, n, [values[v] if v in values else params[v]
                                                         for v in n.inputs], ran), strict=True))
    return values[graph.features], Tape(nodes=list(c.suffix), values=values)


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
    ran: set[str] = set()
    for i, n in enumerate(nodes):
        xs = [values[name] if name in values else params[name] for name in n.inputs]
        values.update(zip(n.outputs, run_node(graph, n, xs, ran), strict=True))
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


def grads(graph: Graph, params: Params, head: tuple[np.ndarray, np.ndarray], x: np.ndarray | None,
          y: np.ndarray, wanted: Iterable[str], start: Mapping[str, np.ndarray] | None = None,
          chunk: int | None = None) -> tuple[float, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One forward and backward: (loss, {wanted parameter: dL/d(it)}, dL/d head.weight,
    dL/d head.bias). ``params`` maps every parameter to its effective array (the one the
    forward uses), so a masked weight's gradient is dL/dW_eff. With ``start`` (the batch's
    values of ``cut(graph, wanted).starts``, e.g. from :func:`prefix_values`) the forward
    begins there and ``x`` is not read. With ``chunk`` below the batch (and no ``start``)
    the frozen prefix runs ``chunk`` samples at a time (:func:`prefix_values`)."""
    wanted = set(wanted)
    chunked = chunk is not None and x is not None and 0 < chunk < len(x)
    if start is None and wanted and chunked and cut(graph, wanted).cached(graph):
        start = prefix_values(graph, params, x, wanted, chunk)
        start[graph.input.name] = x
    if start is not None and wanted:
        feats, tape = suffix_forward(graph, params, start, wanted)
    else:
        feats, tape = tape_forward(graph, params, x, wanted)
    hw, hb = head
    logits = feats @ hw.T + hb
    loss, g = cross_entropy(logits, y)
    g_hw = g.T @ feats
    g_hb = g.sum(axis=0)
    gp = executor.backward(graph, params, tape, g @ hw, wanted) if wanted else {}
    return loss, gp, g_hw, g_hb
