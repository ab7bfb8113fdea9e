"""What a router looks at: a small, fixed function of the input, cheap next to an inference.

A router's statistics must stay valid forever, while tasks come and go, so its view of
an input is computed with parameters that never change: the bundle's *first* task's
(exact zero forgetting keeps them byte-identical). The router's cost per input is the
view plus a ``d x (d + prototypes)`` product (see ``prototype.py``), so ``d`` is kept
near ``VIEW_DIMS``: that keeps routing a small share of a batch-1 inference.

* ``input``: the input itself, for at most ``VIEW_DIMS`` float values (an 8x8 digit).
* ``pooled``: up to ``RAW_LIMIT`` float values (a 49x10 MFCC, a 640-value feature
  vector): the input summed over a grid of cells (``cells``: cells per axis; a leading
  channel axis of a 3-D input is kept), so the view has at most ``VIEW_DIMS`` values.
* ``patches``: larger images (a 96x96 or 224x224 RGB image, where a pixel-space
  covariance would need up to ~180 GB): the backbone's first weighted layer (a Conv)
  and the element-wise ops after it, evaluated exactly at ``samples`` x ``samples``
  evenly spaced output positions (one gather of the patches under them, one product
  with the weights) and summed over a ``grid`` x ``grid`` grid of cells: early backbone
  features, ``channels * grid**2 <= PATCH_DIMS`` values. At the old view's positions and
  grid it is the old view times a constant plus a constant: the same decisions.
* ``tokens``: token inputs (int64): the first task's embedding of each token (its first
  Gather), averaged over the sequence.
* ``features`` / ``prefix``: the backbone's features, or a value of it, when none of
  the above applies.

Routers stored with the views of earlier versions keep them and decide exactly as
before: ``input`` for every input of at most ``RAW_LIMIT`` values, and ``sampled`` (the
first layer at ``SAMPLES`` x ``SAMPLES`` positions, mean-pooled to at most
``MAX_VIEW`` values, computed as it was).
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...kernels.reference import pool_rows
from ..graph import Graph

RAW_LIMIT = 1024  # float inputs up to this many values: a view of the input itself
VIEW_DIMS = 160  # values of a pooled input: the routing product is ~d², ~5 us at this size
PATCH_DIMS = 256  # values of a patches view (an image model's inference is 200+ us)
MAX_VIEW = 512  # values of an old "sampled" view (kept: old routers compute it as before)
SAMPLES = 8  # output positions per side where an old "sampled" view evaluates the first layer
PATCH_SAMPLES = 8  # the same for a "patches" view
# ops that act element-wise after the first layer (its activation, a ReLU6, ...)
_POINTWISE = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Gelu", "BatchNormalization"}


@dataclass(frozen=True)
class View:
    kind: str  # "input" | "pooled" | "patches" | "tokens" | "prefix" | "features" | "sampled" (old)
    value: str = ""
    grid: int = 0
    samples: int = 0  # "patches": output positions per side
    cells: tuple[int, ...] = ()  # "pooled": cells per input axis

    def to_json(self) -> str:
        d: dict = {"kind": self.kind, "value": self.value, "grid": self.grid}
        if self.samples:  # only new views carry these: old ones are stored byte-identically
            d["samples"] = self.samples
        if self.cells:
            d["cells"] = list(self.cells)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str | None) -> View:
        if not text:
            return cls("input")  # routers stored before views existed looked at the input
        d = json.loads(text)
        return cls(d["kind"], d.get("value", ""), int(d.get("grid", 0)), int(d.get("samples", 0)),
                   tuple(int(c) for c in d.get("cells", ())))


def _cells(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Cells per axis of a pooled view of an input ``shape`` (a leading channel axis of a
    3-D input kept whole): at most VIEW_DIMS values with the coarsest axis as fine as it
    can be (the most cells on the axis with the fewest), then the most values. Cells that
    divide their axes evenly are preferred (pooling is then one reshape and one sum)
    unless that loses more than half the resolution of the coarsest axis."""
    keep = shape[:1] if len(shape) == 3 else ()
    axes = shape[len(keep):]
    budget = VIEW_DIMS // math.prod(keep)
    if budget < 1:
        return None
    best = even = None
    for g in np.ndindex(*(min(n, budget) for n in axes)):
        grid = tuple(int(i) + 1 for i in g)
        if math.prod(grid) > budget:
            continue
        key = (min(grid), math.prod(grid), grid)
        best = max(best or key, key)
        if all(n % c == 0 for n, c in zip(axes, grid, strict=True)):
            even = max(even or key, key)
    pick = even if even is not None and 2 * even[0] >= best[0] else best
    return keep + pick[2]


def choose(graph: Graph) -> View:
    """The view a new router of ``graph`` looks at (see the module docstring)."""
    if graph.input.dtype != "float32":
        first = next((n for n in graph.backbone_nodes if n.op == "Gather"), None)
        return View("tokens", first.outputs[0]) if first else View("features", graph.features)
    size = math.prod(graph.input_shape)
    if size <= VIEW_DIMS:
        return View("input")
    if size <= RAW_LIMIT:
        cells = _cells(tuple(graph.input_shape))
        return View("pooled", cells=cells) if cells else View("input")
    nodes = graph.backbone_nodes
    sites = {s.node for s in graph.mask_sites()}
    first = next((i for i, n in enumerate(nodes) if n.name in sites), None)
    if first is None:
        return View("features", graph.features)
    end = first
    while end + 1 < len(nodes) and nodes[end + 1].op in _POINTWISE and nodes[end + 1].inputs[0] == \
            nodes[end].outputs[0]:
        end += 1
    value = nodes[end].outputs[0]
    shape = graph.shapes()[value]
    if len(shape) != 4:
        small = math.prod(shape[1:]) <= MAX_VIEW
        return View("prefix", value, 0) if small else View("features", graph.features)
    # the finest grid within PATCH_DIMS values; at least PATCH_SAMPLES positions per side,
    # whole cells of them
    grid = max(1, min(math.isqrt(PATCH_DIMS // shape[1]), PATCH_SAMPLES))
    samples = grid * -(-PATCH_SAMPLES // grid)
    conv = nodes[first]
    if conv.op == "Conv" and min(shape[2], shape[3]) > samples and len(graph.input_shape) == 3 \
            and _affine_before(graph, first) is not None:
        return View("patches", value, grid, samples)
    grid = max(1, min(shape[2], shape[3], SAMPLES, int(math.sqrt(MAX_VIEW / shape[1]))))
    return View("prefix", value, grid)


def _bounds(n: int, cells: int) -> np.ndarray:
    return np.array([round(i * n / cells) for i in range(cells + 1)])


def pool_index(shape: tuple[int, ...], cells: tuple[int, ...]) -> np.ndarray:
    """[m, d] int32: column c holds the flat indices (ascending, then -1) of the input
    values in the pooled view's cell c (cells in C order; ``kernels`` ``pool_rows``)."""
    bins = [np.searchsorted(_bounds(n, c), np.arange(n), side="right") - 1
            for n, c in zip(shape, cells, strict=True)]
    cell = np.ravel_multi_index(np.ix_(*bins), cells).reshape(-1)  # cell of each input value
    order = np.argsort(cell, kind="stable")  # by cell, ascending input index within one
    counts = np.bincount(cell, minlength=math.prod(cells))
    rank = np.arange(len(cell)) - np.repeat(np.cumsum(counts) - counts, counts)
    index = np.full((int(counts.max()), len(counts)), -1, np.int32)
    index[rank, cell[order]] = order
    return index


def _pooled_fn(shape: tuple[int, ...], cells: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """x [n, *shape] -> [n, prod(cells)]: the sum of each cell (sums, not means: the
    Mahalanobis distance does not see a scale), added in the order the route kernel pools
    in (so fitting and deciding see the same values, byte for byte)."""
    index, size = pool_index(shape, cells), math.prod(shape)
    return lambda x: pool_rows(x.reshape(len(x), size), index)


_AFFINE = {"Add", "Sub", "Mul", "Div"}


def _affine_before(graph: Graph, first: int, params=None) -> tuple[np.ndarray, np.ndarray] | None:
    """The nodes before the first Conv, when they only scale and shift each input channel
    by constants (an input normalization, ``(x - mean) * inv_std``): per channel ``(a, b)``
    with the Conv's input ``a * x + b`` (ones and zeros when the Conv reads the input
    itself; without ``params``, only whether they are such). None otherwise."""
    nodes = graph.backbone_nodes
    c = graph.input_shape[0]
    a, b = np.ones(c, np.float64), np.zeros(c, np.float64)
    cur = graph.input.name
    for n in nodes[:first]:
        if n.op not in _AFFINE or len(n.inputs) != 2 or cur not in n.inputs:
            return None
        (k,) = [i for i in n.inputs if i != cur] or [None]
        if k not in graph.params:
            return None
        full = (1,) * (4 - len(graph.params[k].shape)) + tuple(graph.params[k].shape)  # vs [n, C, H, W]
        if len(full) != 4 or full[0] != 1 or full[2:] != (1, 1) or full[1] not in (1, c):
            return None  # a constant that varies along anything but the channel axis
        v = np.ones(c) if params is None else \
            np.broadcast_to(np.asarray(params[k], np.float64).reshape(-1), (c,))
        x_first = n.inputs[0] == cur
        if n.op == "Add":
            b = b + v
        elif n.op == "Sub":
            a, b = (a, b - v) if x_first else (-a, v - b)
        elif n.op == "Mul":
            a, b = a * v, b * v
        elif x_first:  # Div by a constant
            a, b = a / v, b / v
        else:
            return None
        cur = n.outputs[0]
    return (a, b) if nodes[first].inputs[0] == cur else None


def _taps(attrs: dict, axis: int, out: int, k: int, samples: int) -> np.ndarray:
    """[samples, k] input indices (before padding is clipped) along spatial ``axis`` that a
    Conv's ``k`` taps read at ``samples`` evenly spaced output positions of ``out``."""
    pos = np.linspace(0, out - 1, samples).round().astype(int)[:, None]
    return pos * attrs["strides"][axis] + np.arange(k) * attrs["dilations"][axis] - attrs["pads"][axis]


def _patches_fn(graph: Graph, params, view: View, x_shape: tuple[int, ...]
                ) -> Callable[[np.ndarray], np.ndarray]:
    """The first Conv and the element-wise ops after it at ``view.samples``² evenly
    spaced output positions (those of the old "sampled" view), summed over a
    ``view.grid``² grid of cells: x [n, *x_shape] -> [n, d] float32 in (cell, channel)
    order. The patches are one gather (times a 0/1 mask where they reach into the
    padding), the layer one product with the weights. Before a ReLU or Clip the bias
    moves into the bounds (relu(y + b) = max(y, -b) + b): the view is then the layer's
    output less a constant, which no Mahalanobis distance sees, for a call fewer."""
    from ..ops import get_op

    nodes = graph.backbone_nodes
    start = next(i for i, n in enumerate(nodes) if n.op == "Conv")
    end = next(i for i, n in enumerate(nodes) if view.value in n.outputs)
    conv, a, s = nodes[start], nodes[start].attrs, view.samples
    w = np.asarray(params[conv.inputs[1]], np.float32)
    o, cg, kh, kw = w.shape
    c, h, wd = x_shape
    size = c * h * wd
    out_h, out_w = graph.shapes()[conv.outputs[0]][2:]
    ri, ci = _taps(a, 0, out_h, kh, s), _taps(a, 1, out_w, kw, s)
    r, q = ri[:, None, None, :, None], ci[None, :, None, None, :]  # [s, s, c, kh, kw]
    inside = np.broadcast_to((r >= 0) & (r < h) & (q >= 0) & (q < wd), (s, s, c, kh, kw)).reshape(s * s, -1)
    idx = (np.arange(c)[None, None, :, None, None] * h * wd + np.clip(r, 0, h - 1) * wd
           + np.clip(q, 0, wd - 1)).reshape(s * s, -1)
    mask = None if inside.all() else inside.astype(np.float32)
    g = a.get("group", 1)
    full = np.zeros((c, kh, kw, o), np.float32)  # a grouped conv as a block-diagonal one
    for i in range(g):
        og = o // g
        full[i * cg:(i + 1) * cg, :, :, i * og:(i + 1) * og] = w[i * og:(i + 1) * og].transpose(1, 2, 3, 0)
    # an input normalization before the Conv, a * x + b per channel: a into the weights;
    # b, zero where a patch reaches into the padding, a constant per position into the bias
    scale, shift = _affine_before(graph, start, params)
    inner = np.repeat(np.arange(c), kh * kw)  # the input channel of each weight row
    bias = np.asarray(params[conv.inputs[2]] if len(conv.inputs) > 2 else np.zeros(o), np.float32)
    rows = full.reshape(-1, o)
    if shift.any():
        on = inside if mask is not None else np.ones((s * s, rows.shape[0]), bool)
        bias = (bias + (on * shift[inner]) @ rows.astype(np.float64)).astype(np.float32)  # [s*s, o]
    weights = np.ascontiguousarray(rows * scale[inner, None].astype(np.float32))
    rb = _bounds(s, view.grid)
    cell = np.zeros((view.grid, view.grid, s, s), np.float32)
    for i in range(view.grid):
        for j in range(view.grid):
            cell[i, j, rb[i]:rb[i + 1], rb[j]:rb[j + 1]] = 1.0
    cell = cell.reshape(view.grid ** 2, s * s)
    after = nodes[start + 1:end + 1]
    steps: list[Callable[[np.ndarray], np.ndarray]] = []
    if len(after) == 1 and after[0].op == "Relu":
        steps.append(lambda y, lo=-bias: np.maximum(y, lo, out=y))
    elif len(after) == 1 and after[0].op == "Clip":
        lo, hi = np.float32(after[0].attrs["min"]) - bias, np.float32(after[0].attrs["max"]) - bias
        steps.append(lambda y, lo=lo, hi=hi: np.clip(y, lo, hi, out=y))
    else:
        steps.append(lambda y: np.add(y, bias, out=y))
        for node in after:  # the op itself, on [n, o, s, s] (BatchNormalization is per channel)
            op, args = get_op(node.op), [params.get(i) for i in node.inputs]

            def step(y, op=op, args=args, node=node):
                z = y.reshape(len(y), s, s, o).transpose(0, 3, 1, 2)
                z = op.forward([z, *args[1:]], node.attrs)[0]
                return np.ascontiguousarray(z.transpose(0, 2, 3, 1), np.float32).reshape(len(y), s * s, o)
            steps.append(step)
    d = view.grid ** 2 * o

    def patches(x: np.ndarray) -> np.ndarray:
        p = x.reshape(len(x), size).take(idx, axis=1)  # [n, s*s, c*kh*kw]
        if mask is not None:
            p *= mask
        y = p @ weights  # [n, s*s, o]
        for f in steps:
            y = f(y)
        return (cell @ y).reshape(len(x), d)
    return patches


_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepare(view: View, runtime) -> Callable[[np.ndarray], np.ndarray] | None:
    """A function x [n, *input] -> [n, d] float32 computing a ``pooled`` or ``patches``
    view for ``runtime`` (built once: gather indices, weights, cells); None for other kinds."""
    if view.kind not in ("pooled", "patches"):
        return None
    fns = _FNS.setdefault(runtime, {})
    if view not in fns:
        shape = tuple(runtime.input_shape)
        if view.kind == "pooled":
            fns[view] = _pooled_fn(shape, view.cells)
        else:
            params = runtime.activate(runtime.bundle.tasks[0]["name"]).params
            fns[view] = _patches_fn(runtime.bundle.graph, params, view, shape)
    return fns[view]


def _pool(a: np.ndarray, grid: int) -> np.ndarray:
    n, c, h, w = a.shape
    hs = [round(i * h / grid) for i in range(grid + 1)]
    ws = [round(j * w / grid) for j in range(grid + 1)]
    out = np.empty((n, c, grid, grid), np.float32)
    for i in range(grid):
        for j in range(grid):
            out[:, :, i, j] = a[:, :, hs[i]:hs[i + 1], ws[j]:ws[j + 1]].mean(axis=(2, 3))
    return out.reshape(n, -1)


@dataclass
class _Plan:
    """What a sampled view needs, computed once per graph: patch indices and masks."""

    rows: np.ndarray
    cols: np.ndarray
    inside: np.ndarray | None  # [S, kh, S, kw] where the patch is in the input, if not everywhere
    conv: object
    after: list


_PLANS: dict[tuple[int, View], _Plan] = {}


def _plan(graph: Graph, view: View, x_shape: tuple[int, ...]) -> _Plan:
    key = (id(graph), view)
    if key not in _PLANS:
        nodes = graph.backbone_nodes
        start = next(i for i, n in enumerate(nodes) if n.op == "Conv")
        end = next(i for i, n in enumerate(nodes) if view.value in n.outputs)
        conv = nodes[start]
        a = conv.attrs
        kh, kw = graph.params[conv.inputs[1]].shape[2:]
        h, w = x_shape[2:]
        out_h, out_w = graph.shapes()[conv.outputs[0]][2:]
        ri, ci = _taps(a, 0, out_h, kh, SAMPLES), _taps(a, 1, out_w, kw, SAMPLES)
        vr, vc = (ri >= 0) & (ri < h), (ci >= 0) & (ci < w)
        inside = None if vr.all() and vc.all() else \
            (vr[:, :, None, None] & vc[None, None]).astype(np.float32)
        _PLANS[key] = _Plan(np.clip(ri, 0, h - 1).reshape(-1), np.clip(ci, 0, w - 1).reshape(-1), inside,
                            conv, nodes[start + 1 : end + 1])
    return _PLANS[key]


def _sampled(graph: Graph, params, x: np.ndarray, view: View) -> np.ndarray:
    """The first Conv and the element-wise ops after it, at SAMPLES x SAMPLES output
    positions only: the input patches under those positions (zeros where they reach
    into the padding) times the weights, so the values are exactly the layer's."""
    from ..ops import get_op

    p = _plan(graph, view, x.shape)
    conv = p.conv
    w = params[conv.inputs[1]]
    o, cg, kh, kw = w.shape
    n = len(x)
    patches = x[:, :, p.rows][:, :, :, p.cols].reshape(n, -1, SAMPLES, kh, SAMPLES, kw)
    if p.inside is not None:
        patches = patches * p.inside[None, None].transpose(0, 1, 2, 3, 4, 5)
    g = conv.attrs["group"]
    cols = patches.transpose(0, 2, 4, 1, 3, 5).reshape(n, SAMPLES * SAMPLES, g, cg * kh * kw)
    if g == 1:
        y = cols[:, :, 0] @ w.reshape(o, -1).T
    else:
        y = np.einsum("nsgk,gok->nsgo", cols, w.reshape(g, o // g, -1)).reshape(n, SAMPLES * SAMPLES, o)
    if len(conv.inputs) > 2:
        y += params[conv.inputs[2]]
    y = y.reshape(n, SAMPLES, SAMPLES, o).transpose(0, 3, 1, 2)
    for node in p.after:
        y = get_op(node.op).forward([y if i == node.inputs[0] else params[i] for i in node.inputs],
                                    node.attrs)[0]
    return y


def compute(view: View, runtime, x: np.ndarray) -> np.ndarray:
    """[batch, d] view of a checked batch ``x``."""
    if view.kind == "input":
        return x.reshape(len(x), -1)
    fn = prepare(view, runtime)
    if fn is not None:
        return fn(x)
    from .. import executor

    graph = runtime.bundle.graph
    params = runtime.activate(runtime.bundle.tasks[0]["name"]).params
    if view.kind == "features":
        return executor.features(graph, params, x)
    if view.kind == "tokens":
        return executor.value(graph, params, x, view.value).mean(axis=1)
    if view.kind == "sampled":
        y = _sampled(graph, params, x, view)
        k = SAMPLES // view.grid
        return y.reshape(len(y), y.shape[1], view.grid, k, view.grid, k).mean(axis=(3, 5)).reshape(len(y), -1)
    a = executor.value(graph, params, x, view.value)
    return _pool(a, view.grid) if view.grid else a.reshape(len(a), -1)

