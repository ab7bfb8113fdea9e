"""Per-task LoRA on a frozen backbone, for later combination by task arithmetic
(Zeng, Li, Ayesh 2025, "Neural Networks Remember More: The Power of Parameter Isolation
and Combination", arXiv:2502.10966; LoRA: Hu et al., 2021).

Each task learns a low-rank pair per chosen mask site, ``W + (alpha / r) * B @ A`` (the
weight viewed as ``(units, fan_in)`` along its unit axis, as the ``lora`` task kind runs
it), and a head; the backbone never changes after the first task, so every earlier task's
outputs stay byte-identical (parameter isolation). ``A`` starts small and random, ``B`` at
zero, so a task starts from the backbone's own features. The backbone is given
(``backbone=``: imported or pretrained) or, if not, trained densely on the first task of
the stream before its LoRA pair is learned (as Piggyback's). Combining the tasks' deltas
into one model that needs no task id is ``edgecl merge`` (``runtime/merge.py``).

``Adapter``: the paper's other PEFT module, a bottleneck adapter (Houlsby et al., 2019)
after each chosen site, ``v + up(relu(down(v)))`` (Linears on a Linear's output, 1x1 Convs
on a Conv's), on a graph of the task's own (kind ``modules``), ``up`` starting at zero;
the backbone trains with the first task (and its adapter), then every earlier part is
frozen. Its tasks cannot be merged by the ``merged`` kind, which adds backbone deltas.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.runtime.graph import Graph, MaskSite, Node, Param

from ..data import Task
from ..torchnet import Params, init_backbone
from .base import Method
from .pnn import GrowingMethod
from .supsup import Piggyback


def as_matrix(site: MaskSite, w: torch.Tensor) -> torch.Tensor:
    """A site's weight as ``(units, fan_in)`` along its unit axis (the kind's view)."""
    return torch.movedim(w, site.rule.unit_axis, 0).reshape(site.units, -1)


def from_matrix(site: MaskSite, m: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`as_matrix`."""
    rest = [d for i, d in enumerate(site.shape) if i != site.rule.unit_axis % len(site.shape)]
    return torch.movedim(m.reshape(site.units, *rest), 0, site.rule.unit_axis)


class LoRA(Method):
    name = "lora"
    kind = "lora"
    # rank: r of every pair; alpha: scale = alpha / r; last_sites: LoRA on the last K mask
    # sites only (0: every site); lr: the pairs' and head's Adam rate; pretrain_*: the dense
    # training of the backbone on the first task when none is given
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-2, "rank": 4, "alpha": 4.0, "last_sites": 0,
                "pretrain_epochs": 30}

    def __init__(self, graph, seed=0, backbone=None, **hp):
        super().__init__(graph, seed, backbone, **hp)
        rank, last = int(self.hp["rank"]), int(self.hp["last_sites"])
        if rank < 1:
            raise ValueError(f"lora: rank must be at least 1, got {self.hp['rank']}")
        if not 0 <= last <= len(self.sites):
            raise ValueError(f"lora: last_sites must lie in 0..{len(self.sites)} (0: every site), got {last}")
        self.chosen: list[MaskSite] = self.sites[-last:] if last else list(self.sites)
        self.pairs: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    @property
    def scale(self) -> float:
        return float(np.float32(self.hp["alpha"] / self.hp["rank"]))

    def _initial_backbone(self):
        return init_backbone(self.graph, torch.Generator().manual_seed(self.seed))

    def _accuracy_at_init(self, task, t):
        return self.accuracy(task.x_test, task.y_test, t)  # the backbone is the trained one

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        if not self.pretrained:
            Piggyback._pretrain(self, task, gen)  # the same dense first-task training as Piggyback
        self._new_head(task.n_classes, gen)
        r = int(self.hp["rank"])
        pairs = {}
        for s in self.chosen:
            fan_in = math.prod(s.shape) // s.units
            bound = 1.0 / fan_in**0.5  # A as a Linear's default init, B = 0: no change at first
            a = (torch.rand((r, fan_in), generator=gen) * 2 - 1) * bound
            pairs[s.node] = (a, torch.zeros(s.units, r))
        self.pairs.append(pairs)

    def _with_pairs(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Params:
        scale = torch.tensor(self.scale, dtype=torch.float32)
        out = {}
        for s in self.chosen:
            a, b = pairs[s.node]
            w = self.params[s.weight]
            out[s.weight] = from_matrix(s, as_matrix(s, w) + scale * (b @ a))
        return out

    def task_params(self, t: int) -> Params:
        return self._with_pairs(self.pairs[t])

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        pairs = {n: (a.clone().requires_grad_(True), b.clone().requires_grad_(True))
                 for n, (a, b) in self.pairs[t].items()}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        opt = torch.optim.Adam([*(p for ab in pairs.values() for p in ab), hw, hb], lr=self.hp["lr"])

        def step(x, y, _progress):
            h = self.run_features(x, self._with_pairs(pairs))
            loss = F.cross_entropy(F.linear(h, hw, hb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        # only the chosen sites change: the layers before the first run once per input
        self.epochs(task, gen, self.hp["epochs"], step, trainable={s.weight for s in self.chosen})
        self.pairs[t] = {n: (a.detach(), b.detach()) for n, (a, b) in pairs.items()}
        self.heads[t] = (hw.detach(), hb.detach())

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        parts = {"lora.scale": np.array([self.scale], dtype=np.float32)}
        for n, (a, b) in self.pairs[t].items():
            parts[f"lora.{n}.a"] = a.numpy().astype(np.float32)
            parts[f"lora.{n}.b"] = b.numpy().astype(np.float32)
        return self.encode_task(parts, t)

    def task_metrics(self, t: int) -> dict:
        return {"lora_rank": int(self.hp["rank"]), "lora_sites": len(self.chosen)}

    def _extra_state(self):
        out = {}
        for t, pairs in enumerate(self.pairs):
            for n, (a, b) in pairs.items():
                out[f"lora.{t}.{n}.a"], out[f"lora.{t}.{n}.b"] = a.contiguous(), b.contiguous()
        return out

    def _load_extra_state(self, state, n_tasks):
        self.pairs = [{s.node: (state[f"lora.{t}.{s.node}.a"].clone(), state[f"lora.{t}.{s.node}.b"].clone())
                       for s in self.chosen} for t in range(n_tasks)]


def adapter_graph(main: Graph, sites: list[MaskSite], bottleneck: int, prefix: str) -> Graph:
    """``main`` with a residual bottleneck adapter after each site's output: parameters
    ``<prefix>.<node>.down|up.weight|bias``; ``up`` is the adapter's last layer."""
    shapes = main.shapes()
    params = list(main.params.values())
    nodes: list[Node] = []
    renamed: dict[str, str] = {}
    chosen = {s.node: s for s in sites}
    for n in main.backbone_nodes:
        nodes.append(Node(n.name, n.op, tuple(renamed.get(v, v) for v in n.inputs), n.outputs, n.attrs))
        site = chosen.get(n.name)
        if site is None:
            continue
        v = n.outputs[0]
        conv = site.op == "Conv"
        units = shapes[v][1] if conv else shapes[v][-1]
        tail = (1, 1) if conv else ()
        a = f"{prefix}.{n.name}"
        params += [Param(f"{a}.down.weight", (bottleneck, units, *tail), "weight"),
                   Param(f"{a}.down.bias", (bottleneck,), "bias"),
                   Param(f"{a}.up.weight", (units, bottleneck, *tail), "weight"),
                   Param(f"{a}.up.bias", (units,), "bias")]
        op = "Conv" if conv else "Linear"
        nodes += [Node(f"{a}.down", op, (v, f"{a}.down.weight", f"{a}.down.bias"), (f"{a}.down",)),
                  Node(f"{a}.relu", "Relu", (f"{a}.down",), (f"{a}.relu",)),
                  Node(f"{a}.up", op, (f"{a}.relu", f"{a}.up.weight", f"{a}.up.bias"), (f"{a}.up",)),
                  Node(f"{a}.add", "Add", (v, f"{a}.up"), (f"{a}.out",))]
        renamed[v] = f"{a}.out"
    # the adapters are no mask sites of their own: the task's sites stay the backbone's
    return Graph(main.inputs, params, nodes, renamed.get(main.features, main.features), name=main.name,
                 mask=[s.weight for s in main.mask_sites()])


class Adapter(GrowingMethod):
    name = "adapter"
    graph_prefix = "adapter"
    # bottleneck: the adapter's hidden width; last_sites: adapters after the last K mask
    # sites only (0: every site)
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "bottleneck": 16, "last_sites": 0}

    def __init__(self, graph, seed=0, backbone=None, **hp):
        super().__init__(graph, seed, backbone, **hp)
        last = int(self.hp["last_sites"])
        if int(self.hp["bottleneck"]) < 1:
            raise ValueError(f"adapter: bottleneck must be at least 1, got {self.hp['bottleneck']}")
        if not 0 <= last <= len(self.sites):
            raise ValueError(f"adapter: last_sites must lie in 0..{len(self.sites)} (0: every site), "
                             f"got {last}")
        self.chosen = self.sites[-last:] if last else list(self.sites)
        self._graphs: dict[int, Graph] = {}

    def graph_of(self, t: int) -> Graph:
        if t not in self._graphs:
            self._graphs[t] = adapter_graph(self.graph, self.chosen, int(self.hp["bottleneck"]), f"a{t + 1}")
        return self._graphs[t]

    def added_params(self, t: int) -> list[Param]:
        g = self.graph_of(t)
        return [p for p in g.params.values() if p.name not in self.graph.params]

    def train_backbone_first(self) -> bool:
        return not self.pretrained

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        super()._begin_task(task, gen)
        t = len(self.added) - 1
        for n, v in self.added[t].items():
            if ".up." in n:  # the adapter starts as the identity
                self.added[t][n] = torch.zeros_like(v)

    def task_metrics(self, t: int) -> dict:
        return {"adapter_bottleneck": int(self.hp["bottleneck"]), "adapter_sites": len(self.chosen)}
