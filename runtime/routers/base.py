"""Task-ID routing: which task does an input belong to, and how sure is the router?

Every router turns a batch into per-task scores (higher = more likely; the scores of
the Gaussian router are log-likelihoods). The decision is shared:

* confidence = softmax(scores / temperature)[chosen task] — the temperature is fitted
  on labelled data so that the confidence is calibrated (minimum negative log-likelihood);
* an input is *unknown* when the confidence is below ``threshold`` or its best score is
  below the router's novelty threshold (the 0.5th percentile of the best scores of each
  task's own data, kept per task so that adding a task needs no old data);
* an unknown input goes to the configured generalist task if there is one, else is
  reported as unknown (task -1).

Routers learn incrementally: ``add_task`` sees only the new task's inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import EdgeclError

UNKNOWN = -1
NOVELTY_QUANTILE = 0.005


class RouterError(EdgeclError):
    """A router that is missing, stale (does not cover the bundle's tasks) or corrupt."""


@dataclass
class Decision:
    """Routing of a batch: ``task[i]`` is a task index or ``UNKNOWN``."""

    task: np.ndarray
    confidence: np.ndarray
    best: np.ndarray  # the most likely task even where the decision is UNKNOWN
    scores: np.ndarray


class Router(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self.tasks: list[str] = []
        self.temperature = 1.0
        self.novelty: list[float] = []  # per task: low quantile of its best scores

    # -- what each router provides -------------------------------------------------
    @abstractmethod
    def _add(self, runtime, task: str, x: np.ndarray, y: np.ndarray | None) -> None:
        """Update the statistics with the new task's inputs (and local labels, if known)."""

    @abstractmethod
    def scores(self, runtime, x: np.ndarray) -> np.ndarray:
        """[batch, tasks] scores, higher = more likely, for ``self.tasks``."""

    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None: ...

    # -- shared ----------------------------------------------------------------------
    def add_task(self, runtime, task: str, x: np.ndarray, y: np.ndarray | None = None) -> None:
        if task in self.tasks:
            raise RouterError(f"router {self.name}: task {task!r} is already routed")
        self._add(runtime, task, x, y)
        self.tasks.append(task)
        own = self.scores(runtime, x)[:, -1]
        self.novelty.append(float(np.quantile(own, NOVELTY_QUANTILE)))

    @property
    def novelty_floor(self) -> float:
        """Best scores below this belong to no task (the lowest of the per-task floors)."""
        return min(self.novelty)

    def calibrate(self, runtime, data: list[tuple[int, np.ndarray]]) -> None:
        """Fit the temperature on (task index, inputs) pairs: minimum NLL over a grid."""
        s = np.concatenate([self.scores(runtime, x) for _, x in data])
        y = np.concatenate([np.full(len(x), t) for t, x in data])
        best, best_nll = 1.0, np.inf
        for temp in np.geomspace(1e-3, 1e3, 121):
            z = s / temp
            z = z - z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            nll = -logp[np.arange(len(y)), y].mean()
            if nll < best_nll:
                best, best_nll = float(temp), nll
        self.temperature = best

    def decide(self, runtime, x: np.ndarray, threshold: float = 0.5,
               fallback: int | None = None) -> Decision:
        if not self.tasks:
            raise RouterError(f"router {self.name} has no task")
        s = self.scores(runtime, x)
        best = s.argmax(axis=1)
        top = s.max(axis=1, keepdims=True)
        conf = 1.0 / np.exp((s - top) / self.temperature).sum(axis=1)
        unknown = (conf < threshold) | (top[:, 0] < self.novelty_floor)
        task = np.where(unknown, UNKNOWN if fallback is None else fallback, best)
        return Decision(task, conf, best, s)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        meta = {"router": self.name, "tasks": "\n".join(self.tasks),
                "temperature": repr(self.temperature), **self._meta()}
        arrays = dict(self._arrays(), novelty=np.asarray(self.novelty, dtype=np.float64))
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> Router:
        r = cls()
        r.tasks = [t for t in meta.get("tasks", "").split("\n") if t]
        r.temperature = float(meta["temperature"])
        r.novelty = [float(v) for v in arrays["novelty"]]
        r._load_arrays(arrays)
        r._load_meta(meta)
        return r

    def _meta(self) -> dict[str, str]:
        """Extra string metadata a router stores (e.g. what it looks at)."""
        return {}

    def _load_meta(self, meta: dict[str, str]) -> None:
        return None
