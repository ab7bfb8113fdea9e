"""Progressive Neural Networks (Rusu et al. 2016, arXiv:1606.04671): a column per task.

Task 1 trains column 1, which is the given architecture (the main graph; its weights are
the bundle's backbone). Task ``k > 1`` freezes every earlier column and adds column
``k``: a copy of the architecture (its unit counts scaled by ``width``) whose every
Conv (group 1) or Linear layer ``i`` after the first also receives lateral connections
from the earlier columns, as in the paper's eq. 1,

    h_i^(k) = f(W_i^(k) h_{i-1}^(k) + sum_{j<k} U_i^(k:j) h_{i-1}^(j)),

``U`` a bias-free layer of the same op (a Linear, or a Conv with the layer's kernel,
strides and pads). Task ``k``'s graph (kind ``modules``) holds columns ``1..k``; the
executor runs only the nodes its features depend on. Column ``k``'s parameters are
named ``c<k>.<name>``, its laterals ``c<k>.lat<j>.<node>.weight``.

Frozen columns are never given to an optimizer, so their bytes never change and an old
task's outputs stay byte-identical (BWT exactly 0). The ``modules`` kind stores every
parameter of the task's graph that the backbone lacks, so task ``k``'s file holds
column ``k`` with its laterals and the parts of columns ``2..k-1`` those laterals read
(duplicated from earlier tasks' files; see ``docs/method-pnn.md`` and :func:`growth`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.runtime.graph import Graph, GraphError, Node, Param
from edgecl.runtime.kinds import Modules
from edgecl.runtime.ops import OpError, get_op

from ..data import Task
from ..torchnet import Params, features, init_backbone, init_head
from .base import Method

MODULES = Modules.name


def _scaled(units: int, width: float) -> int:
    return max(1, int(round(units * width)))


class Columns:
    """The columns of a PNN over ``graph``: built once each, concatenated per task."""

    def __init__(self, graph: Graph, width: float, laterals: bool) -> None:
        self.main = graph
        self.width = float(width)
        self.laterals = bool(laterals)
        self.nodes: dict[int, list[Node]] = {1: list(graph.backbone_nodes)}
        self.params: dict[int, list[Param]] = {1: list(graph.params.values())}
        self.shapes: dict[str, tuple[int, ...]] = dict(graph.shapes())
        self.sites = {s.node for s in graph.mask_sites()}
        # values computed from the input alone (a Flatten of it, say): every column reads
        # column 1's, so they are neither copied nor the source of a (redundant) lateral
        self.shared = {graph.input.name}
        for n in graph.backbone_nodes:
            if all(i in self.shared for i in n.inputs):
                self.shared |= set(n.outputs)

    def value(self, name: str, k: int) -> str:
        """Column ``k``'s copy of value, node or parameter ``name`` (column 1: the main graph's)."""
        return name if k == 1 or name in self.shared else f"c{k}.{name}"

    def _infer(self, node: Node) -> None:
        try:
            outs = get_op(node.op).infer([self.shapes[i] for i in node.inputs], node.attrs)
        except OpError as e:
            raise GraphError(f"pnn column: node {node.name!r} ({node.op}) with width {self.width}: "
                             f"{e}") from None
        self.shapes.update(zip(node.outputs, (tuple(int(d) for d in s) for s in outs), strict=True))

    def build(self, k: int) -> None:
        """Column ``k`` (and every earlier one it links to)."""
        if k in self.nodes:
            return
        self.build(k - 1)
        main, col = self.main, self.value
        nodes: list[Node] = []
        params: list[Param] = []

        def add(node: Node) -> None:
            self._infer(node)
            nodes.append(node)

        def param(name: str, shape: tuple[int, ...], role: str) -> str:
            params.append(Param(name, tuple(int(s) for s in shape), role))
            self.shapes[name] = params[-1].shape
            return name

        for n in main.backbone_nodes:
            if set(n.outputs) <= self.shared:
                continue
            ins = [col(i, k) for i in n.inputs]
            attrs = dict(n.attrs)
            own = [i for i in n.inputs if i in main.params]
            if n.name in self.sites:
                w = main.params[n.inputs[1]]
                xin = self.shapes[ins[0]]
                if n.op == "Linear":
                    shape: tuple[int, ...] = (_scaled(w.shape[0], self.width), xin[-1])
                elif w.shape[1] == 1 and attrs["group"] > 1:  # depthwise: follows its input's channels
                    mult = w.shape[0] // attrs["group"]
                    attrs["group"] = xin[1]
                    shape = (xin[1] * mult, 1, *w.shape[2:])
                elif attrs["group"] == 1:
                    shape = (_scaled(w.shape[0], self.width), xin[1], *w.shape[2:])
                else:
                    raise GraphError(f"pnn: node {n.name!r} is a grouped Conv (group {attrs['group']}); "
                                     "a column can scale only group-1 and depthwise convolutions")
                param(ins[1], shape, w.role)
                if len(n.inputs) > 2:
                    param(ins[2], (shape[0],), main.params[n.inputs[2]].role)
            elif own and self.width != 1.0:
                raise GraphError(f"pnn: node {n.name!r} ({n.op}) has parameters {own}; with width "
                                 f"{self.width} a column may hold only Conv and Linear parameters "
                                 "(use width=1)")
            else:
                for p in own:
                    param(col(p, k), main.params[p].shape, main.params[p].role)
            links = self._lateral_sources(n, k) if n.name in self.sites else []
            if not links:
                add(Node(col(n.name, k), n.op, tuple(ins), tuple(col(o, k) for o in n.outputs), attrs))
                continue
            out = col(n.outputs[0], k)
            add(Node(col(n.name, k), n.op, tuple(ins), (f"{out}.own",), attrs))
            acc = f"{out}.own"
            for i, (j, src) in enumerate(links):
                lname = f"c{k}.lat{j}.{n.name}"
                units = self.shapes[f"{out}.own"][1 if n.op == "Conv" else -1]
                fan = self.shapes[src][1 if n.op == "Conv" else -1]
                kernel = main.params[n.inputs[1]].shape[2:]  # a Conv lateral keeps the layer's kernel
                wshape = (units, fan, *kernel)
                lattrs = dict(n.attrs, group=1) if n.op == "Conv" else dict(n.attrs)
                add(Node(lname, n.op, (src, param(f"{lname}.weight", wshape, "weight")), (lname,), lattrs))
                total = out if i == len(links) - 1 else f"{out}.sum{j}"
                add(Node(f"{lname}.add", "Add", (acc, lname), (total,)))
                acc = total
        self.nodes[k], self.params[k] = nodes, params

    def _lateral_sources(self, n: Node, k: int) -> list[tuple[int, str]]:
        """(column j, the value feeding node ``n`` in column j) for each lateral into column k."""
        src = n.inputs[0]
        if k == 1 or not self.laterals or src in self.shared:
            return []
        if n.op == "Conv" and n.attrs["group"] != 1:  # depthwise: per-channel, no cross-column mixing
            return []
        return [(j, self.value(src, j)) for j in range(1, k)]

    def graph(self, n_columns: int) -> Graph:
        """The graph of the task that owns column ``n_columns``: columns 1..n_columns."""
        self.build(n_columns)
        params = [p for k in range(1, n_columns + 1) for p in self.params[k]]
        nodes = [nd for k in range(1, n_columns + 1) for nd in self.nodes[k]]
        feats = self.value(self.main.features, n_columns)
        full = Graph(self.main.inputs, params, nodes, feats, name=self.main.name)
        # only what the features need: an earlier column's layers past its last lateral
        # source are neither run nor stored
        used = {i for n in full.backbone_nodes for i in n.inputs}
        return Graph(self.main.inputs, [p for p in params if p.name in used], full.backbone_nodes, feats,
                     name=self.main.name)

    def column_params(self, k: int) -> list[Param]:
        self.build(k)
        return self.params[k]


class GrowingMethod(Method):
    """A method whose task ``t`` adds parameters of its own (``self.added[t]``) on a graph of
    its own (``graph_of(t)``, kind ``modules``) and runs with everything earlier tasks
    added. What earlier tasks added is frozen: it is never handed to an optimizer, so its
    bytes never change (zero forgetting is exact). Task 0 may also train the backbone
    (``train_backbone_first``); it is frozen from task 1 on."""

    kind = MODULES
    graph_prefix: ClassVar[str] = "own"

    def __init__(self, graph: Graph, seed: int = 0, backbone: dict[str, np.ndarray] | None = None,
                 **hp: float) -> None:
        super().__init__(graph, seed, backbone, **hp)
        self.added: list[dict[str, torch.Tensor]] = []

    # -- what a subclass provides ------------------------------------------------------
    def graph_of(self, t: int) -> Graph:
        raise NotImplementedError

    def added_params(self, t: int) -> list[Param]:
        """The parameters task ``t`` adds (in ``graph_of(t)``)."""
        raise NotImplementedError

    def train_backbone_first(self) -> bool:
        return True

    def _after_task(self, task: Task, t: int) -> None:
        return None

    # -- the interface -------------------------------------------------------------------
    def task_graph(self, t: int) -> tuple[str, Graph] | None:
        g = self.graph_of(t)
        return None if g is self.graph else (f"{self.graph_prefix}-{t + 1}", g)

    def task_params(self, t: int) -> Params:
        return {n: v for a in self.added[: t + 1] for n, v in a.items()}

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.heads)
        g = self.graph_of(t)
        mine = self.added_params(t)
        init = init_backbone(g, gen) if mine else {}
        self.added.append({p.name: init[p.name] for p in mine})
        self.heads.append(init_head(g.feature_dim, task.n_classes, gen))

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        graph = self.graph_of(t)
        first = t == 0 and self.train_backbone_first()
        train = {n: v.clone().requires_grad_(True)
                 for n, v in {**(self.params if first else {}), **self.added[t]}.items()}
        # earlier tasks' parts (and the backbone after task 0) are constants here
        frozen = {**self.params, **self.task_params(t - 1)} if t else dict(self.params)
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        opt = torch.optim.Adam([*train.values(), hw, hb], lr=self.hp["lr"])

        values = {**frozen, **train}

        def step(x: torch.Tensor, y: torch.Tensor, _progress: float) -> None:
            loss = F.cross_entropy(F.linear(features(graph, values, x), hw, hb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        # what no trained part reaches (earlier columns, the frozen backbone before an
        # adapter) runs once per training input, not once per step
        self.epochs(task, gen, self.hp["epochs"], step, trainable=set(train), graph=graph, params=values)
        done = {n: v.detach() for n, v in train.items()}
        if first:
            self.params = {n: done[n] for n in self.params}
        self.added[t] = {n: done[n] for n in self.added[t]}
        self.heads[t] = (hw.detach(), hb.detach())
        self._after_task(task, t)

    @torch.no_grad()
    def logits(self, x: np.ndarray | torch.Tensor, t: int) -> torch.Tensor:
        xt = x if isinstance(x, torch.Tensor) else self._x(x)
        h = features(self.graph_of(t), {**self.params, **self.task_params(t)}, xt)
        w, b = self.heads[t]
        return F.linear(h, w, b)

    def task_depends(self, t: int) -> list[int]:
        """The earlier tasks that added parts of task ``t``'s graph: their files hold them."""
        need = set(self.graph_of(t).params) - set(self.params)
        return [j for j in range(t) if need & set(self.added[j])]

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        """The parameters task ``t`` added (``param.<name>``); what earlier tasks added is in
        their files (``task_depends``), stored once."""
        parts = {f"param.{n}": v.numpy().astype(np.float32) for n, v in self.added[t].items()}
        return self.encode_task(parts, t)

    def stored_params(self, t: int) -> int:
        return int(sum(v.numel() for v in self.added[t].values()))

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {f"{self.graph_prefix}.{t}.{n}": v.contiguous() for t, a in enumerate(self.added)
                for n, v in a.items()}

    def _load_extra_state(self, state: dict[str, torch.Tensor], n_tasks: int) -> None:
        key = self.graph_prefix
        self.added = [{p.name: state[f"{key}.{t}.{p.name}"].clone() for p in self.added_params(t)}
                      for t in range(n_tasks)]


class PNN(GrowingMethod):
    name = "pnn"
    graph_prefix = "pnn-columns"
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-3,
                "width": 0.25,   # units of column k > 1 relative to column 1
                "laterals": 1}   # 1: lateral links from every earlier column (the paper); 0: none

    def __init__(self, graph: Graph, seed: int = 0, backbone: dict[str, np.ndarray] | None = None,
                 **hp: float) -> None:
        super().__init__(graph, seed, backbone, **hp)
        width = float(self.hp["width"])
        if not 0.0 < width <= 4.0 or not math.isfinite(width):
            raise ValueError(f"{self.name}: width must lie in (0, 4], got {self.hp['width']}")
        if int(self.hp["laterals"]) not in (0, 1):
            raise ValueError(f"{self.name}: laterals must be 0 or 1, got {self.hp['laterals']}")
        self.columns = Columns(graph, width, bool(int(self.hp["laterals"])))

    def graph_of(self, t: int) -> Graph:
        return self.graph if t == 0 else self.columns.graph(t + 1)

    def added_params(self, t: int) -> list[Param]:
        return [] if t == 0 else self.columns.column_params(t + 1)  # column 1 is the backbone

    def task_metrics(self, t: int) -> dict:
        g = self.graph_of(t)
        column = sum(math.prod(p.shape) for p in self.added_params(t)) if t else g.n_params
        return {"columns": t + 1, "column_params": int(column), "stored_params": self.stored_params(t),
                "task_graph_params": int(g.n_params)}


def growth(graph: Graph, n_tasks: int, width: float = 0.25, laterals: bool = True,
           head_classes: int = 2) -> list[dict]:
    """Per task k = 1..n_tasks: parameters column k adds (with its laterals and head), what
    task k's ``modules`` file stores (its own column: earlier ones are in their tasks'
    files), and what its graph holds (all it runs with), as float32 bytes."""
    cols = Columns(graph, width, laterals)
    out = []
    for k in range(1, n_tasks + 1):
        g = graph if k == 1 else cols.graph(k)
        head = (g.feature_dim + 1) * head_classes
        added = sum(math.prod(p.shape) for p in cols.column_params(k)) if k > 1 else 0
        stored = added
        out.append({"task": k, "added_params": int(added), "stored_params": int(stored), "head_params": head,
                    "graph_params": int(g.n_params), "file_bytes_est": 4 * (stored + head)})
    return out
