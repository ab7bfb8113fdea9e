"""What every task kind implements, and the view of a task a kind works on.

A *task kind* says what a task owns and how its file turns into the parameters it runs
with: weight bits, unit gates, a soft mask, hashed allocations, low-rank deltas, added
modules, or a merge of other tasks. Host and device use the same classes: methods encode
their task files through them, the runtime validates and materializes through them, and
the learner asks them which backbone entries are owned (zero forgetting) and what a task
costs to store. No other code switches on a kind's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import BundleError
from ..graph import Graph, MaskSite

# params a task runs with, by graph parameter name
Params = dict[str, np.ndarray]
# name of a task this one depends on -> that task's effective parameters
Resolve = Callable[[str], Params]


@dataclass
class TaskView:
    """One stored task as a kind sees it: its manifest entry, its file's tensors, the graph
    and backbone it runs on, and ``where`` (its file, named in every error)."""

    entry: dict
    tensors: Mapping[str, np.ndarray]
    graph: Graph
    backbone: Mapping[str, np.ndarray]
    where: str

    def fail(self, tensor: str, reason: str) -> BundleError:
        return BundleError(self.where, f"tensor {tensor!r}: {reason}")

    def get(self, key: str) -> np.ndarray:
        t = self.tensors.get(key)
        if t is None:
            raise BundleError(self.where, f"task file lacks tensor {key!r} "
                                          f"(kind {self.entry.get('kind')!r})")
        return t

    def expect(self, key: str, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``key``, checked for exact dtype and shape."""
        t = self.get(key)
        if t.dtype != np.dtype(dtype) or tuple(t.shape) != tuple(shape):
            raise self.fail(key, f"{t.dtype} of shape {tuple(t.shape)}; expected {np.dtype(dtype)} "
                                 f"of shape {tuple(shape)}")
        return t


class TaskKind(ABC):
    """One way a task can own parameters. Subclasses are registered in ``KINDS``."""

    name: ClassVar[str]
    # Tensor name prefixes this kind stores besides the head (``mask.``, ``gate.``, ...).
    prefixes: ClassVar[tuple[str, ...]] = ()
    # On-device learning methods that produce a task of this kind (the learner's hook):
    # ``edgecl learn --method M`` is offered for a bundle only where M is listed here.
    # ``head`` (a new head on an existing task's parameters) works for every kind.
    learners: ClassVar[tuple[str, ...]] = ("head",)
    # Whether the task runs on the backbone's own graph (compiled artifacts apply), or on
    # a graph of its own (added modules): then only backends that run that graph do.
    same_graph: ClassVar[bool] = True

    # -- host: method arrays <-> file tensors --------------------------------------
    def encode(self, parts: Mapping[str, np.ndarray], graph: Graph) -> dict[str, np.ndarray]:
        """File tensors from a method's arrays (the default: stored as given)."""
        return {k: np.ascontiguousarray(v) for k, v in parts.items()}

    def decode(self, view: TaskView) -> dict[str, np.ndarray]:
        """A method's arrays from the file's tensors (the default: as stored)."""
        return dict(view.tensors)

    # -- device: validate, materialize, own ----------------------------------------
    @abstractmethod
    def validate(self, view: TaskView) -> None:
        """Every tensor the kind needs present with the right dtype, shape, size and range;
        else a ``BundleError`` naming the file and the tensor. The head is checked apart."""

    @abstractmethod
    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        """The parameters that differ from the backbone (masked copies, added tensors)."""

    @abstractmethod
    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        """Backbone entries this task's outputs depend on, by parameter: a flat bool array
        (C order) of the entries it owns, or None for the whole tensor. A later task may
        change only entries no task owns; parameters no mask covers (biases, norms) are
        owned by every task and checked whole by the learner regardless."""

    def depends(self, view: TaskView) -> list[str]:
        return list(view.entry.get("depends", []))

    # -- accounting -----------------------------------------------------------------
    def storage(self, tensors: Mapping[str, np.ndarray], graph: Graph, file_bytes: int) -> dict:
        """Bytes a task adds, and bits per backbone weight (its own parts, and with head)."""
        own = sum(v.nbytes for k, v in tensors.items() if k.startswith(self.prefixes))
        head = sum(v.nbytes for k, v in tensors.items() if k.startswith("head."))
        n = max(graph.n_weights, 1)
        return {"mask_bytes": own, "head_bytes": head, "file_bytes": file_bytes,
                "mask_bits_per_weight": 8.0 * own / n, "bits_per_weight": 8.0 * file_bytes / n}

    # -- shared helpers ------------------------------------------------------------------
    @staticmethod
    def sites(view: TaskView) -> list[MaskSite]:
        return view.graph.mask_sites()


def check_head(view: TaskView) -> tuple[np.ndarray, np.ndarray]:
    """The task's linear head on the graph's features: float32 ``(classes, features)`` and
    ``(classes,)``, finite, as many classes as the entry lists."""
    w, b = view.get("head.weight"), view.get("head.bias")
    feat = view.graph.feature_dim
    n = view.entry.get("n_classes")
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[1] != feat or (n is not None and w.shape[0] != n):
        raise view.fail("head.weight", f"{w.dtype} of shape {tuple(w.shape)}; expected float32 of "
                                       f"shape ({n if n is not None else 'classes'}, {feat})")
    if b.dtype != np.float32 or b.shape != (w.shape[0],):
        raise view.fail("head.bias", f"{b.dtype} of shape {tuple(b.shape)}; expected float32 of "
                                     f"shape ({w.shape[0]},)")
    for key, t in (("head.weight", w), ("head.bias", b)):
        if not np.isfinite(t).all():
            raise view.fail(key, "holds NaN or infinite values")
    return w, b


def check_extra(view: TaskView, kind: TaskKind, allowed: set[str]) -> None:
    """No tensor the kind does not define (a stray one means a wrong kind or a bad file)."""
    extra = sorted(set(view.tensors) - allowed - {"head.weight", "head.bias"})
    if extra:
        raise view.fail(extra[0], f"is not part of a {kind.name!r} task")
