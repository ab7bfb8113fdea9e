"""The device runtime: open a bundle, activate a task, run inference.

    from edgecl.runtime import Runtime
    rt = Runtime("bundle/")              # verifies hashes, maps the backbone
    logits = rt.logits(x, task="digits-0-1")
    labels = rt.predict(x, task=0)       # the task's own class labels

Activating a task materializes ``W ⊙ M_task`` for every layer (the backbone stays
mapped and read-only); activated tasks are cached up to ``cache_bytes``, least
recently used first out.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np

from . import executor
from .bundle import Bundle
from .errors import BundleError, InputError
from .graph import Graph
from .kinds import TaskKind, TaskView, UnknownKindError, check_head, get_kind


class ActiveTask:
    """A task's graph, effective parameters (name -> array) and head, ready to run. Only
    the arrays its kind changed are copies; ``nbytes`` counts those and the head."""

    def __init__(self, info: dict, graph: Graph, params: dict[str, np.ndarray],
                 head: tuple[np.ndarray, np.ndarray]) -> None:
        self.info = info
        self.graph = graph
        self.params = params
        self.head = head
        self.nbytes = sum(a.nbytes for a in params.values() if a.flags.owndata)
        self.nbytes += head[0].nbytes + head[1].nbytes


def task_view(bundle: Bundle, key: str | int) -> tuple[TaskKind, TaskView]:
    """A stored task's kind and view (entry, tensors, graph, backbone), checked: the kind
    is known, its tensors are valid, the head fits the graph."""
    info = bundle.task(key)
    try:
        kind = get_kind(info["kind"])
    except UnknownKindError as e:
        raise BundleError(bundle.where("manifest.json"), f"task {info['name']!r}: {e.args[0]}") from None
    graph = bundle.task_graph(info["name"])
    backbone = bundle.backbone_tensors(info.get("backbone"))
    for name in graph.params:
        if name not in backbone and kind.same_graph:
            where = bundle.where(bundle.backbone_file(info.get("backbone")))
            raise BundleError(where, f"backbone lacks {name}")
    view = TaskView(info, bundle.task_tensors(info["name"]), graph, backbone, str(bundle.where(info["file"])))
    kind.validate(view)
    check_head(view)
    return kind, view


def activate(bundle: Bundle, key: str | int, _seen: tuple[str, ...] = (),
             _done: dict | None = None) -> ActiveTask:
    """Materialize one task's parameters from the mapped backbone and its task file,
    through its kind. Parameters the kind does not touch stay views into the mapped
    backbone (no copy)."""
    kind, view = task_view(bundle, key)
    name = view.entry["name"]
    if name in _seen:
        raise BundleError(bundle.where("manifest.json"), f"task {name!r} depends on itself "
                                                         f"(through {' -> '.join(_seen)})")
    done = {} if _done is None else _done  # each task once per activation, however many depend on it

    def resolve(dep: str) -> dict[str, np.ndarray]:
        if dep not in done:
            done[dep] = activate(bundle, dep, _seen + (name,), done).params
        return done[dep]

    params = kind.materialize(view, resolve)
    base = {n: view.backbone[n] for n in view.graph.params if n in view.backbone}
    return ActiveTask(view.entry, view.graph, {**base, **params},
                      (view.tensors["head.weight"], view.tensors["head.bias"]))


class Runtime:
    """Inference over a verified bundle with the numpy reference executor."""

    def __init__(self, bundle: str | Path | Bundle, *, version: int | None = None,
                 cache_bytes: int = 64 << 20) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, version=version)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, ActiveTask] = OrderedDict()
        self._ones: dict[int, np.ndarray] = {}  # check_input's ones, by batch size in values

    @property
    def tasks(self) -> list[str]:
        return self.bundle.task_names

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.bundle.model["input_shape"])

    def activate(self, task: str | int) -> ActiveTask:
        name = self.bundle.task(task)["name"]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        active = activate(self.bundle, name)
        self._cache[name] = active
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return active

    @cached_property
    def _shape(self) -> tuple[int, ...]:
        return self.input_shape

    @cached_property
    def _float_input(self) -> bool:
        return self.bundle.graph.input.dtype == "float32"

    def forget(self, task: str | int) -> None:
        """Drop a task's materialized weights from the cache."""
        self._cache.pop(self.bundle.task(task)["name"], None)

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """A float32 batch of the model's input shape, or a clear ``InputError``."""
        if type(x) is np.ndarray and x.dtype == np.float32 and x.shape[1:] == self._shape \
                and self._float_input and x.flags.c_contiguous:
            # the common case: one dot product with ones (the sum, by BLAS) finds any NaN or
            # inf: 0.5 us for 640 values, a third of np.add.reduce plus np.isfinite; a finite
            # batch whose sum overflows takes the row-by-row check below, and passes
            ones = self._ones.get(x.size)
            if ones is None:
                if len(self._ones) >= 8:  # a few batch sizes in use, not every one ever seen
                    self._ones.clear()
                ones = self._ones[x.size] = np.ones(x.size, np.float32)
            if math.isfinite(x.reshape(-1).dot(ones)):
                return x
        try:
            x = np.asarray(x)
        except Exception as e:  # ragged lists and the like
            raise InputError(f"input is not an array: {e}") from e
        if x.dtype.kind not in "fiub":
            raise InputError(f"input has dtype {x.dtype}; expected numbers (float32)")
        shape = self.input_shape
        if x.shape == shape:
            x = x[None]
        if x.shape[1:] != shape:
            raise InputError(
                f"input has shape {x.shape}; the model takes (batch, {', '.join(map(str, shape))})"
            )
        if self.bundle.graph.input.dtype == "int64":  # token ids
            if x.dtype.kind not in "iu":
                raise InputError(f"input has dtype {x.dtype}; the model takes int64 token ids")
            return x.astype(np.int64, copy=False)
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)[:10].tolist()
            raise InputError(f"input holds NaN or infinite values in rows {rows}")
        return x

    def logits(self, x: np.ndarray, task: str | int) -> np.ndarray:
        active = self.activate(task)
        return executor.forward(active.graph, active.params, active.head, self.check_input(x))

    def predict(self, x: np.ndarray, task: str | int) -> np.ndarray:
        """Predicted labels in the task's own label space (its ``classes``)."""
        active = self.activate(task)
        idx = self.logits(x, task).argmax(axis=1)
        return np.asarray(active.info["classes"])[idx]


def owned_union(bundle: Bundle, backbone: str | None = None) -> dict[str, np.ndarray | None]:
    """Entries of ``backbone`` (default: the main one) owned by any task that runs on it
    (through each task's kind): by parameter, a flat bool array, or None when a task owns
    the whole tensor. A learner may change only entries outside it."""
    backbone = backbone or bundle.main
    out: dict[str, np.ndarray | None] = {}
    for name in bundle.task_names:
        if bundle.task(name).get("backbone", bundle.main) != backbone:
            continue
        kind, view = task_view(bundle, name)
        for p, own in kind.owned(view).items():
            if p in out and out[p] is None:
                continue
            if own is None:
                out[p] = None
            else:
                out[p] = own.copy() if p not in out else (out[p] | own)
    return out
