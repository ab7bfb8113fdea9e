"""One interface for every parameter-isolation method.

A method owns a backbone (a layer table plus its weights) and, per task, a head and the
parts that select the task's parameters (a weight-level mask, or unit gates). ``learn``
adds a task; ``logits`` runs any learned task; ``export_*`` give what the bundle stores.
Learning a task never changes the outputs of an earlier one: after every optimizer step
the parameters earlier tasks own are written back, so this holds bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..architectures import feature_dim, weighted
from ..data import Task
from ..torchnet import Params, features, init_backbone, init_head

MASK_BITS = "weight_bits"
MASK_UNITS = "unit_gates"


def task_generator(seed: int, index: int) -> torch.Generator:
    """A generator per (seed, task): resuming a run reproduces an uninterrupted one."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + index + 1)


class Method(ABC):
    name: ClassVar[str]
    mask_kind: ClassVar[str]
    uses_bias: ClassVar[bool] = True
    defaults: ClassVar[dict] = {"epochs": 30, "batch_size": 32, "lr": 1e-3}

    def __init__(self, layers: list[dict], input_shape: tuple[int, ...], seed: int = 0,
                 **hparams: float) -> None:
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameters {sorted(unknown)}")
        self.layers = layers
        self.input_shape = tuple(input_shape)
        self.seed = int(seed)
        self.hp = {**self.defaults, **hparams}
        self.params: dict[str, torch.Tensor] = self._initial_backbone()
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
        """Weights task ``t`` runs with (for the task being learned: its current ones)."""

    def task_gates(self, t: int) -> dict[str, torch.Tensor] | None:
        return None

    @abstractmethod
    def export_task(self, t: int) -> dict[str, np.ndarray]:
        """The task file's tensors: ``mask.<layer>`` bits or ``gate.<layer>`` units, head."""

    def _extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_extra_state(self, state: dict[str, torch.Tensor], n_tasks: int) -> None:
        return None

    # -- shared machinery --------------------------------------------------------
    def _initial_backbone(self) -> dict[str, torch.Tensor]:
        return init_backbone(self.layers, torch.Generator().manual_seed(self.seed))

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.layers)

    def _new_head(self, n_classes: int, gen: torch.Generator) -> None:
        self.heads.append(init_head(self.feature_dim, n_classes, gen))

    def _x(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(
            len(x), *self.input_shape)

    @torch.no_grad()
    def logits(self, x: np.ndarray | torch.Tensor, t: int) -> torch.Tensor:
        xt = x if isinstance(x, torch.Tensor) else self._x(x)
        h = features(self.layers, self.task_params(t), xt, self.task_gates(t))
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
        saved = self.params
        self.params = self._initial_backbone()
        try:
            return self.accuracy(task.x_test, task.y_test, t)
        finally:
            self.params = saved

    def epochs(self, task: Task, gen: torch.Generator, n_epochs: int,
               step: Callable[[torch.Tensor, torch.Tensor, float], None]) -> None:
        """Shuffled mini-batches; ``step(x, y, progress)`` with progress in [0, 1] per epoch."""
        x, y = self._x(task.x_train), torch.from_numpy(task.y_train)
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
        self._load_extra_state(state, len(tasks))

    def weighted_layers(self) -> list[dict]:
        return weighted(self.layers)
