"""The Gaussian (Mahalanobis) router: class prototypes with a shared covariance.

Per class of every task it keeps a few prototypes (k-means centres of the class's
inputs, seeded) with their counts; all prototypes share one pooled covariance, kept as a
running sum of within-prototype scatter. Adding a task adds its prototypes and scatter —
no old input is needed. A task's score is the log-likelihood of its nearest prototype,
-d²/2 with d the Mahalanobis distance (a ridge on the covariance keeps constant pixels
from making it singular). Scoring is one matrix product: x @ [P | P μᵀ].
"""

from __future__ import annotations

import math

import numpy as np

from ... import kernels
from . import view
from .base import UNKNOWN, Decision, Router, RouterError


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 25):
    centres = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        assign = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        new = np.stack([x[assign == j].mean(axis=0) if (assign == j).any() else centres[j]
                        for j in range(k)])
        if np.array_equal(new, centres):
            break
        centres = new
    return centres, assign


class PrototypeRouter(Router):
    name = "prototype"
    ridge = 0.1
    per_class = 6

    def __init__(self) -> None:
        super().__init__()
        self.means = np.zeros((0, 0))
        self.counts = np.zeros(0)
        self.owner = np.zeros(0, dtype=np.int64)  # task index of each prototype
        self.scatter = np.zeros((0, 0))
        self._fused: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._route = None  # kernels.prepare_route_prototype of _fused (decide's one call)
        self.view: view.View | None = None  # what it looks at (chosen on the first task)
        # decide's hot path, built once per (runtime, _route, view): those three, the
        # kernel's decide (a pooled view computed inside it) and the view's function or None
        self._hot: tuple = (None, None, None, None, None)

    def _flat(self, runtime, x: np.ndarray) -> np.ndarray:
        if self.view is None:
            self.view = view.choose(runtime.bundle.graph)
        return np.asarray(view.compute(self.view, runtime, x), dtype=np.float64)

    def _add(self, runtime, task, x, y):
        x_in = x
        x = self._flat(runtime, x)
        d = x.shape[1]
        if self.scatter.size == 0:
            self.scatter, self.means = np.zeros((d, d)), np.zeros((0, d))
        if y is None:  # unlabelled: the task's own predictions give the classes
            y = runtime.logits(x_in, task).argmax(axis=1)
        t = len(self.tasks)
        for c in np.unique(y):
            xc = x[y == c]
            rng = np.random.default_rng([t, int(c)])
            centres, assign = _kmeans(xc, min(self.per_class, len(xc)), rng)
            for j, mu in enumerate(centres):
                xj = xc[assign == j]
                if len(xj) == 0:
                    continue
                self.means = np.vstack([self.means, mu])
                self.counts = np.append(self.counts, len(xj))
                self.owner = np.append(self.owner, t)
                self.scatter += (xj - mu).T @ (xj - mu)
        self._fused = self._route = None

    def _prepare(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._fused is None:
            n = max(1.0, self.counts.sum() - len(self.counts))
            cov = self.scatter / n
            cov += self.ridge * (np.trace(cov) / len(cov)) * np.eye(len(cov))
            p = np.linalg.inv(cov)
            fused = np.hstack([p, p @ self.means.T])  # x @ fused = [xP | xPμᵀ]
            const = -0.5 * ((self.means @ p) * self.means).sum(axis=1)
            starts = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]]).astype(np.int64)
            # float32 at inference: half the bytes, and the inputs are float32 already
            self._fused = (np.ascontiguousarray(fused, np.float32),
                           np.ascontiguousarray(const, np.float32), starts)
            self._route = None
        return self._fused

    def _router_kernel(self):
        """The fused routing kernel over the prepared tables (checked once, here)."""
        if self._route is None or self._fused is None:
            self._route = kernels.prepare_route_prototype(*self._prepare())
        return self._route

    def scores(self, runtime, x):
        x = self._flat(runtime, x) if self.view is None or self.view.kind != "input" \
            else np.asarray(x).reshape(len(x), -1)
        fused, const, starts = self._prepare()
        d = x.shape[1]
        r = x @ fused
        quad = (r[:, :d] * x).sum(axis=1, keepdims=True)
        ll = r[:, d:] + (const - 0.5 * quad)
        return np.maximum.reduceat(ll, starts, axis=1)

    def _make_hot(self, runtime) -> tuple:
        route = self._router_kernel()
        kernel, fn, v = route, None, self.view
        if v is not None and v.kind == "pooled":  # pooled inside the kernel, from the raw input
            shape = tuple(runtime.input_shape)
            kernel = kernels.prepare_route_prototype(*self._prepare(), pool=view.pool_index(shape, v.cells),
                                                     n_in=math.prod(shape), impl=route.impl)
        elif v is not None and v.kind != "input":
            fn = view.prepare(v, runtime) or \
                (lambda x: np.ascontiguousarray(view.compute(v, runtime, x), dtype=np.float32))
        self._hot = (runtime, route, v, kernel.decide, fn)
        return self._hot

    def decide(self, runtime, x, threshold=0.5, fallback=None):
        """The shared decision (see :meth:`Router.decide`) in one fused kernel call
        (``edgecl.kernels.prepare_route_prototype``'s ``decide``) for float32 inputs; other
        dtypes take the generic numpy path."""
        hot = self._hot
        if hot[0] is not runtime or hot[1] is not self._route or hot[2] is not self.view:
            if not self.tasks:
                raise RouterError(f"router {self.name} has no task")
            hot = self._make_hot(runtime)
        if type(x) is not np.ndarray or x.dtype != np.float32:
            return super().decide(runtime, x, threshold, fallback)
        if hot[4] is not None:
            x = hot[4](x)
        elif not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        task, conf, best, s = hot[3](x, self.temperature, min(self.novelty), threshold,
                                     UNKNOWN if fallback is None else fallback)
        return Decision(task, conf, best, s)

    def _arrays(self):
        return {"means": self.means, "counts": self.counts, "owner": self.owner,
                "scatter": self.scatter}

    def _meta(self) -> dict[str, str]:
        return {"view": (self.view or view.View("input")).to_json()}

    def _load_meta(self, meta: dict[str, str]) -> None:
        self.view = view.View.from_json(meta.get("view"))

    def _load_arrays(self, a):
        self.means, self.counts = np.array(a["means"]), np.array(a["counts"])
        self.owner, self.scatter = np.array(a["owner"]), np.array(a["scatter"])
        self._fused = self._route = None
