"""What a router looks at: the raw input when it is small, else early backbone features.

A router's statistics must stay valid forever, while tasks come and go, so its view of
an input is computed with parameters that never change: the bundle's *first* task's
(exact zero forgetting keeps them byte-identical). For an input of at most
``RAW_LIMIT`` float values (an 8x8 digit, a 49x10 MFCC) the view is the input itself:
nothing is cheaper. Above that (a 96x96 or 224x224 RGB image, where a pixel-space
covariance would need up to ~180 GB) the view is the output of the backbone's first
weighted layer (a Conv) and the element-wise ops after it, evaluated exactly at
``SAMPLES`` x ``SAMPLES`` evenly spaced output positions and average-pooled to a small
grid: early backbone features for a few hundred multiply-adds per channel, so routing
stays a small share of an inference (run by the numpy reference, it cannot ride on the
compiled forward). Token inputs (int64) use the first task's embedding of each token
(its first Gather), averaged over the sequence.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..graph import Graph

RAW_LIMIT = 1024
MAX_VIEW = 512  # values of a pooled view
SAMPLES = 8  # output positions per side where the first layer is evaluated
# ops that act element-wise after the first layer (its activation, a ReLU6, ...)
_POINTWISE = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Gelu", "BatchNormalization"}


@dataclass(frozen=True)
class View:
    kind: str  # "input" | "prefix" | "features"
    value: str = ""
    grid: int = 0

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "value": self.value, "grid": self.grid})

    @classmethod
    def from_json(cls, text: str | None) -> View:
        if not text:
            return cls("input")  # routers stored before views existed looked at the input
        d = json.loads(text)
        return cls(d["kind"], d.get("value", ""), int(d.get("grid", 0)))


def choose(graph: Graph) -> View:
    if graph.input.dtype != "float32":
        first = next((n for n in graph.backbone_nodes if n.op == "Gather"), None)
        return View("tokens", first.outputs[0]) if first else View("features", graph.features)
    if math.prod(graph.input_shape) <= RAW_LIMIT:
        return View("input")
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
    grid = max(1, min(shape[2], shape[3], SAMPLES, int(math.sqrt(MAX_VIEW / shape[1]))))
    if nodes[first].op == "Conv" and min(shape[2], shape[3]) > SAMPLES:
        while SAMPLES % grid:  # cells of whole samples: pooling is one reshape
            grid -= 1
        return View("sampled", value, grid)
    return View("prefix", value, grid)


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
        ri = (np.linspace(0, out_h - 1, SAMPLES).round().astype(int)[:, None] * a["strides"][0]
              + np.arange(kh)[None] * a["dilations"][0] - a["pads"][0])
        ci = (np.linspace(0, out_w - 1, SAMPLES).round().astype(int)[:, None] * a["strides"][1]
              + np.arange(kw)[None] * a["dilations"][1] - a["pads"][1])
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

