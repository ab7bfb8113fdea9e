"""One engine session over a bundle, ONNX Runtime style.

    from edgecl.runtime import Session
    s = Session("bundle/")                          # fastest available backend
    s = Session("bundle/", providers=["onnxruntime", "numpy"])   # first usable of these
    out = s.run(x)                                  # no task: routed, one decision per input
    out.task_names, out.confidence, out.reason, out.prediction
    logits = s.logits(x, task="digits-0-1")        # a named task
    s.reload()                                      # pick up a newly committed version

With no ``providers``, the session opens every usable one, times a batch-1 inference
of each (a few runs, median) and keeps the fastest: which backend wins depends on the
model and the board (measured: ONNX Runtime, LiteRT or TVM, model by model). The
session verifies a bundle once per content (a file's sha256 is checked once per
name: files are content-addressed and immutable, so a new version costs only its new
files), keeps one copy of the active task's weights (the backend's; the numpy
reference's materialized copy is dropped once a compiled backend holds them), routes and
infers in one call, and says which backend and how many threads it uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import BACKENDS, BackendUnavailable, backend_class
from .bundle import Bundle
from .bundle_format import MANIFEST
from .errors import BundleError, InputError
from .routers import UNKNOWN
from .routers.store import load_router

# The order "fastest available" tries (compiled code first, the reference last).
DEFAULT_PROVIDERS = tuple(BACKENDS)


@dataclass
class Routed:
    """A routed batch: per input, the task (or None: unknown), the router's confidence in
    its choice (softmax of the calibrated task scores), why an input was refused
    (``"novel"``: no task's data looks like it; ``"low confidence"``: below the
    threshold), and the prediction in the chosen task's labels."""

    task_names: list[str | None]
    task_index: np.ndarray
    best: list[str]
    confidence: np.ndarray
    reason: list[str]
    prediction: list[int | None]
    router: str
    threshold: float

    def as_dicts(self) -> list[dict]:
        return [{"task": t, "best_task": b, "confidence": float(c), "reason": r, "prediction": p}
                for t, b, c, r, p in zip(self.task_names, self.best, self.confidence, self.reason,
                                         self.prediction, strict=True)]


class Session:
    def __init__(self, bundle: str | Path | Bundle, providers: Sequence[str] | None = None, *,
                 provider_options: dict[str, dict] | None = None, router: str | None = None,
                 threads: int | None = None, cache_bytes: int = 64 << 20) -> None:
        self.path = bundle.root if isinstance(bundle, Bundle) else Path(bundle)
        self._options = dict(provider_options or {})
        self._measure = not providers  # no order given: time the usable ones, keep the fastest
        self._requested = list(providers) if providers else list(DEFAULT_PROVIDERS)
        for p in self._requested:
            if p not in BACKENDS:
                raise ValueError(f"unknown provider {p!r}; choose from {', '.join(BACKENDS)}")
        self._router_name = router
        self.cache_bytes = cache_bytes
        from . import threads as _threads

        self.threads = threads or _threads.current().n
        self._verified: dict[str, str] = {}  # file -> sha256 already checked
        self.skipped: dict[str, str] = {}  # provider -> why it was not used
        self._open()

    # -- loading -------------------------------------------------------------------
    def _open(self) -> None:
        bundle = Bundle.open(self.path, verify=False)
        bundle.verify(self._verified)
        self.bundle = bundle
        self.skipped = {}
        self.timings: dict[str, float] = {}
        self.backend = None
        for name in self._requested:
            try:
                opts = {"cache_bytes": self.cache_bytes, "threads": self.threads,
                        **self._options.get(name, {})}
                backend = backend_class(name).open(bundle, **opts)
            except (BackendUnavailable, ImportError, BundleError, ValueError) as e:
                self.skipped[name] = str(e)
                continue
            if not self._measure:
                self.backend = backend
                break
            if name == "numpy" and self.backend is not None:
                break  # the reference is never faster than a compiled provider worth timing
            try:
                self.timings[name] = _batch1_seconds(backend)
            except Exception as e:  # a backend that cannot run this bundle is not chosen
                self.skipped[name] = f"{type(e).__name__}: {e}"
                continue
            if self.backend is None or self.timings[name] < self.timings[self.backend.name]:
                self.backend = backend
        if self.backend is None:
            raise BackendUnavailable("no provider is usable: " + "; ".join(f"{k}: {v}" for k, v in
                                                                             self.skipped.items()))
        self._router = None
        self._per_task: dict = {}  # task key -> the backend serving it (see serving())
        self._reference = None  # the numpy backend, opened for the first task it must serve
        self._manifest_stamp = self._stamp()

    def _stamp(self) -> tuple[int, int]:
        st = (self.path if self.path.is_file() else self.path / MANIFEST).stat()  # a packed bundle: the file
        return st.st_mtime_ns, st.st_size

    def reload(self) -> bool:
        """Reopen if a new version was committed since; True when it did."""
        if self._stamp() == self._manifest_stamp:
            return False
        old = self.bundle.version
        bundle = Bundle.open(self.path, verify=False)
        if bundle.version == old:
            self._manifest_stamp = self._stamp()
            return False
        self._open()
        return True

    # -- facts ---------------------------------------------------------------------
    @property
    def provider(self) -> str:
        return self.backend.name

    @property
    def tasks(self) -> list[str]:
        return self.bundle.task_names

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.bundle.graph.input_shape

    def describe(self) -> str:
        why = "; ".join(f"{k} skipped: {v}" for k, v in self.skipped.items())
        timed = ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in self.timings.items())
        return (f"provider {self.provider}, {self.threads} thread(s), bundle version {self.bundle.version}"
                + (f"; batch-1 inference measured at open: {timed}" if timed else "")
                + (f" ({why})" if why else ""))

    # -- inference -----------------------------------------------------------------
    def check_input(self, x: np.ndarray) -> np.ndarray:
        return self.backend.runtime.check_input(x)

    def serving(self, task: str | int):
        """The backend that serves ``task``: the chosen one, or the numpy reference for a
        task on a graph of its own (added modules) that the chosen compiled backend does not
        run (it was compiled for the main graph)."""
        if self.backend.any_graph:
            return self.backend
        hit = self._per_task.get(task)
        if hit is None:
            own = self.bundle.task_graph(self.bundle.task(task)["name"]) != self.bundle.graph
            if own and self._reference is None:
                self._reference = backend_class("numpy").open(self.bundle, cache_bytes=self.cache_bytes,
                                                              threads=self.threads)
            hit = self._per_task[task] = self._reference if own else self.backend
        return hit

    def logits(self, x: np.ndarray, task: str | int) -> np.ndarray:
        return self.serving(task).logits(x, task)

    def predict(self, x: np.ndarray, task: str | int) -> np.ndarray:
        """Labels of the named task (in its own label space, its ``classes``)."""
        return self.serving(task).predict(x, task)

    @property
    def router(self):
        if self._router is None:
            self._router = load_router(self.bundle, self._router_name)
        return self._router

    def run(self, x: np.ndarray, task: str | int | None = None, *, threshold: float = 0.5,
            fallback: str | int | None = None) -> Routed | np.ndarray:
        """Predictions. With ``task``: that task's labels. Without: the router decides per
        input (see :class:`Routed`); ``fallback`` takes the inputs it refuses."""
        if task is not None:
            return self.predict(x, task)
        x = self.check_input(x)
        router = self.router
        fb = None if fallback is None else self.bundle.task(fallback)["index"]
        d = router.decide(self.backend.runtime, x, threshold, fb)
        names = self.bundle.task_names
        top = d.scores.max(axis=1)
        novel = top < router.novelty_floor
        refused = novel | (d.confidence < threshold)
        tail = "" if fb is None else ", sent to the fallback task"
        reason = ["ok" if not r else ("novel" if n else "low confidence") + tail
                  for r, n in zip(refused, novel, strict=True)]
        pred: list[int | None] = [None] * len(x)
        for t in np.unique(d.task):
            if t == UNKNOWN:
                continue
            sel = np.flatnonzero(d.task == t)
            labels = self.serving(int(t)).predict(x[sel], int(t))
            for i, p in zip(sel, labels, strict=True):
                pred[int(i)] = int(p)
        return Routed([None if t == UNKNOWN else names[int(t)] for t in d.task], d.task,
                      [names[int(b)] for b in d.best], d.confidence, reason, pred, router.name, threshold)


def _batch1_seconds(backend, runs: int = 5, budget_s: float = 0.02, most: int = 100) -> float:
    """Median seconds of a batch-1 inference of the first task (0 when there is none):
    ``runs`` calls at least, more (up to ``most``) while they take under ``budget_s`` in
    all. A small model's providers differ by a few percent (DS-CNN: TFLite 61 us, TVM 65,
    ONNX Runtime 67), which five calls of a freshly opened backend did not always tell
    apart; the budget keeps a large model's open as it was (five calls)."""
    import time

    if not backend.bundle.tasks:
        return 0.0
    from .samples import canary

    backend.activate(0)
    x = canary(backend.bundle)
    backend.run_checked(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or (len(times) < most and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        backend.run_checked(x)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


__all__ = ["DEFAULT_PROVIDERS", "InputError", "Routed", "Session"]
