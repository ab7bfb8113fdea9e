"""One interface for every parameter-isolation method.

A method owns a backbone (a model graph plus its weights) and, per task, a head and the
parts that select the task's parameters (a weight-level mask, or unit gates) of the
graph's mask sites (every Conv and Linear weight by default). ``learn``
adds a task; ``logits`` runs any learned task; ``export_*`` give what the bundle stores.
Learning a task never changes the outputs of an earlier one: after every optimizer step
the parameters earlier tasks own are written back, so this holds bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.runtime.graph import Graph, MaskSite
from edgecl.runtime.kinds import get_kind
from edgecl.runtime.kinds.selection import UnitGates, WeightBits

from ..data import Task
from ..torchnet import Params, features, frozen_prefix, init_backbone, init_head

MASK_BITS = WeightBits.name
MASK_UNITS = UnitGates.name


def free_fraction(owner: dict[str, torch.Tensor]) -> float:
    """The share of entries no task owns, over an owner table (node -> task index + 1, 0
    where free): the capacity PackNet-style methods have left."""
    total = sum(o.numel() for o in owner.values())
    return sum(int((o == 0).sum()) for o in owner.values()) / total


def task_generator(seed: int, index: int) -> torch.Generator:
    """A generator per (seed, task): resuming a run reproduces an uninterrupted one."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + index + 1)


class Method(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]
    uses_bias: ClassVar[bool] = True
    defaults: ClassVar[dict] = {"epochs": 30, "batch_size": 32, "lr": 1e-3}

    def __init__(self, graph: Graph, seed: int = 0, backbone: dict[str, np.ndarray] | None = None,
                 **hparams: float) -> None:
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameters {sorted(unknown)}; "
                             f"it takes {sorted(self.defaults)}")
        self.graph = graph
        self.sites: list[MaskSite] = graph.mask_sites()
        if not self.sites:
            raise ValueError(f"{self.name}: the model has no Conv or Linear weight to mask")
        self.input_shape = tuple(graph.input_shape)
        self.seed = int(seed)
        self.hp = {**self.defaults, **hparams}
        self.pretrained = backbone is not None
        self.params: dict[str, torch.Tensor] = (self._initial_backbone() if backbone is None
                                                else self._given_backbone(backbone))
        self.heads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tasks: list[dict] = []
        # Per task: accuracy before learning it (R[j-1][j]) and at initialization (b_j).
        self.before_acc: list[float] = []
        self.init_acc: list[float] = []

    # -- what each method provides ---------------------------------------------
    @abstractmethod
    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        """Create the new task's own parts (head, scores, embeddings) at initialization."""

    @abstractmethod
    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        """Learn the task whose parts ``_begin_task`` created (index ``len(self.tasks)``)."""

    @abstractmethod
    def task_params(self, t: int) -> Params:
        """The parameters task ``t`` runs with where they differ from ``self.params``
        (its masked weights); for the task being learned, its current ones."""

    def task_gates(self, t: int) -> dict[str, torch.Tensor] | None:
        return None

    def task_graph(self, t: int) -> tuple[str, Graph] | None:
        """A graph of task ``t``'s own, by name (parameters it adds: an adapter, a new
        column, experts; task kind ``modules``), or None: the main graph."""
        return None

    def task_depends(self, t: int) -> list[int]:
        """Earlier tasks whose files hold parts task ``t`` runs with (the bundle entry's
        ``depends``: modules an earlier task added are stored once, in its file)."""
        return []

    def task_backbone(self, t: int) -> tuple[str, dict[str, np.ndarray]] | None:
        """The backbone task ``t`` runs on when it is not the main one (a model the method
        spawned), by name, with its weights as the run ends; None: the main backbone."""
        return None

    @abstractmethod
    def export_task(self, t: int) -> dict[str, np.ndarray]:
        """The task file's tensors: ``mask.<node>`` bits or ``gate.<node>`` units, head."""

    def task_metrics(self, t: int) -> dict:
        """Method-specific figures of task ``t`` the bundle records in the task's ``metrics``
        (JSON values; ``edgecl eval`` shows them), e.g. importance drift."""
        return {}

    def encode_task(self, parts: dict[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
        """The task file's tensors: the method's arrays and head, through its task kind."""
        return get_kind(self.kind).encode({**parts, **self.export_head(t)}, self.graph)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_extra_state(self, state: dict[str, torch.Tensor], n_tasks: int) -> None:
        return None

    # -- shared machinery --------------------------------------------------------
    def _initial_backbone(self) -> dict[str, torch.Tensor]:
        return init_backbone(self.graph, torch.Generator().manual_seed(self.seed))

    def _given_backbone(self, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Pretrained (or imported) weights: every parameter of the graph, right shapes."""
        out = {}
        for p in self.graph.params.values():
            w = weights.get(p.name)
            if w is None or tuple(w.shape) != tuple(p.shape):
                got = "missing" if w is None else f"of shape {tuple(w.shape)}"
                raise ValueError(f"given backbone: {p.name} is {got}; the graph needs {tuple(p.shape)}")
            out[p.name] = torch.from_numpy(np.array(w, dtype=np.float32))
        return out

    @property
    def feature_dim(self) -> int:
        return self.graph.feature_dim

    def run_features(self, x: torch.Tensor, overrides: Params,
                     gates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Backbone features with ``overrides`` in place of some of ``self.params``."""
        return features(self.graph, {**self.params, **overrides}, x, gates)

    def _new_head(self, n_classes: int, gen: torch.Generator) -> None:
        self.heads.append(init_head(self.feature_dim, n_classes, gen))

    def _x(self, x: np.ndarray) -> torch.Tensor:
        dtype = np.int64 if self.graph.input.dtype == "int64" else np.float32
        return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)).reshape(len(x), *self.input_shape)

    @torch.no_grad()
    def logits(self, x: np.ndarray | torch.Tensor, t: int) -> torch.Tensor:
        xt = x if isinstance(x, torch.Tensor) else self._x(x)
        h = self.run_features(xt, self.task_params(t), self.task_gates(t))
        w, b = self.heads[t]
        return F.linear(h, w, b)

    def accuracy(self, x: np.ndarray, y: np.ndarray, t: int) -> float:
        return float((self.logits(x, t).argmax(1).numpy() == y).mean())

    def learn(self, task: Task) -> None:
        t = len(self.tasks)
        gen = task_generator(self.seed, t)
        self._begin_task(task, gen)
        self.before_acc.append(self.accuracy(task.x_test, task.y_test, t))
        self.init_acc.append(self._accuracy_at_init(task, t))
        self._train_task(task, gen)
        self.tasks.append({"name": task.name, "classes": list(task.classes)})

    def _accuracy_at_init(self, task: Task, t: int) -> float:
        if self.pretrained:
            return self.accuracy(task.x_test, task.y_test, t)  # the backbone is the given one
        saved = self.params
        self.params = self._initial_backbone()
        try:
            return self.accuracy(task.x_test, task.y_test, t)
        finally:
            self.params = saved

    def epochs(self, task: Task, gen: torch.Generator, n_epochs: int,
               step: Callable[[torch.Tensor, torch.Tensor, float], None],
               trainable: Collection[str] | None = None, *, graph: Graph | None = None,
               params: Mapping[str, torch.Tensor] | None = None) -> None:
        """Shuffled mini-batches; ``step(x, y, progress)`` with progress in [0, 1] per epoch.

        ``trainable``: the only parameters ``step`` changes or overrides (None: any) of
        ``graph`` (default: the backbone's) with the values ``params`` (default: the
        backbone's). The nodes none of them reaches then run once over the training set,
        not once per epoch: ``x`` is a :class:`~edgecl.models.torchnet.Prefix` batch, which
        ``run_features`` takes like an input batch."""
        x, y = self._x(task.x_train), torch.from_numpy(task.y_train)
        pre = None if trainable is None else frozen_prefix(
            self.graph if graph is None else graph, self.params if params is None else params, x, trainable)
        if pre is not None:
            x = pre
        bs = int(self.hp["batch_size"])
        n_batches = max(1, -(-len(x) // bs))
        for _ in range(int(n_epochs)):
            order = torch.randperm(len(x), generator=gen)
            for i in range(n_batches):
                idx = order[i * bs : (i + 1) * bs]
                step(x[idx], y[idx], i / max(1, n_batches - 1))

    def export_backbone(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().astype(np.float32) for k, v in self.params.items()}

    def export_head(self, t: int) -> dict[str, np.ndarray]:
        w, b = self.heads[t]
        return {"head.weight": w.detach().numpy().copy(), "head.bias": b.detach().numpy().copy()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"backbone.{k}": v.detach().contiguous() for k, v in self.params.items()}
        for t, (w, b) in enumerate(self.heads):
            state[f"head.{t}.weight"], state[f"head.{t}.bias"] = w.detach(), b.detach()
        state["pretrained"] = torch.tensor(int(self.pretrained))
        state.update(self._extra_state())
        return state

    def load_state(self, state: dict[str, torch.Tensor], tasks: list[dict],
                   before_acc: list[float], init_acc: list[float]) -> None:
        self.params = {k[len("backbone."):]: v.clone() for k, v in state.items()
                       if k.startswith("backbone.")}
        self.heads = [(state[f"head.{t}.weight"].clone(), state[f"head.{t}.bias"].clone())
                      for t in range(len(tasks))]
        self.tasks = [dict(t) for t in tasks]
        self.before_acc, self.init_acc = list(before_acc), list(init_acc)
        if "pretrained" in state:
            self.pretrained = bool(int(state["pretrained"]))
        self._load_extra_state(state, len(tasks))
