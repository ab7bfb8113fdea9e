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
from pathlib import Path

import numpy as np

from . import executor
from .bundle import Bundle
from .errors import BundleError, InputError
from .layers import weighted
from .masks import materialize_bits, materialize_units

MASK_BITS = "weight_bits"
MASK_UNITS = "unit_gates"


class ActiveTask:
    """A task's materialized weights and head, ready to run."""

    def __init__(self, info: dict, params: dict, head: tuple[np.ndarray, np.ndarray]) -> None:
        self.info = info
        self.params = params
        self.head = head
        self.nbytes = sum(w.nbytes + (0 if b is None else b.nbytes) for w, b in params.values())
        self.nbytes += head[0].nbytes + head[1].nbytes


def activate(bundle: Bundle, key: str | int) -> ActiveTask:
    """Materialize one task's weights from the mapped backbone and its task file."""
    info = bundle.task(key)
    tensors = bundle.task_tensors(info["name"])
    backbone = bundle.backbone
    where = bundle.root / info["file"]
    params: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for layer in weighted(bundle.model["layers"]):
        name = layer["name"]
        w = backbone[f"{name}.weight"]
        b = backbone.get(f"{name}.bias")
        if info["mask_kind"] == MASK_BITS:
            bits = tensors.get(f"mask.{name}")
            if bits is None:
                raise BundleError(where, f"task file lacks mask.{name}")
            if bits.size * 8 < w.size:
                raise BundleError(where, f"mask.{name} holds {bits.size * 8} bits, need {w.size}")
            params[name] = (materialize_bits(w, bits), None if b is None else np.array(b))
        elif info["mask_kind"] == MASK_UNITS:
            gates = tensors.get(f"gate.{name}")
            if gates is None or gates.shape != (w.shape[0],):
                raise BundleError(where, f"task file lacks gate.{name} of {w.shape[0]} units")
            params[name] = (
                materialize_units(w, gates),
                None if b is None else materialize_units(b, gates),
            )
        else:
            raise BundleError(bundle.root / "manifest.json",
                              f"task {info['name']!r}: unknown mask kind {info['mask_kind']!r}")
    try:
        head = (tensors["head.weight"], tensors["head.bias"])
    except KeyError as e:
        raise BundleError(where, f"task file lacks {e.args[0]}") from None
    return ActiveTask(info, params, head)


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

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """A float32 batch of the model's input shape, or a clear ``InputError``."""
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
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)[:10].tolist()
            raise InputError(f"input holds NaN or infinite values in rows {rows}")
        return x

    def logits(self, x: np.ndarray, task: str | int) -> np.ndarray:
        active = self.activate(task)
        return executor.forward(self.bundle.model["layers"], active.params, active.head,
                                self.check_input(x))

    def predict(self, x: np.ndarray, task: str | int) -> np.ndarray:
        """Predicted labels in the task's own label space (its ``classes``)."""
        active = self.activate(task)
        idx = self.logits(x, task).argmax(axis=1)
        return np.asarray(active.info["classes"])[idx]
