"""Expert routing: a sparsely-gated mixture of experts grown task by task.

The gating follows Shazeer et al. 2017 ("Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer", arXiv:1701.06538, eq. 3-5, without the
noise): ``G(f) = Softmax(KeepTopK(f W_g + b_g, k))`` over the experts, and the layer's
output is ``sum_i G_i(f) E_i``. ``f`` are the features
of a shared frozen trunk (the given architecture: the main graph, at its given or
initial weights, or trained with task 1 with ``trunk=1``). An expert is a narrow copy
of the architecture on the input (``width``, default 0.25; its parameters ``c<i+2>.*``
as a PNN column without lateral links) or, with ``width=0``, a small MLP
(``Linear + ReLU``, ``hidden`` units) on the trunk's features. The task's head reads
the mixture.

Task ``t`` adds ``experts`` experts and as many gate rows (its own gate group, a Linear
``moe.gate<t>``); it runs with every expert and gate row so far (the gate's logits are
the groups' outputs concatenated in task order). What earlier tasks added never changes
and task ``t``'s graph holds only the experts and rows that existed when it was learned,
so an old task's routing and outputs stay byte-identical: BWT exactly 0. The graph is
static (every expert of the task is computed, the unchosen ones weighted by exactly 0);
``task_metrics`` reports the fraction of parameters an input actually uses and the
FLOPs of the static graph and of a sparse dispatch (trunk, gate and the chosen experts).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from edgecl.runtime.graph import Graph, Node, Param

from ..data import Task
from ..torchnet import features
from .pnn import Columns, GrowingMethod

_METRICS = ("active_fraction", "active_experts", "flops_static", "flops_sparse")


def expert_graph(main: Graph, groups: list[int], hidden: int, top_k: int,
                 columns: Columns | None = None) -> Graph:
    """The main graph (the trunk) with ``sum(groups)`` experts, gate group ``g`` holding
    ``groups[g]`` rows on the trunk's features, top-``top_k`` gating. An expert is a
    ``Linear + ReLU`` of ``hidden`` units on the trunk's features, or with ``columns``,
    a narrow copy of the architecture on the input (expert ``i`` is column ``i + 2``,
    parameters ``c<i+2>.*``, no lateral links; ``hidden`` must be its feature width)."""
    f, feat = main.features, main.feature_dim
    n = sum(groups)
    params = list(main.params.values())
    nodes = list(main.backbone_nodes)
    gate_outs = []
    for g, size in enumerate(groups, start=1):
        w, b = f"moe.gate{g}.weight", f"moe.gate{g}.bias"
        params += [Param(w, (size, feat), "weight"), Param(b, (size,), "bias")]
        nodes.append(Node(f"moe.gate{g}", "Linear", (f, w, b), (f"moe.gate{g}",)))
        gate_outs.append(f"moe.gate{g}")
    logits = gate_outs[0]
    if len(gate_outs) > 1:
        nodes.append(Node("moe.logits", "Concat", tuple(gate_outs), ("moe.logits",), {"axis": 1}))
        logits = "moe.logits"
    nodes += [Node("moe.topk", "KeepTopK", (logits,), ("moe.topk",), {"k": min(top_k, n)}),
              Node("moe.gates", "Softmax", ("moe.topk",), ("moe.gates",), {"axis": -1}),
              Node("moe.gates3", "Reshape", ("moe.gates",), ("moe.gates3",), {"shape": [0, 1, n]})]
    outs = []
    for i in range(n):
        if columns is not None:
            columns.build(i + 2)
            params += columns.params[i + 2]
            nodes += columns.nodes[i + 2]
            outs.append(columns.value(main.features, i + 2))
            continue
        w, b = f"moe.e{i}.weight", f"moe.e{i}.bias"
        params += [Param(w, (hidden, feat), "weight"), Param(b, (hidden,), "bias")]
        nodes += [Node(f"moe.e{i}", "Linear", (f, w, b), (f"moe.e{i}",)),
                  Node(f"moe.e{i}.relu", "Relu", (f"moe.e{i}",), (f"moe.e{i}.relu",))]
        outs.append(f"moe.e{i}.relu")
    stacked = outs[0]
    if n > 1:
        nodes.append(Node("moe.stack", "Concat", tuple(outs), ("moe.stack",), {"axis": 1}))
        stacked = "moe.stack"
    nodes += [Node("moe.stack3", "Reshape", (stacked,), ("moe.stack3",), {"shape": [0, n, hidden]}),
              Node("moe.mix3", "MatMul", ("moe.gates3", "moe.stack3"), ("moe.mix3",)),
              Node("moe.mix", "Reshape", ("moe.mix3",), ("moe.mix",), {"shape": [0, hidden]})]
    return Graph(main.inputs, params, nodes, "moe.mix", name=main.name)


def site_macs(graph: Graph) -> dict[str, int]:
    """Multiply-accumulates of one input per Conv / Linear weight of ``graph``'s backbone
    (what dominates the compute; elementwise ops are not counted)."""
    shapes = graph.shapes()
    by_node = {n.name: n for n in graph.backbone_nodes}
    return {s.weight: int(math.prod(shapes[by_node[s.node].outputs[0]][1:]) * math.prod(s.shape[1:]))
            for s in graph.mask_sites()}


class Experts(GrowingMethod):
    name = "experts"
    graph_prefix = "experts"
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-3,
                "experts": 2,   # experts each task adds
                "top_k": 2,     # experts an input is routed to
                "width": 0.25,  # an expert is a copy of the architecture this wide; 0: an MLP on the trunk
                "hidden": 64,   # units of an MLP expert (width 0)
                "trunk": 0}     # 0: the trunk (given or initial weights) never trains; 1: trains with task 1
    _int_hp: ClassVar[tuple[str, ...]] = ("experts", "top_k", "hidden", "trunk")

    def __init__(self, graph: Graph, seed: int = 0, backbone: dict[str, np.ndarray] | None = None,
                 **hp: float) -> None:
        super().__init__(graph, seed, backbone, **hp)
        for k in self._int_hp:
            v = self.hp[k]
            if int(v) != v or int(v) < (0 if k == "trunk" else 1) or (k == "trunk" and int(v) > 1):
                want = "0 or 1" if k == "trunk" else "a positive integer"
                raise ValueError(f"{self.name}: {k} must be {want}, got {v}")
        self.per_task, self.top_k = int(self.hp["experts"]), int(self.hp["top_k"])
        width = float(self.hp["width"])
        if not 0.0 <= width <= 4.0 or not math.isfinite(width):
            raise ValueError(f"{self.name}: width must lie in [0, 4] (0: MLP experts), "
                             f"got {self.hp['width']}")
        self.columns = Columns(graph, width, laterals=False) if width > 0 else None
        self.hidden = int(self.hp["hidden"]) if self.columns is None else self.columns.graph(2).feature_dim
        self._graphs: dict[int, Graph] = {}
        self.metrics: list[dict[str, float]] = []

    def graph_of(self, t: int) -> Graph:
        if t not in self._graphs:
            self._graphs[t] = expert_graph(self.graph, [self.per_task] * (t + 1), self.hidden, self.top_k,
                                           self.columns)
        return self._graphs[t]

    def added_params(self, t: int) -> list[Param]:
        g, e = self.graph_of(t), self.per_task
        names = [f"moe.gate{t + 1}.weight", f"moe.gate{t + 1}.bias"]
        names += [n for i in range(t * e, (t + 1) * e) for n in self.expert_params(i)]
        return [g.params[n] for n in names]

    def expert_params(self, i: int) -> list[str]:
        """The parameter names of expert ``i``."""
        if self.columns is not None:
            return [p.name for p in self.columns.column_params(i + 2)]
        return [f"moe.e{i}.weight", f"moe.e{i}.bias"]

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        super()._begin_task(task, gen)
        t = len(self.heads) - 1
        if t == 0:
            return
        # The new experts start chosen for the new task's inputs: their gate rows' bias is
        # raised above every old row's logit on the task's training data. (An expert that
        # KeepTopK drops gets no gradient, so new experts behind frozen old rows would
        # never train.) The new rows still learn to send inputs to old experts.
        logits = self._gate_logits(task.x_train, t)
        n_old = t * self.per_task
        lift = float((logits[:, :n_old].max(axis=1) - logits[:, n_old:].min(axis=1)).max())
        if lift > 0:
            b = self.added[t][f"moe.gate{t + 1}.bias"]
            self.added[t][f"moe.gate{t + 1}.bias"] = b + np.float32(lift + 1.0)

    @torch.no_grad()
    def _gate_logits(self, x: np.ndarray, t: int) -> np.ndarray:
        g = self.graph_of(t)
        out = "moe.logits" if t else "moe.gate1"
        view = Graph(g.inputs, list(g.params.values()), g.nodes, out, name=g.name)
        return features(view, {**self.params, **self.task_params(t)}, self._x(x)).numpy()

    def train_backbone_first(self) -> bool:
        return bool(int(self.hp["trunk"]))

    # -- accounting ------------------------------------------------------------------------
    @torch.no_grad()
    def routing(self, x: np.ndarray, t: int) -> np.ndarray:
        """Task ``t``'s gate weights [batch, experts] for inputs ``x`` (0 = not chosen)."""
        g = self.graph_of(t)
        route = Graph(g.inputs, list(g.params.values()), g.nodes, "moe.gates", name=g.name)
        return features(route, {**self.params, **self.task_params(t)}, self._x(x)).numpy()

    def _after_task(self, task: Task, t: int) -> None:
        g = self.graph_of(t)
        chosen = self.routing(task.x_test, t) > 0  # exactly 0 for an expert KeepTopK dropped
        n, h = chosen.shape[1], self.hidden
        size = {p: math.prod(q.shape) for p, q in g.params.items()}
        macs = site_macs(g)
        experts = np.array([sum(size[p] for p in self.expert_params(i)) for i in range(n)], np.float64)
        # per expert its layers and its share of the mix (weights x outputs: h per expert)
        e_macs = np.array([sum(macs.get(p, 0) for p in self.expert_params(i)) + h for i in range(n)],
                          np.float64)
        base = sum(macs.values()) + n * h - e_macs.sum()  # trunk and gate: every input pays them
        always = g.n_params - experts.sum()
        self.metrics.append({"active_fraction": float(((always + chosen @ experts) / g.n_params).mean()),
                             "active_experts": float(chosen.sum(axis=1).mean()),
                             "flops_static": 2.0 * (base + e_macs.sum()),
                             "flops_sparse": 2.0 * (base + float((chosen @ e_macs).mean()))})

    def task_metrics(self, t: int) -> dict:
        g = self.graph_of(t)
        m = self.metrics[t]
        return {"experts": (t + 1) * self.per_task, "top_k": min(self.top_k, (t + 1) * self.per_task),
                "active_fraction": round(m["active_fraction"], 6),
                "active_experts": round(m["active_experts"], 4),
                "flops_static": int(m["flops_static"]), "flops_sparse": int(round(m["flops_sparse"])),
                "stored_params": self.stored_params(t), "task_graph_params": int(g.n_params)}

    def _extra_state(self) -> dict[str, torch.Tensor]:
        state = super()._extra_state()
        for t, m in enumerate(self.metrics):
            state[f"experts-metrics.{t}"] = torch.tensor([m[k] for k in _METRICS], dtype=torch.float64)
        return state

    def _load_extra_state(self, state: dict[str, torch.Tensor], n_tasks: int) -> None:
        super()._load_extra_state(state, n_tasks)
        self.metrics = [dict(zip(_METRICS, state[f"experts-metrics.{t}"].tolist(), strict=True))
                        for t in range(n_tasks)]
