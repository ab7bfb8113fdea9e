"""Inference backends over one interface, chosen by name or automatically.

    from edgecl.runtime.backends import open_backend
    be = open_backend("bundle/", "auto")      # fastest available: tvm, onnxruntime, tflite, numpy
    be.activate("digits-0-1")                 # materialize W ⊙ M once per task switch
    logits = be.logits(x)

``numpy`` is the reference (``edgecl.runtime.session``). ``tvm`` loads the bundle's
compiled library for this machine through the TVM runtime only (``tvm_ffi`` plus
``libtvm_runtime.so``, never ``tvm.relax`` or the compiler). ``onnxruntime`` runs the
bundle's exported ONNX graph with the task's weights supplied at session creation.
Each optional library is imported only when its backend is opened.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError
from ..session import Runtime

# name -> module (relative), in the order "auto" tries them
BACKENDS = {"tvm": ".tvm", "onnxruntime": ".onnxruntime", "tflite": ".tflite", "numpy": ".numpy"}


class BackendUnavailable(RuntimeError):
    """The backend's library is missing or the bundle holds no artifact for it."""


class Backend:
    """One task at a time: ``activate(task)`` then ``logits(x)`` (or ``logits(x, task)``)."""

    name = "base"
    keeps_weights = True  # the backend copies a task's weights at activation
    any_graph = False  # compiled backends run the main graph only (what was compiled)

    def __init__(self, bundle: Bundle, **options) -> None:
        self.bundle = bundle
        self.runtime = Runtime(bundle, cache_bytes=int(options.get("cache_bytes", 64 << 20)))
        self.task: dict | None = None

    # -- to implement -------------------------------------------------------------
    @classmethod
    def available(cls, bundle: Bundle | None = None) -> str | None:
        """None when usable (for ``bundle``), else why not."""
        return None

    def _activate(self, info: dict) -> None:
        raise NotImplementedError

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- the interface ------------------------------------------------------------
    @classmethod
    def open(cls, bundle: str | Path | Bundle, **options) -> Backend:
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        why = cls.available(bundle)
        if why is not None:
            raise BackendUnavailable(f"backend {cls.name!r} is not available: {why}")
        return cls(bundle, **options)

    def activate(self, task: str | int) -> None:
        active = self.task
        if active is not None and (task == active["name"] or (type(task) is int and task == active["index"])):
            return  # the common case of a serving loop: no manifest lookup per call
        info = self.bundle.task(task)
        if self.task is not None and self.task["name"] == info["name"]:
            return
        if not self.any_graph and self.bundle.task_graph(info["name"]) != self.bundle.graph:
            raise BackendUnavailable(
                f"backend {self.name!r} runs the bundle's main graph; task {info['name']!r} runs on "
                f"graph {info.get('graph')!r} (its own modules): use the numpy backend for it")
        self._activate(info)
        self.task = info
        if self.keeps_weights:
            # The backend holds its own copy (packed, pre-packed or in an interpreter):
            # the reference's materialized one would be a second.
            self.runtime.forget(info["name"])

    def logits(self, x: np.ndarray, task: str | int | None = None) -> np.ndarray:
        if task is not None:
            self.activate(task)
        if self.task is None:
            raise ValueError("no task is active: call activate(task) first or pass task=")
        return self._run(self.runtime.check_input(x))

    def run_checked(self, x: np.ndarray) -> np.ndarray:
        """``logits`` of the active task for a batch already validated (float32, right shape)."""
        return self._run(x)

    def predict(self, x: np.ndarray, task: str | int | None = None) -> np.ndarray:
        out = self.logits(x, task)
        return np.asarray(self.task["classes"])[out.argmax(axis=1)]

    def materialized(self, info: dict):
        """The task's ``W ⊙ M`` (cached by the numpy runtime under its RAM budget)."""
        return self.runtime.activate(info["name"])


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)} or auto")
    module = importlib.import_module(BACKENDS[name], __name__)
    return module.BACKEND


def available(bundle: str | Path | Bundle | None = None) -> dict[str, str | None]:
    """Backend name -> None (usable) or the reason it is not."""
    if bundle is not None and not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    out = {}
    for name in BACKENDS:
        try:
            out[name] = backend_class(name).available(bundle)
        except Exception as e:  # a broken optional install must not break the others
            out[name] = f"{type(e).__name__}: {e}"
    return out


def open_backend(bundle: str | Path | Bundle, name: str = "auto", **options) -> Backend:
    """Open ``name`` (or, for ``auto``, the first usable of tvm, onnxruntime, tflite, numpy)."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    if name != "auto":
        return backend_class(name).open(bundle, **options)
    reasons = []
    for cand in BACKENDS:
        try:
            return backend_class(cand).open(bundle, **options)
        except (BackendUnavailable, ImportError, BundleError) as e:
            reasons.append(f"{cand}: {e}")
    raise BackendUnavailable("no backend is usable: " + "; ".join(reasons))


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
