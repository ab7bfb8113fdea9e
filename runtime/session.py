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

from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np

from . import executor
from .bundle import Bundle
from .errors import BundleError, InputError
from .masks import materialize_bits, materialize_units

MASK_BITS = "weight_bits"
MASK_UNITS = "unit_gates"


class ActiveTask:
    """A task's effective parameters (name -> array) and head, ready to run. Only the
    arrays a mask changed are copies; ``nbytes`` counts those and the head."""

    def __init__(self, info: dict, params: dict[str, np.ndarray],
                 head: tuple[np.ndarray, np.ndarray]) -> None:
        self.info = info
        self.params = params
        self.head = head
        self.nbytes = sum(a.nbytes for a in params.values() if a.flags.owndata)
        self.nbytes += head[0].nbytes + head[1].nbytes


def _check_bits(where: Path, key: str, bits: np.ndarray | None, n: int) -> np.ndarray:
    if bits is None:
        raise BundleError(where, f"task file lacks {key}")
    need = (n + 7) // 8
    if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != need:
        raise BundleError(where, f"{key}: {bits.dtype} of shape {bits.shape}; a bit mask of {n} weights "
                                 f"is uint8 of shape ({need},)")
    return bits


def _check_gates(where: Path, key: str, gates: np.ndarray | None, units: int) -> np.ndarray:
    if gates is None:
        raise BundleError(where, f"task file lacks {key}")
    if gates.dtype != np.uint8 or gates.shape != (units,):
        raise BundleError(where, f"{key}: {gates.dtype} of shape {gates.shape}; unit gates of "
                                 f"{units} units are uint8 of shape ({units},)")
    if gates.size and gates.max() > 1:
        raise BundleError(where, f"{key}: unit gates must be 0 or 1, found {int(gates.max())}")
    return gates


def activate(bundle: Bundle, key: str | int) -> ActiveTask:
    """Materialize one task's weights from the mapped backbone and its task file.

    Parameters no mask touches stay views into the mapped backbone (no copy)."""
    info = bundle.task(key)
    tensors = bundle.task_tensors(info["name"])
    backbone = bundle.backbone
    where = bundle.root / info["file"]
    kind = info["mask_kind"]
    if kind not in (MASK_BITS, MASK_UNITS):
        raise BundleError(bundle.root / "manifest.json",
                          f"task {info['name']!r}: unknown mask kind {kind!r}")
    params: dict[str, np.ndarray] = {}
    for name in bundle.graph.params:
        if name not in backbone:
            raise BundleError(bundle.root / bundle.manifest["backbone"], f"backbone lacks {name}")
    for site in bundle.graph.mask_sites():
        w = backbone[site.weight]
        if kind == MASK_BITS:
            key = f"mask.{site.node}"
            params[site.weight] = materialize_bits(w, _check_bits(where, key, tensors.get(key), w.size))
        else:
            key = f"gate.{site.node}"
            gates = _check_gates(where, key, tensors.get(key), site.units)
            params[site.weight] = materialize_units(w, gates)
            if site.bias is not None:
                params[site.bias] = materialize_units(backbone[site.bias], gates)
    try:
        head = (tensors["head.weight"], tensors["head.bias"])
    except KeyError as e:
        raise BundleError(where, f"task file lacks {e.args[0]}") from None
    feat = bundle.graph.feature_dim
    if head[0].ndim != 2 or head[0].shape[1] != feat or head[1].shape != (head[0].shape[0],):
        raise BundleError(where, f"head of shapes {head[0].shape}, {head[1].shape}; the features are {feat}")
    return ActiveTask(info, {**{n: backbone[n] for n in bundle.graph.params}, **params}, head)


class Runtime:
    """Inference over a verified bundle with the numpy reference executor."""

    def __init__(self, bundle: str | Path | Bundle, *, version: int | None = None,
                 cache_bytes: int = 64 << 20) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, version=version)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, ActiveTask] = OrderedDict()

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
            # the common case, in a few hundred ns: one reduction finds any NaN or inf (a
            # finite batch whose sum overflows takes the row-by-row check below, and passes)
            if np.isfinite(np.add.reduce(x, axis=None)):
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
        return executor.forward(self.bundle.graph, active.params, active.head,
                                self.check_input(x))

    def predict(self, x: np.ndarray, task: str | int) -> np.ndarray:
        """Predicted labels in the task's own label space (its ``classes``)."""
        active = self.activate(task)
        idx = self.logits(x, task).argmax(axis=1)
        return np.asarray(active.info["classes"])[idx]
