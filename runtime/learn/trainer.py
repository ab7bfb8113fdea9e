"""The learning itself (runs in the child): state, the step function, phases, checkpoints.

A method's state is a dict of float32 arrays (scores or trainable weights, the head, the
Adam moments) plus a position (phase, epoch, batch, Adam step). The data order of an
epoch is a permutation drawn from ``(seed, phase, epoch)``; the permutation in use is
stored in the checkpoint along with every array, so a resumed run takes exactly the
steps an uninterrupted one takes.

It learns on any model graph: the trained parameters are mask sites' weights
(``graph.mask_sites()``), all of them or the last ``K`` (``train_last``); gradients are
formed for those only, and the graph runs backward only from the features down to the
first of them (:mod:`.train_numpy`, through the op registry).

The step function is pluggable (:data:`STEP_BACKENDS`): ``numpy`` runs forward and
backward with :mod:`.train_numpy`; ``tvm`` takes loss and dL/dW_eff from the bundle's
compiled training step (``targets.<t>.train_step``, see docs/compiler.md). Both update
with the masked C kernels (``masked_adam_``; ``materialize_bits`` for the supermask).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ... import kernels
from .. import executor
from ..bundle_format import atomic_write_bytes
from ..graph import Graph, from_model
from ..masks import materialize_bits, pack_bits, unpack_bits
from . import train_numpy as T

DEFAULTS = {
    # the host's hyperparameters (models/methods), so device and host learn alike
    "supsup": {"epochs": 30, "lr": 1e-2, "density": 0.5},
    "packnet": {"epochs": 30, "lr": 1e-3, "prune": 0.6, "retrain_epochs": 10},
    "head": {"epochs": 30, "lr": 1e-2},
}
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class State:
    arrays: dict[str, np.ndarray]
    pos: dict = field(default_factory=lambda: {"phase": 0, "epoch": 0, "batch": 0, "adam": 0,
                                               "steps": 0, "joules": 0.0, "seconds": 0.0})


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32, order="C")


def _ones_bits(n: int) -> np.ndarray:
    return pack_bits(np.ones(n, dtype=bool))


def topk_count(size: int, density: float) -> int:
    """How many weights SupSup's mask keeps in a layer of ``size``."""
    return max(1, int(round(size * density)))


def kth_largest(flat: np.ndarray, k: int) -> np.float32:
    """The ``k``-th largest value of ``flat`` (1-based): a full partition."""
    return flat.dtype.type(np.partition(flat, flat.size - k)[flat.size - k])


def topk_mask(flat: np.ndarray, k: int, thr: np.float32 | None = None) -> np.ndarray:
    """SupSup's mask as a flat bool array: exactly ``k`` entries, every score above the
    ``k``-th largest value ``thr`` and, among the scores equal to it, the lowest indices.
    A pure function of the scores (``thr`` only saves finding it again)."""
    if thr is None:
        thr = kth_largest(flat, k)
    keep = flat >= thr
    extra = int(np.count_nonzero(keep)) - k
    if extra > 0:  # ties at the threshold: drop the highest-index ones
        ties = np.flatnonzero(flat == thr)
        keep[ties[len(ties) - extra:]] = False
    return keep


def topk_bits(scores: np.ndarray, density: float) -> np.ndarray:
    """SupSup's mask: the top ``density`` of a layer's scores, bit-packed."""
    flat = scores.reshape(-1)
    return pack_bits(topk_mask(flat, topk_count(flat.size, density)))


class TopK:
    """The exact top-k threshold of one layer's scores, found incrementally.

    An optimizer step moves every score a little, so the ``k``-th largest value moves a
    little: the new one is looked for in a band ``[t - d, t + d]`` around the last one.
    With ``above`` scores over the band and ``inside`` in it, the threshold lies in the
    band exactly when ``above < k <= above + inside``, and it is then the
    ``(k - above)``-th largest of the band (a partition of a few hundred values instead
    of the whole layer). Otherwise the band widens (x4, twice) and then a full partition
    runs. The result is the same value a full partition gives, whatever the band; the
    band's width adapts so that it holds ~``target`` scores and covers the last move."""

    def __init__(self, size: int, density: float) -> None:
        self.k = topk_count(size, density)
        self.target = max(64, size // 128)
        self.thr: np.float32 | None = None
        self.width = 0.0
        self.full = 0  # full partitions run (first call, band misses)

    def threshold(self, flat: np.ndarray) -> np.float32:
        k, f = self.k, flat.dtype.type
        old = self.thr
        if old is not None and k < flat.size and self.width > 0:
            d = self.width
            for _ in range(3):
                lo, hi = f(old - d), f(old + d)
                above = int(np.count_nonzero(flat > hi))
                if above < k:
                    band = flat[(flat >= lo) & (flat <= hi)]
                    r = k - above
                    if r <= band.size:
                        thr = f(np.partition(band, band.size - r)[band.size - r])
                        self._adapt(d, band.size, abs(float(thr) - float(old)))
                        self.thr = thr
                        return thr
                d *= 4.0
        self.full += 1
        thr = kth_largest(flat, k)
        if old is None:  # a first width: the band of ~target scores if they were uniform
            span = float(flat.max()) - float(flat.min())
            self.width = max(span * self.target / flat.size, 1e-30)
        else:
            self._adapt(self.width * 4.0, self.target, abs(float(thr) - float(old)))
        self.thr = thr
        return thr

    def _adapt(self, d: float, inside: int, moved: float) -> None:
        if inside > 4 * self.target:
            d *= 0.5
        elif inside < self.target:
            d *= 2.0
        self.width = max(d, 4.0 * moved, 1e-30)


def _as_graph(model: Graph | Mapping) -> Graph:
    return model if isinstance(model, Graph) else from_model(model)


class Problem:
    """What the child learns: the bundle's frozen parts, the data, the hyperparameters.

    ``graph`` is the bundle's model graph (or its manifest ``model`` entry). The mask sites
    (``graph.mask_sites()``, by node name) are what a task masks; ``trainable`` are the
    sites this learning updates: supsup every site, packnet the sites with a free weight,
    head none — or, with ``train_last=K``, only those among the last ``K`` sites. Sites
    before them are frozen: the forward runs through them, the backward never does; their
    mask in the new task is all ones for supsup (the dense backbone weights) and the union
    of the old tasks' masks for packnet (their free weights stay free and unchanged).

    ``prefix_cache`` (numpy step, sites before the trained ones frozen): the values where
    the trained part starts (:func:`.train_numpy.cut`) are computed once per sample, at
    the first step, and kept (:meth:`start_values`); every step then runs only the
    trained part. The learner turns it off when the RAM plan has no room for it
    (:func:`.planner.prefix_cache_bytes`). The steps are the same bytes either way, unless
    the prefix holds a ``Linear`` on ``[batch, features]`` (see :mod:`.train_numpy`)."""

    def __init__(self, graph: Graph | Mapping, backbone: Mapping[str, np.ndarray],
                 owned: Mapping[str, np.ndarray | None],
                 x: np.ndarray, y: np.ndarray, n_classes: int, method: str, hp: dict,
                 batch_size: int, seed: int, source: dict[str, np.ndarray] | None = None,
                 train_last: int | None = None, prefix_cache: bool = True,
                 source_params: Mapping[str, np.ndarray] | None = None) -> None:
        self.graph = _as_graph(graph)
        self.sites = self.graph.mask_sites()
        self.site = {s.node: s for s in self.sites}
        self.names = [s.node for s in self.sites]
        self.backbone = backbone
        self.x, self.y, self.n_classes = x, y, n_classes
        self.method, self.hp, self.bs, self.seed = method, hp, int(batch_size), int(seed)
        self.source = source  # head mode: the source task's file tensors and effective params
        self.source_params = source_params
        self.feat = int(self.graph.feature_dim)
        self.phases = [int(hp["epochs"])] + ([int(hp["retrain_epochs"])] if method == "packnet" else [])
        if train_last is not None and int(train_last) < 1:
            raise ValueError(f"train_last must be at least 1 (the last K mask sites), got {train_last}")
        self.train_last = None if train_last is None else int(train_last)
        candidates = self.names if train_last is None else self.names[-int(train_last):]
        if method == "packnet":  # free = owned by no task (``session.owned_union``)
            self.union = {}
            for s in self.sites:
                size = math.prod(s.shape)
                u = owned.get(s.weight, np.zeros(size, dtype=bool))
                self.union[s.node] = np.ones(size, dtype=bool) if u is None else np.asarray(u, dtype=bool)
            self.trainable = [n for n in candidates if not self.union[n].all()]
        else:
            self.trainable = list(candidates) if method == "supsup" else []
        # the parameters the backward differentiates: the trained sites' (effective) weights
        self.wanted = {self.site[n].weight for n in self.trainable}
        self._features = None
        self._frozen: dict[str, np.ndarray] | None = None
        # step caches (not state: a resumed run rebuilds them and takes the same steps)
        self.topk: dict[str, TopK] = {}
        self.buffers: dict[tuple[str, str], np.ndarray] = {}
        self.prefix_cache = bool(prefix_cache)
        self._starts: dict[str, np.ndarray] = {}  # start value -> [N, ...] (filled at once)

    # -- state ---------------------------------------------------------------
    def initial(self) -> State:
        rng = np.random.default_rng([self.seed, 1])
        a: dict[str, np.ndarray] = {}
        if self.method == "supsup":
            for n in self.trainable:
                shape = self.site[n].shape
                bound = (6.0 / max(1, math.prod(shape[1:]))) ** 0.5  # kaiming uniform, as edge-popup
                a[f"scores.{n}"] = _f32(rng.uniform(-bound, bound, shape))
        elif self.method == "packnet":
            for n in self.trainable:
                a[f"weight.{n}"] = np.array(self.backbone[self.site[n].weight], dtype=np.float32)
                a[f"free.{n}"] = pack_bits(~self.union[n])
        bound = 1.0 / self.feat**0.5
        a["head.weight"] = _f32(rng.uniform(-bound, bound, (self.n_classes, self.feat)))
        a["head.bias"] = _f32(rng.uniform(-bound, bound, self.n_classes))
        self._reset_moments(a)
        return State(a)

    def _opt_keys(self, a: dict) -> list[str]:
        pre = "scores." if self.method == "supsup" else "weight."
        keys = [pre + n for n in self.trainable] if self.method != "head" else []
        return [*keys, "head.weight", "head.bias"]

    def _reset_moments(self, a: dict) -> None:
        for k in self._opt_keys(a):
            a[f"m.{k}"] = np.zeros_like(a[k])
            a[f"v.{k}"] = np.zeros_like(a[k])
            if not k.startswith("weight."):
                a[f"all.{k}"] = _ones_bits(a[k].size)

    def prune(self, state: State) -> None:
        """PackNet between phases: keep the largest free weights, zero the rest (+0.0)."""
        a = state.arrays
        for n in self.trainable:
            w = a[f"weight.{n}"]
            cand = ~self.union[n]
            k = int(round(int(cand.sum()) * (1.0 - float(self.hp["prune"]))))
            keep = np.zeros(w.size, dtype=bool)
            if k > 0:
                mags = np.where(cand, np.abs(w.reshape(-1)), np.float32(-1.0))
                keep[np.argpartition(-mags, k - 1)[:k]] = True
            flat = w.reshape(-1)
            flat[cand & ~keep] = np.float32(0.0)
            a[f"keep.{n}"] = pack_bits(keep)
            a[f"free.{n}"] = a[f"keep.{n}"].copy()  # retrain only what this task kept
        self._reset_moments(a)

    def frozen_params(self) -> dict[str, np.ndarray]:
        """Every parameter the step does not train, as the new task will see it: backbone
        views (supsup's frozen sites: the dense weights), and for packnet's frozen sites
        the weights under the union of the old masks (what the new task's mask selects)."""
        if self._frozen is None:
            params = {name: self.backbone[name] for name in self.graph.params}
            if self.method == "packnet":
                for n in self.names:
                    if n not in self.trainable and not self.union[n].all():
                        w = self.site[n].weight
                        params[w] = materialize_bits(self.backbone[w], pack_bits(self.union[n]))
            self._frozen = params
        return self._frozen

    # -- data ------------------------------------------------------------------
    def order(self, phase: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 17, phase, epoch]).permutation(len(self.x))

    def batches_per_epoch(self) -> int:
        return max(1, -(-len(self.x) // self.bs))

    def total_steps(self) -> int:
        return sum(self.phases) * self.batches_per_epoch()

    def features(self) -> np.ndarray:
        """Head mode: the source task's features of every sample, computed once (a batch
        at a time, so the activations are a batch's)."""
        if self._features is None:
            params = self.source_params
            out = np.empty((len(self.x), self.feat), dtype=np.float32)
            for i in range(0, len(self.x), self.bs):
                out[i : i + self.bs] = executor.features(self.graph, params, self.x[i : i + self.bs])
            self._features = out
        return self._features

    def start_values(self, idx: np.ndarray) -> dict[str, np.ndarray] | None:
        """The batch ``idx``'s values where the trained part starts (every name of
        ``train_numpy.cut(graph, wanted).starts``), from the per-sample cache, which the
        first call fills: the frozen prefix over every sample once, a batch at a time in
        sample order (as :meth:`features`), so the cache is a function of the samples
        and the batch size only and a resumed run finds the same values. None when the
        cache is off or there is nothing to cache (the trained part starts at the input)."""
        if not self.prefix_cache or not self.wanted:
            return None
        c = T.cut(self.graph, self.wanted)
        names = c.cached(self.graph)
        if not names:
            return None
        if not self._starts:
            params = self.frozen_params()
            for i in range(0, len(self.x), self.bs):
                vals = T.prefix_values(self.graph, params, self.x[i : i + self.bs], self.wanted)
                for v in names:
                    if v not in self._starts:
                        self._starts[v] = np.empty((len(self.x), *vals[v].shape[1:]), dtype=vals[v].dtype)
                    self._starts[v][i : i + self.bs] = vals[v]
        out = {v: self._starts[v][idx] for v in names}
        if self.graph.input.name in c.starts:
            out[self.graph.input.name] = self.x[idx]
        return out

    # -- the result --------------------------------------------------------------
    def result(self, state: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """(the task file's tensors, the new backbone or None)."""
        a = state.arrays
        out = {"head.weight": a["head.weight"].copy(), "head.bias": a["head.bias"].copy()}
        if self.method == "supsup":
            for s in self.sites:
                if s.node in self.trainable:
                    out[f"mask.{s.node}"] = topk_bits(a[f"scores.{s.node}"], float(self.hp["density"]))
                else:  # a frozen site: the dense backbone weights
                    out[f"mask.{s.node}"] = _ones_bits(math.prod(s.shape))
            return out, None
        if self.method == "head":
            # the source task's own parts, whatever its kind; only the head is new
            out.update({k: v.copy() for k, v in self.source.items() if not k.startswith("head.")})
            return out, None
        backbone = dict(self.backbone)  # untouched tensors stay what they are (mapped views)
        for s in self.sites:
            n = s.node
            if n in self.trainable:
                w = a[f"weight.{n}"]
                keep = unpack_bits(a[f"keep.{n}"], (w.size,))
                out[f"mask.{n}"] = pack_bits(self.union[n] | keep)
                backbone[s.weight] = w.copy()
            else:  # owned by the old tasks only; its free weights stay free
                out[f"mask.{n}"] = pack_bits(self.union[n])
        return out, backbone


# ------------------------------------------------------------------ step functions
Step = Callable[[Problem, State, np.ndarray, np.ndarray], float]


def _adam(a: dict, key: str, grad: np.ndarray, bits: np.ndarray, lr: float, t: int) -> None:
    kernels.masked_adam_(a[key], _f32(grad), a[f"m.{key}"], a[f"v.{key}"], bits, lr, t)


def _supermask_weight(p: Problem, n: str, scores: np.ndarray) -> np.ndarray:
    """Site ``n``'s weight under the current supermask: the exact top-``density``
    scores (:class:`TopK`), packed and materialized by the kernels (+0.0 where dropped,
    as the runtime does), into a buffer reused from step to step."""
    flat = scores.reshape(-1)
    tk = p.topk.get(n)
    if tk is None:
        tk = p.topk[n] = TopK(flat.size, float(p.hp["density"]))
    bits = kernels.pack(topk_mask(flat, tk.k, tk.threshold(flat)))
    w = p.backbone[p.site[n].weight]
    if w.dtype != np.float32 or not w.flags.c_contiguous:
        return materialize_bits(w, bits)
    out = p.buffers.get(("w", n))
    if out is None:
        out = p.buffers[("w", n)] = np.empty(w.shape, np.float32)
    return kernels.materialize_bits(w, bits, out=out)


def _step_params(p: Problem, s: State) -> dict[str, np.ndarray]:
    """Every parameter the step runs with (name -> array): the trained sites' weights —
    the supermask's materialized weights (SupSup) or the trainable weights (PackNet) —
    and :meth:`Problem.frozen_params` for the rest."""
    params = dict(p.frozen_params())
    for n in p.trainable:
        w = p.site[n].weight
        if p.method == "supsup":
            params[w] = _supermask_weight(p, n, s.arrays[f"scores.{n}"])
        else:
            params[w] = s.arrays[f"weight.{n}"]
    return params


def _apply(p: Problem, s: State, gw: Mapping[str, np.ndarray], ghw: np.ndarray, ghb: np.ndarray) -> None:
    """The masked Adam updates from dL/dW_eff (per trained site's weight parameter name)
    and the head's gradients."""
    a, t, lr = s.arrays, s.pos["adam"], float(p.hp["lr"])
    for n in p.trainable:
        g = gw[p.site[n].weight]
        if p.method == "supsup":  # straight-through: d(w*m)/dm = w goes to the scores
            key, w = f"scores.{n}", p.backbone[p.site[n].weight]
            grad = p.buffers.get(("g", n))
            if grad is None:
                grad = p.buffers[("g", n)] = np.empty(w.shape, np.float32)
            np.multiply(g, w, out=grad)
            _adam(a, key, grad, a[f"all.{key}"], lr, t)
        else:
            _adam(a, f"weight.{n}", g, a[f"free.{n}"], lr, t)
    _adam(a, "head.weight", ghw, a["all.head.weight"], lr, t)
    _adam(a, "head.bias", ghb, a["all.head.bias"], lr, t)


def _head_step(p: Problem, s: State, idx: np.ndarray) -> float:
    a, t, lr = s.arrays, s.pos["adam"], float(p.hp["lr"])
    feats = p.features()[idx]
    logits = feats @ a["head.weight"].T + a["head.bias"]
    loss, g = T.cross_entropy(logits, p.y[idx])
    _adam(a, "head.weight", g.T @ feats, a["all.head.weight"], lr, t)
    _adam(a, "head.bias", g.sum(axis=0), a["all.head.bias"], lr, t)
    return loss


def _numpy_grads(p: Problem, params: dict, head: tuple, x: np.ndarray | None, y: np.ndarray,
                 start: dict[str, np.ndarray] | None = None):
    return T.grads(p.graph, params, head, x, y, p.wanted, start=start)


def _masked_step(grads_fn, *, prefix_cache: bool = False) -> Step:
    """A step: gradients from ``grads_fn(p, params, head, x, y) -> (loss, {trained weight
    parameter: dL/dW_eff}, dL/dhead.weight, dL/dhead.bias)``, then the masked updates.
    The state changes only once the gradients are there (a failed call leaves it as it was).
    ``prefix_cache``: ``grads_fn`` also takes ``start=`` (:meth:`Problem.start_values`) and
    gets it, with ``x=None``, whenever the problem has cached start values."""

    def step(p: Problem, s: State, idx: np.ndarray, _unused: np.ndarray | None = None) -> float:
        if p.method == "head":  # no backbone gradient: always numpy
            s.pos["adam"] += 1
            return _head_step(p, s, idx)
        params = _step_params(p, s)
        head = (s.arrays["head.weight"], s.arrays["head.bias"])
        start = p.start_values(idx) if prefix_cache else None
        if start is not None:
            loss, gw, ghw, ghb = grads_fn(p, params, head, None, p.y[idx], start=start)
        else:
            loss, gw, ghw, ghb = grads_fn(p, params, head, p.x[idx], p.y[idx])
        s.pos["adam"] += 1
        _apply(p, s, gw, ghw, ghb)
        return loss

    return step


numpy_step = _masked_step(_numpy_grads, prefix_cache=True)
numpy_step.__doc__ = "One masked update on the samples ``idx`` (numpy gradients); returns the loss."


def tvm_step_factory(bundle) -> Step:
    """The bundle's compiled TVM training step (``targets.<t>.train_step``) for this
    machine: loss and dL/dW_eff come from the library (gradients by the graph's parameter
    names, e.g. ``fc1.weight``), the masked updates stay the C kernels'."""
    from ..backends.tvm_train import load_train_step

    train_step = load_train_step(bundle)

    def grads(p: Problem, params: dict, head: tuple, x: np.ndarray, y: np.ndarray):
        loss, g = train_step(x, y, params, head)
        return loss, {w: g[w] for w in p.wanted}, g["head.weight"], g["head.bias"]

    return _masked_step(grads)


class FallbackStep:
    """``auto``'s compiled step: if its first call fails (a library built for another
    graph, a runtime that cannot run it), the whole run takes the numpy step instead — the
    state is untouched by a failed call, so the run is the numpy run. Later failures are
    errors. ``backend`` says which one ran; ``fallback_reason`` why numpy took over."""

    def __init__(self, name: str, step: Step) -> None:
        self.backend, self._step = name, step
        self.fallback_reason: str | None = None
        self._tried = False

    def __call__(self, p: Problem, s: State, idx: np.ndarray, _unused: np.ndarray | None = None) -> float:
        if self._tried:
            return self._step(p, s, idx, _unused)
        try:
            loss = self._step(p, s, idx, _unused)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the compiled step: numpy instead
            self.fallback_reason = f"{self.backend} step failed ({type(e).__name__}: {e}); numpy used"
            self.backend, self._step = "numpy", numpy_step
            loss = numpy_step(p, s, idx, _unused)
        self._tried = True
        return loss


# name -> factory(bundle) -> step; "auto" takes the bundle's compiled step for this
# machine when it has one and the TVM runtime loads, else numpy.
STEP_BACKENDS: dict[str, Callable[[object], Step]] = {"numpy": lambda bundle: numpy_step,
                                                      "tvm": tvm_step_factory}


def register_step_backend(name: str, factory: Callable[[object], Step]) -> None:
    """Another compiled training step slots in here: ``factory(bundle) -> step``."""
    STEP_BACKENDS[name] = factory


def select_step(bundle, backend: str = "auto") -> tuple[str, Step]:
    """(name, step) for ``backend``; ``auto``: ``tvm`` if usable for this bundle, else numpy.

    ``auto`` never fails for want of a compiled step: no ``train_step`` artifact, a
    loader that raises, or a first step that fails all fall back to numpy (the returned
    step's ``backend`` then says ``numpy``)."""
    if backend == "auto":
        try:
            step = STEP_BACKENDS["tvm"](bundle)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - no usable compiled step: numpy
            return "numpy", numpy_step
        return "tvm", FallbackStep("tvm", step)
    if backend not in STEP_BACKENDS:
        raise ValueError(f"unknown step backend {backend!r}; have {', '.join(STEP_BACKENDS)}")
    return backend, STEP_BACKENDS[backend](bundle)


# ------------------------------------------------------------------ the loop
def run(p: Problem, s: State, step: Step, *, out_of_energy: Callable[[], bool],
        on_step: Callable[[State, float], None] | None = None) -> bool:
    """Train from ``s.pos`` to the end (True), or until energy runs out (False)."""
    per_epoch = p.batches_per_epoch()
    pos = s.pos
    while pos["phase"] < len(p.phases):
        if "order" not in s.arrays:
            s.arrays["order"] = p.order(pos["phase"], pos["epoch"]).astype(np.int64)
        order = s.arrays["order"]
        i = pos["batch"]
        loss = step(p, s, order[i * p.bs : (i + 1) * p.bs], None)
        pos["steps"] += 1
        pos["batch"] += 1
        if pos["batch"] >= per_epoch:
            pos["batch"] = 0
            pos["epoch"] += 1
            del s.arrays["order"]
            if pos["epoch"] >= p.phases[pos["phase"]]:
                pos["epoch"] = 0
                pos["phase"] += 1
                pos["adam"] = 0
                if p.method == "packnet" and pos["phase"] == 1:
                    p.prune(s)
        if on_step is not None:
            on_step(s, loss)
        if pos["phase"] >= len(p.phases):
            return True
        if out_of_energy():
            return False
    return True


def save_checkpoint(path: Path, s: State, meta: dict) -> None:
    arrays = {k: np.asarray(v, order="C") for k, v in s.arrays.items()}
    data = st_save(arrays, metadata={"edgecl": "learn-checkpoint",
                                      "meta": json.dumps(meta, sort_keys=True),
                                      "pos": json.dumps(s.pos, sort_keys=True)})
    atomic_write_bytes(path, data)


def load_checkpoint(path: Path) -> tuple[State, dict]:
    raw = path.read_bytes()
    arrays = st_load(raw)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    md = header["__metadata__"]
    return State({k: np.array(v) for k, v in arrays.items()}, json.loads(md["pos"])), json.loads(md["meta"])
