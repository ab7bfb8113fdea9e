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

What a method differs in (its state, the weight a trained site runs with, its update,
its phases, its result) is its :class:`.methods.LearnMethod`; nothing here switches on
a method's name.

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

from .. import executor
from ..bundle_format import atomic_write_bytes
from ..graph import Graph, from_model
from . import planner
from . import train_numpy as T
from .methods import (  # noqa: F401 - SupSup's top-k, kept importable from here
    LEARN_METHODS,
    LearnMethod,
    TopK,
    adam,
    f32,
    get_method,
    kth_largest,
    ones_bits,
    topk_bits,
    topk_count,
    topk_mask,
)

# the host's hyperparameters per method (models/methods), so device and host learn alike
DEFAULTS = {name: dict(m.defaults) for name, m in LEARN_METHODS.items()}
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class State:
    arrays: dict[str, np.ndarray]
    pos: dict = field(default_factory=lambda: {"phase": 0, "epoch": 0, "batch": 0, "adam": 0,
                                               "steps": 0, "joules": 0.0, "seconds": 0.0})


def _as_graph(model: Graph | Mapping) -> Graph:
    return model if isinstance(model, Graph) else from_model(model)


class Problem:
    """What the child learns: the bundle's frozen parts, the data, the hyperparameters.

    ``graph`` is the bundle's model graph (or its manifest ``model`` entry); ``method`` a
    name in :data:`.methods.LEARN_METHODS` (or the method itself), which decides what is
    learned. The mask sites (``graph.mask_sites()``, by node name) are what a task masks;
    ``trainable`` are the sites this learning updates (:meth:`.LearnMethod.trainable`:
    supsup every site, packnet the sites with a free weight, head none) — or, with
    ``train_last=K``, only those among the last ``K`` sites. Sites before them are frozen:
    the forward runs through them, the backward never does; their mask in the new task is
    the method's (:meth:`.LearnMethod.frozen_weight`: all ones for supsup, the dense
    backbone weights; the union of the old tasks' masks for packnet, whose free weights
    stay free and unchanged).

    ``prefix_cache`` (numpy step, sites before the trained ones frozen): the values where
    the trained part starts (:func:`.train_numpy.cut`) are computed once per sample, at
    the first step, and kept (:meth:`start_values`); every step then runs only the
    trained part. The learner turns it off when the RAM plan has no room for it
    (:func:`.planner.prefix_cache_bytes`). The steps are the same bytes either way, unless
    the prefix holds a ``Linear`` on ``[batch, features]`` (see :mod:`.train_numpy`)."""

    def __init__(self, graph: Graph | Mapping, backbone: Mapping[str, np.ndarray],
                 owned: Mapping[str, np.ndarray | None],
                 x: np.ndarray, y: np.ndarray, n_classes: int, method: str | LearnMethod, hp: dict,
                 batch_size: int, seed: int, source: dict[str, np.ndarray] | None = None,
                 train_last: int | None = None, prefix_cache: bool = True,
                 source_params: Mapping[str, np.ndarray] | None = None) -> None:
        self.graph = _as_graph(graph)
        self.sites = self.graph.mask_sites()
        self.site = {s.node: s for s in self.sites}
        self.names = [s.node for s in self.sites]
        self.backbone = backbone
        self.x, self.y, self.n_classes = x, y, n_classes
        self.method = get_method(method)
        self.hp, self.bs, self.seed = hp, int(batch_size), int(seed)
        self.source = source  # head mode: the source task's file tensors and effective params
        self.source_params = source_params
        self.feat = int(self.graph.feature_dim)
        self.phases = self.method.phases(hp)
        if train_last is not None and int(train_last) < 1:
            raise ValueError(f"train_last must be at least 1 (the last K mask sites), got {train_last}")
        self.train_last = None if train_last is None else int(train_last)
        candidates = self.names if train_last is None else self.names[-int(train_last):]
        self.union: dict[str, np.ndarray] = {}  # site -> entries some old task owns (flat bool)
        if self.method.needs_owned:  # free = owned by no task (``session.owned_union``)
            for s in self.sites:
                size = math.prod(s.shape)
                u = owned.get(s.weight, np.zeros(size, dtype=bool))
                self.union[s.node] = np.ones(size, dtype=bool) if u is None else np.asarray(u, dtype=bool)
        self.trainable = self.method.trainable(self, candidates)
        # the parameters the backward differentiates: the trained sites' (effective) weights
        self.wanted = {self.site[n].weight for n in self.trainable}
        self._features = None
        self._frozen: dict[str, np.ndarray] | None = None
        # step caches (not state: a resumed run rebuilds them and takes the same steps)
        self.topk: dict[str, TopK] = {}
        self.buffers: dict[tuple[str, str], np.ndarray] = {}
        self.prefix_cache = bool(prefix_cache)
        self._starts: dict[str, np.ndarray] = {}  # start value -> [N, ...] (filled at once)
        # the samples the frozen prefix runs over at once (the cache's fill, an uncached step),
        # or, training no site, those whose features are computed at once
        self.chunk = planner.prefix_chunk(self.graph, self.wanted, self.bs) if self.wanted \
            else planner.feature_chunk(self.graph, self.bs)

    # -- state ---------------------------------------------------------------
    def initial(self) -> State:
        rng = np.random.default_rng([self.seed, 1])
        a: dict[str, np.ndarray] = {}
        self.method.init_sites(self, rng, a)
        bound = 1.0 / self.feat**0.5
        a["head.weight"] = f32(rng.uniform(-bound, bound, (self.n_classes, self.feat)))
        a["head.bias"] = f32(rng.uniform(-bound, bound, self.n_classes))
        self.reset_moments(a)
        return State(a)

    def opt_keys(self) -> list[str]:
        """The state keys Adam updates: the method's trained sites', then the head's."""
        return [*self.method.site_keys(self), "head.weight", "head.bias"]

    def reset_moments(self, a: dict) -> None:
        """Adam's moments to zero; every key whose entries all move gets its ``all.`` bits."""
        masked = set(self.method.site_keys(self)) if self.method.masked_update else set()
        for k in self.opt_keys():
            a[f"m.{k}"] = np.zeros_like(a[k])
            a[f"v.{k}"] = np.zeros_like(a[k])
            if k not in masked:
                a[f"all.{k}"] = ones_bits(a[k].size)

    def frozen_params(self) -> dict[str, np.ndarray]:
        """Every parameter the step does not train, as the new task will see it: backbone
        views, or the method's :meth:`~.LearnMethod.frozen_weight` (supsup's frozen sites:
        the dense weights; packnet's: the weights under the union of the old masks, what
        the new task's mask selects)."""
        if self._frozen is None:
            params = {name: self.backbone[name] for name in self.graph.params}
            for site in self.sites:
                w = self.method.frozen_weight(self, site)
                if w is not None:
                    params[site.weight] = w
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
        """Head mode: the source task's features of every sample, computed once,
        :attr:`chunk` samples at a time (a batch's, unless a batch's activations exceed the
        plan's slack: :func:`.planner.feature_chunk`)."""
        if self._features is None:
            params = self.source_params
            out = np.empty((len(self.x), self.feat), dtype=np.float32)
            for i in range(0, len(self.x), self.chunk):
                out[i : i + self.chunk] = executor.features(self.graph, params, self.x[i : i + self.chunk])
            self._features = out
        return self._features

    def start_values(self, idx: np.ndarray) -> dict[str, np.ndarray] | None:
        """The batch ``idx``'s values where the trained part starts (every name of
        ``train_numpy.cut(graph, wanted).starts``), from the per-sample cache, which the
        first call fills: the frozen prefix over every sample once, :attr:`chunk` samples
        at a time in sample order, so the cache is a function of the samples, the graph
        and the batch size only and a resumed run finds the same values. None when the
        cache is off or there is nothing to cache (the trained part starts at the input)."""
        if not self.prefix_cache or not self.wanted:
            return None
        c = T.cut(self.graph, self.wanted)
        names = c.cached(self.graph)
        if not names:
            return None
        if not self._starts:
            self._starts = T.prefix_values(self.graph, self.frozen_params(), self.x, self.wanted, self.chunk)
        out = {v: self._starts[v][idx] for v in names}
        if self.graph.input.name in c.starts:
            out[self.graph.input.name] = self.x[idx]
        return out

    # -- the result --------------------------------------------------------------
    def result(self, state: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """(the task file's tensors, the new backbone or None)."""
        a = state.arrays
        out = {"head.weight": a["head.weight"].copy(), "head.bias": a["head.bias"].copy()}
        parts, backbone = self.method.result(self, state)
        out.update(parts)
        return out, backbone


# ------------------------------------------------------------------ step functions
Step = Callable[[Problem, State, np.ndarray, np.ndarray], float]


def _step_params(p: Problem, s: State) -> dict[str, np.ndarray]:
    """Every parameter the step runs with (name -> array): the trained sites' weights
    (:meth:`.LearnMethod.step_weight`: the supermask's materialized weights for SupSup,
    the trainable weights for PackNet) and :meth:`Problem.frozen_params` for the rest."""
    params = dict(p.frozen_params())
    for n in p.trainable:
        params[p.site[n].weight] = p.method.step_weight(p, s, n)
    return params


def _apply(p: Problem, s: State, gw: Mapping[str, np.ndarray], ghw: np.ndarray, ghb: np.ndarray) -> None:
    """The masked Adam updates from dL/dW_eff (per trained site's weight parameter name)
    and the head's gradients."""
    a, t, lr = s.arrays, s.pos["adam"], float(p.hp["lr"])
    for n in p.trainable:
        p.method.update_site(p, s, n, gw[p.site[n].weight], lr, t)
    adam(a, "head.weight", ghw, a["all.head.weight"], lr, t)
    adam(a, "head.bias", ghb, a["all.head.bias"], lr, t)


def _head_step(p: Problem, s: State, idx: np.ndarray) -> float:
    """A method that trains no site: the head on the features, computed once."""
    a, t, lr = s.arrays, s.pos["adam"], float(p.hp["lr"])
    feats = p.features()[idx]
    logits = feats @ a["head.weight"].T + a["head.bias"]
    loss, g = T.cross_entropy(logits, p.y[idx])
    adam(a, "head.weight", g.T @ feats, a["all.head.weight"], lr, t)
    adam(a, "head.bias", g.sum(axis=0), a["all.head.bias"], lr, t)
    return loss


def _numpy_grads(p: Problem, params: dict, head: tuple, x: np.ndarray | None, y: np.ndarray,
                 start: dict[str, np.ndarray] | None = None):
    return T.grads(p.graph, params, head, x, y, p.wanted, start=start, chunk=p.chunk)


def _masked_step(grads_fn, *, prefix_cache: bool = False) -> Step:
    """A step: gradients from ``grads_fn(p, params, head, x, y) -> (loss, {trained weight
    parameter: dL/dW_eff}, dL/dhead.weight, dL/dhead.bias)``, then the masked updates.
    The state changes only once the gradients are there (a failed call leaves it as it was).
    ``prefix_cache``: ``grads_fn`` also takes ``start=`` (:meth:`Problem.start_values`) and
    gets it, with ``x=None``, whenever the problem has cached start values."""

    def step(p: Problem, s: State, idx: np.ndarray, _unused: np.ndarray | None = None) -> float:
        if not p.method.trains_sites:  # no backbone gradient: always numpy
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
                p.method.begin_phase(p, s, pos["phase"])  # packnet prunes before its retrain
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
