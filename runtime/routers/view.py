"""What a router looks at: the raw input when it is small, else early backbone features.

A router's statistics must stay valid forever, while tasks come and go, so its view of
an input is computed with parameters that never change: the bundle's *first* task's
(exact zero forgetting keeps them byte-identical). For an input of at most
``RAW_LIMIT`` float values (an 8x8 digit, a 49x10 MFCC) the view is the input itself:
nothing is cheaper. Above that (a 96x96 or 224x224 RGB image, where a pixel-space
covariance would need up to ~180 GB) the view is the output of the backbone's first
weighted layer and the element-wise ops after it, average-pooled to a small grid: a
short prefix of the network (a few % of its multiply-adds), so that routing stays a
small share of an inference. Token inputs (int64) use the first task's features.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..graph import Graph

RAW_LIMIT = 1024
MAX_VIEW = 512  # values of a pooled view
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
        return View("features", graph.features)
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
    grid = max(1, min(shape[2], shape[3], int(math.sqrt(MAX_VIEW / shape[1]))))
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


def compute(view: View, runtime, x: np.ndarray) -> np.ndarray:
    """[batch, d] view of a checked batch ``x``."""
    if view.kind == "input":
        return x.reshape(len(x), -1)
    from .. import executor

    graph = runtime.bundle.graph
    params = runtime.activate(runtime.bundle.tasks[0]["name"]).params
    if view.kind == "features":
        return executor.features(graph, params, x)
    a = executor.value(graph, params, x, view.value)
    return _pool(a, view.grid) if view.grid else a.reshape(len(a), -1)
