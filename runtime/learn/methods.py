"""The on-device learning methods: one registry, and no other code switches on a name.

    from edgecl.runtime.learn.methods import LEARN_METHODS, get_method
    m = get_method("packnet")
    m.defaults, m.needs_owned, m.changes_backbone, m.phases(hp)

A :class:`LearnMethod` holds everything one method differs in: its default
hyperparameters (the host's, so device and host learn alike), its phases, which mask sites
it trains and what it needs to know about the bundle (the owned-entries union, a source
task), its initial state and the keys the optimizer updates, the weight a trained site runs
with in a step and how a site's gradient updates the state, what happens between phases,
what it exports (the task's tensors, maybe a new backbone), the task kind it produces, and
its terms of the RAM plan. :class:`.trainer.Problem`, the step functions, :mod:`.planner`,
:mod:`.learner` and :mod:`.child` ask the method; a new method is one subclass here and one
entry in :data:`LEARN_METHODS` (and its name in the ``learners`` of the task kinds it can
make, ``runtime/kinds``).

The state of a learning run (``State.arrays``) names its arrays by the method's
``state_prefix`` and the site's node (``scores.fc1``, ``weight.fc1``), the head
(``head.weight``, ``head.bias``), Adam's moments (``m.<key>``, ``v.<key>``) and the update
masks (``all.<key>`` for a key every entry of which moves, ``free.<node>`` for a masked
update). Checkpoints hold exactly these, so the names are part of the format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ... import kernels
from ..kinds.selection import hash_mask, hash_params, task_seed
from ..masks import materialize_bits, pack_bits, unpack_bits

if TYPE_CHECKING:
    from ..graph import MaskSite
    from .trainer import Problem, State


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32, order="C")


def ones_bits(n: int) -> np.ndarray:
    return pack_bits(np.ones(n, dtype=bool))


def adam(a: dict, key: str, grad: np.ndarray, bits: np.ndarray, lr: float, t: int) -> None:
    """Masked Adam on state array ``key`` (only the entries whose bit is set move)."""
    kernels.masked_adam_(a[key], f32(grad), a[f"m.{key}"], a[f"v.{key}"], bits, lr, t)


# ------------------------------------------------------------------ SupSup's top-k
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


# ------------------------------------------------------------------ the methods
class LearnMethod:
    """What one on-device learning method differs in (see the module docstring). The
    defaults here are a method that trains every candidate site with an unmasked Adam
    update, in one phase, and exports a ``weight_bits`` task."""

    name: ClassVar[str]
    # the host's hyperparameters (models/methods); ``epochs`` and ``lr`` always present
    defaults: ClassVar[dict[str, float]]
    # whether it trains mask sites (gradients through the backbone); head: no, a head on
    # frozen features computed once
    trains_sites: ClassVar[bool] = True
    # whether it needs the entries old tasks own (``session.owned_union``): PackNet trains
    # the free ones
    needs_owned: ClassVar[bool] = False
    # whether it learns on an existing task's parameters (``--source-task``)
    needs_source: ClassVar[bool] = False
    # whether its result holds a new backbone (then every owned entry is checked unchanged)
    changes_backbone: ClassVar[bool] = False
    # the state key of a trained site: ``state_prefix + node``
    state_prefix: ClassVar[str] = "weight."
    # whether a site's update is masked (``free.<node>``) rather than every entry moving
    masked_update: ClassVar[bool] = False
    # the task kind it makes; None: the source task's own kind (its parts are copied)
    produces: ClassVar[str | None] = "weight_bits"
    # RAM plan, bytes per trained weight: state the method keeps besides the trained
    # weight's copy (SupSup's scores), and gradients (dL/dW_eff, SupSup's score gradient)
    plan_state_bytes: ClassVar[int] = 0
    plan_grad_bytes: ClassVar[int] = 4

    def __repr__(self) -> str:
        return f"<learn method {self.name}>"

    # -- what it learns --------------------------------------------------------------
    def task_kind(self, source_kind: str | None) -> str:
        """The kind of the task it makes (from a source task of ``source_kind``)."""
        return source_kind if self.produces is None else self.produces

    def phases(self, hp: Mapping) -> list[int]:
        """Epochs per phase."""
        return [int(hp["epochs"])]

    def trainable(self, p: Problem, candidates: Sequence[str]) -> list[str]:
        """The sites it trains among ``candidates`` (every site, or the last K)."""
        return list(candidates) if self.trains_sites else []

    def nothing_to_train(self, train_last: int | None) -> str | None:
        """Why learning cannot start when :meth:`trainable` is empty (None: it can)."""
        return None

    # -- state ---------------------------------------------------------------------
    def init_sites(self, p: Problem, rng: np.random.Generator, a: dict[str, np.ndarray]) -> None:
        """The trained sites' initial state (drawn before the head's, from the same rng)."""

    def site_keys(self, p: Problem) -> list[str]:
        """The state keys Adam updates for the trained sites."""
        return [self.state_prefix + n for n in p.trainable]

    def frozen_weight(self, p: Problem, site: MaskSite) -> np.ndarray | None:
        """A site it does not train, as the new task will see it (None: the backbone's)."""
        return None

    # -- a step ----------------------------------------------------------------------
    def step_weight(self, p: Problem, s: State, n: str) -> np.ndarray:
        """The weight trained site ``n`` runs with in this step."""
        return s.arrays[self.state_prefix + n]

    def update_site(self, p: Problem, s: State, n: str, g: np.ndarray, lr: float, t: int) -> None:
        """The Adam update of site ``n`` from ``g`` = dL/dW_eff."""
        key = self.state_prefix + n
        bits = s.arrays[f"free.{n}"] if self.masked_update else s.arrays[f"all.{key}"]
        adam(s.arrays, key, g, bits, lr, t)

    def begin_phase(self, p: Problem, s: State, phase: int) -> None:
        """Called when phase ``phase`` (1, 2, ...) starts (or the last one ends)."""

    # -- the result --------------------------------------------------------------------
    def result(self, p: Problem, s: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """(the task file's tensors besides the head, the new backbone or None)."""
        raise NotImplementedError

    # -- RAM plan ----------------------------------------------------------------------
    def plan_weights(self, n_weights: int, n_trained: int, backbone_bytes: int) -> int:
        """Bytes of weights beyond the mapped backbone, the trained sites' copies and the
        packed masks that every method holds."""
        return 0

    def plan_sites(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, int, int]:
        """Bytes of (its state, gradients, optimizer state) for trained sites whose weights
        are ``shapes``, each as ``(units, fan_in)``; default: per trained weight
        ``plan_state_bytes``, ``plan_grad_bytes`` and Adam's two moments."""
        n = sum(math.prod(s) for s in shapes)
        return self.plan_state_bytes * n, self.plan_grad_bytes * n, 8 * n


class SupSup(LearnMethod):
    """Real-valued scores per weight of the trained sites; the mask is their top
    ``density`` (straight-through); the backbone is never changed. Frozen sites keep the
    dense weights (an all-ones mask)."""

    name = "supsup"
    defaults = {"epochs": 30, "lr": 1e-2, "density": 0.5}
    state_prefix = "scores."
    plan_state_bytes = 4  # the scores
    plan_grad_bytes = 8  # dL/dW_eff and the straight-through score gradient

    def init_sites(self, p: Problem, rng: np.random.Generator, a: dict[str, np.ndarray]) -> None:
        for n in p.trainable:
            shape = p.site[n].shape
            bound = (6.0 / max(1, math.prod(shape[1:]))) ** 0.5  # kaiming uniform, as edge-popup
            a[f"scores.{n}"] = f32(rng.uniform(-bound, bound, shape))

    def step_weight(self, p: Problem, s: State, n: str) -> np.ndarray:
        """Site ``n``'s weight under the current supermask: the exact top-``density``
        scores (:class:`TopK`), packed and materialized by the kernels (+0.0 where
        dropped, as the runtime does), into a buffer reused from step to step."""
        flat = s.arrays[f"scores.{n}"].reshape(-1)
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

    def update_site(self, p: Problem, s: State, n: str, g: np.ndarray, lr: float, t: int) -> None:
        # straight-through: d(w*m)/dm = w goes to the scores
        key, w = f"scores.{n}", p.backbone[p.site[n].weight]
        grad = p.buffers.get(("g", n))
        if grad is None:
            grad = p.buffers[("g", n)] = np.empty(w.shape, np.float32)
        np.multiply(g, w, out=grad)
        adam(s.arrays, key, grad, s.arrays[f"all.{key}"], lr, t)

    def result(self, p: Problem, s: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        out = {}
        for site in p.sites:
            if site.node in p.trainable:
                out[f"mask.{site.node}"] = topk_bits(s.arrays[f"scores.{site.node}"], float(p.hp["density"]))
            else:  # a frozen site: the dense backbone weights
                out[f"mask.{site.node}"] = ones_bits(math.prod(site.shape))
        return out, None


class PackNet(LearnMethod):
    """The free weights (owned by no task) of the trained sites, then a prune to the
    largest ``1 - prune`` of them and a retrain phase; the new backbone differs from the
    old in free weights only, and the task's mask is the old union plus what it kept."""

    name = "packnet"
    defaults = {"epochs": 30, "lr": 1e-3, "prune": 0.6, "retrain_epochs": 10}
    needs_owned = True
    changes_backbone = True
    masked_update = True

    def phases(self, hp: Mapping) -> list[int]:
        return [int(hp["epochs"]), int(hp["retrain_epochs"])]

    def trainable(self, p: Problem, candidates: Sequence[str]) -> list[str]:
        return [n for n in candidates if not p.union[n].all()]

    def nothing_to_train(self, train_last: int | None) -> str | None:
        where = "" if train_last is None else f" in the last {train_last} mask site(s)"
        return f"no free weights left{where}: every weight is owned by a task"

    def init_sites(self, p: Problem, rng: np.random.Generator, a: dict[str, np.ndarray]) -> None:
        for n in p.trainable:
            a[f"weight.{n}"] = np.array(p.backbone[p.site[n].weight], dtype=np.float32)
            a[f"free.{n}"] = pack_bits(~p.union[n])

    def frozen_weight(self, p: Problem, site: MaskSite) -> np.ndarray | None:
        # owned by the old tasks only: the weights under their union (what the new mask selects)
        if site.node in p.trainable or p.union[site.node].all():
            return None
        return materialize_bits(p.backbone[site.weight], pack_bits(p.union[site.node]))

    def begin_phase(self, p: Problem, s: State, phase: int) -> None:
        if phase == 1:
            self.prune(p, s)

    def prune(self, p: Problem, s: State) -> None:
        """Between the phases: keep the largest free weights, zero the rest (+0.0)."""
        a = s.arrays
        for n in p.trainable:
            w = a[f"weight.{n}"]
            cand = ~p.union[n]
            k = int(round(int(cand.sum()) * (1.0 - float(p.hp["prune"]))))
            keep = np.zeros(w.size, dtype=bool)
            if k > 0:
                mags = np.where(cand, np.abs(w.reshape(-1)), np.float32(-1.0))
                keep[np.argpartition(-mags, k - 1)[:k]] = True
            flat = w.reshape(-1)
            flat[cand & ~keep] = np.float32(0.0)
            a[f"keep.{n}"] = pack_bits(keep)
            a[f"free.{n}"] = a[f"keep.{n}"].copy()  # retrain only what this task kept
        p.reset_moments(a)

    def result(self, p: Problem, s: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        a, out = s.arrays, {}
        backbone = dict(p.backbone)  # untouched tensors stay what they are (mapped views)
        for site in p.sites:
            n = site.node
            if n in p.trainable:
                w = a[f"weight.{n}"]
                keep = unpack_bits(a[f"keep.{n}"], (w.size,))
                out[f"mask.{n}"] = pack_bits(p.union[n] | keep)
                backbone[site.weight] = w.copy()
            else:  # owned by the old tasks only; its free weights stay free
                out[f"mask.{n}"] = pack_bits(p.union[n])
        return out, backbone

    def plan_weights(self, n_weights: int, n_trained: int, backbone_bytes: int) -> int:
        # the frozen sites under the old union, and the new backbone, serialized
        return 4 * (n_weights - n_trained) + backbone_bytes


class Head(LearnMethod):
    """A new head on an existing task's frozen features (``--source-task``, default the
    newest); the task file copies that task's parts, whatever its kind."""

    name = "head"
    defaults = {"epochs": 30, "lr": 1e-2}
    trains_sites = False
    needs_source = True
    produces = None

    def result(self, p: Problem, s: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        # the source task's own parts, whatever its kind; only the head is new
        return {k: v.copy() for k, v in p.source.items() if not k.startswith("head.")}, None


class LoRA(LearnMethod):
    """A low-rank pair per trained site on the frozen backbone (the host's ``lora``): the
    site runs with ``W + (alpha / rank) * B @ A`` (the weight as ``(units, fan_in)`` along
    its unit axis, as the ``lora`` kind runs it); ``A`` starts uniform in
    ``+-1/sqrt(fan_in)``, ``B`` at zero; Adam on ``A``, ``B`` and the head. The backbone
    is never changed. From dL/dW_eff ``G``: dL/dA = scale B^T G, dL/dB = scale G A^T."""

    name = "lora"
    defaults = {"epochs": 30, "lr": 1e-2, "rank": 4, "alpha": 4.0}
    state_prefix = "lora."
    produces = "lora"

    @staticmethod
    def _dims(site: MaskSite) -> tuple[int, int]:
        return site.units, math.prod(site.shape) // site.units

    def _scale(self, p: Problem) -> np.float32:
        return np.float32(float(p.hp["alpha"]) / int(p.hp["rank"]))

    def init_sites(self, p: Problem, rng: np.random.Generator, a: dict[str, np.ndarray]) -> None:
        r = int(p.hp["rank"])
        for n in p.trainable:
            units, fan_in = self._dims(p.site[n])
            bound = 1.0 / fan_in**0.5
            a[f"lora.{n}.a"] = f32(rng.uniform(-bound, bound, (r, fan_in)))
            a[f"lora.{n}.b"] = np.zeros((units, r), np.float32)

    def site_keys(self, p: Problem) -> list[str]:
        return [f"lora.{n}.{part}" for n in p.trainable for part in "ab"]

    def step_weight(self, p: Problem, s: State, n: str) -> np.ndarray:
        """``W + scale * (B @ A)`` in the kind's order of float32 operations."""
        site = p.site[n]
        a, b = s.arrays[f"lora.{n}.a"], s.arrays[f"lora.{n}.b"]
        w = np.asarray(p.backbone[site.weight], dtype=np.float32)
        units, fan_in = self._dims(site)
        moved = np.moveaxis(w, site.rule.unit_axis, 0).reshape(units, fan_in)
        delta = b @ a
        delta *= self._scale(p)  # in place: the same float32 products as scale * (b @ a)
        out = moved + delta
        rest = tuple(np.delete(site.shape, site.rule.unit_axis))
        return np.ascontiguousarray(np.moveaxis(out.reshape((units, *rest)), 0, site.rule.unit_axis))

    def update_site(self, p: Problem, s: State, n: str, g: np.ndarray, lr: float, t: int) -> None:
        site = p.site[n]
        units, fan_in = self._dims(site)
        gm = np.moveaxis(np.asarray(g, dtype=np.float32), site.rule.unit_axis, 0).reshape(units, fan_in)
        a, b, scale = s.arrays[f"lora.{n}.a"], s.arrays[f"lora.{n}.b"], self._scale(p)
        ga = scale * (b.T @ gm)  # both from the pair before this step
        gb = scale * (gm @ a.T)
        for part, grad in (("a", ga), ("b", gb)):
            key = f"lora.{n}.{part}"
            adam(s.arrays, key, grad, s.arrays[f"all.{key}"], lr, t)

    def result(self, p: Problem, s: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        out = {"lora.scale": np.array([self._scale(p)], dtype=np.float32)}
        for n in p.trainable:
            for part in "ab":
                out[f"lora.{n}.{part}"] = s.arrays[f"lora.{n}.{part}"].copy()
        return out, None

    def plan_sites(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, int, int]:
        # per site: A and B (r * (fan_in + units) floats), their gradients, Adam's two moments
        # and the all-bits; dL/dW_eff and the product B @ A are full-size, 4 bytes a weight each
        r = int(self.defaults["rank"])
        k = sum(r * (s[0] + math.prod(s) // s[0]) for s in shapes)
        n = sum(math.prod(s) for s in shapes)
        return 4 * k, 4 * k + 8 * n, 8 * k + k // 8 + 2 * len(shapes)


def _learn_error(msg: str) -> Exception:
    from .learner import LearnError  # here: the learner imports this module

    return LearnError(msg)


def _bits_to(w: np.ndarray, bits: np.ndarray, p: Problem, n: str) -> np.ndarray:
    """``w`` where ``bits`` is set, +0.0 elsewhere (the kernels' selection, as the runtime
    activates a task), into a buffer reused from step to step."""
    out = p.buffers.get(("w", n))
    if out is None:
        out = p.buffers[("w", n)] = np.empty(w.shape, np.float32)
    return kernels.materialize_bits(w, bits, out=out)


class Hashing(PackNet):
    """The host's ``hashing`` (docs/method-hashing.md): task ``T``'s hash (seed
    ``task_seed(seed, T, site)``, threshold ``density * 2**32``) picks entries of every mask
    site; the picks no older task owns (collisions removed) are the task's own, the only
    weights it trains (with the head, in one phase); it runs with them and the older tasks'
    entries (``reuse=1``) or with them alone (``reuse=0``). The new backbone differs from
    the old in the task's own entries only.

    ``T`` and the run's seed are not in the bundle: ``seed`` is the learner's (``--seed``,
    which must be the host run's; both default to 0), and ``T`` is the number of tasks
    whose picks the owned entries are. The owned entries must be exactly the union of the
    picks of tasks ``0..T-1`` (else the learning is refused: another seed or density, or
    tasks another method made), so the new task selects exactly what the host's task ``T``
    would. A site outside ``--train-last`` still holds its picks (untrained)."""

    name = "hashing"
    defaults = {"epochs": 30, "lr": 2e-3, "density": 0.3, "reuse": 1}
    plan_state_bytes = 4  # the step's weight under the run mask
    phases = LearnMethod.phases  # one phase, no retrain

    def begin_phase(self, p: Problem, s: State, phase: int) -> None:
        """One phase: nothing in between (no prune)."""

    def trainable(self, p: Problem, candidates: Sequence[str]) -> list[str]:
        own, _ = self.allocate(p)
        return [n for n in candidates if own[n].any()]

    def nothing_to_train(self, train_last: int | None) -> str | None:
        where = "" if train_last is None else f" in the last {train_last} mask site(s)"
        return f"the new task's hash picks no free weight{where}: every pick is owned by a task"

    def allocate(self, p: Problem) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per site: the new task's own entries (flat bool: its hash's picks that no task
        owns) and its run mask's packed bits; refused unless the owned entries are exactly
        the older tasks' picks (see the class docstring)."""
        density, reuse = float(p.hp["density"]), int(p.hp["reuse"])
        if reuse not in (0, 1):
            raise _learn_error(f"--method hashing: reuse must be 0 or 1, got {p.hp['reuse']}")
        thr = int(hash_params(0, density)[1])
        size = {s.node: math.prod(s.shape) for s in p.sites}

        def picks(t: int) -> dict[str, np.ndarray]:
            return {n: hash_mask(size[n], task_seed(p.seed, t, i), thr) for i, n in enumerate(p.names)}

        seen = {n: np.zeros(size[n], dtype=bool) for n in p.names}
        t, new = 0, picks(0)
        # task t's picks all owned (and adding entries): an older task's; the first that is
        # not is the new task's
        while all(not (new[n] & ~p.union[n]).any() for n in p.names) and any(
                (new[n] & ~seen[n]).any() for n in p.names):
            seen = {n: seen[n] | new[n] for n in p.names}
            t += 1
            new = picks(t)
        wrong = [n for n in p.names if not np.array_equal(seen[n], p.union[n])]
        if wrong:
            n = wrong[0]
            extra = int((p.union[n] & ~seen[n]).sum())
            raise _learn_error(
                f"--method hashing: the entries the bundle's tasks own are not the hash picks of its "
                f"tasks under seed {p.seed} at density {density:g} (the first {t} task(s) explained; "
                f"site {n}: {extra} owned entries no pick explains); learn with the host run's "
                f"--seed, or another --method")
        own = {n: new[n] & ~p.union[n] for n in p.names}
        return own, {n: pack_bits(own[n] | p.union[n] if reuse else own[n]) for n in p.names}

    def _run_bits(self, p: Problem, n: str) -> np.ndarray:
        """Site ``n``'s run mask, packed (computed once per problem)."""
        if ("run", n) not in p.buffers:
            own, run = self.allocate(p)
            for m in p.names:
                p.buffers[("own", m)], p.buffers[("run", m)] = own[m], run[m]
        return p.buffers[("run", n)]

    def init_sites(self, p: Problem, rng: np.random.Generator, a: dict[str, np.ndarray]) -> None:
        super().init_sites(p, rng, a)
        for n in p.trainable:  # only its own entries move; they are what it keeps
            self._run_bits(p, n)
            a[f"free.{n}"] = pack_bits(p.buffers[("own", n)])
            a[f"keep.{n}"] = a[f"free.{n}"].copy()

    def frozen_weight(self, p: Problem, site: MaskSite) -> np.ndarray | None:
        if site.node in p.trainable:
            return None
        return materialize_bits(p.backbone[site.weight], self._run_bits(p, site.node))

    def step_weight(self, p: Problem, s: State, n: str) -> np.ndarray:
        return _bits_to(s.arrays[f"weight.{n}"], self._run_bits(p, n), p, n)

    def result(self, p: Problem, s: State) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        out, backbone = super().result(p, s)
        for n in p.names:  # every site: the run mask (reuse=0: its own entries only)
            out[f"mask.{n}"] = self._run_bits(p, n).copy()
        return out, backbone


class EPI(PackNet):
    """The host's ``epi`` (docs/method-epi.md): the free weights train (straight-through,
    in one phase) while each one's importance, an EMA of ``|g * w|`` (``g`` = dL/dW_eff),
    accumulates; every ``update_every`` steps, up to the last ``fixed_frac`` of them, each
    site protects its most important free weights (a density ramping from 1 to ``keep``
    over ``ramp_frac`` of the steps) and releases protected ones whose importance fell
    below ``release_ratio`` of the threshold. Until the first update the task runs dense
    (every weight); then with the old tasks' entries and its protected ones. At the end
    the protected set is the task's (``keep.<node>``): its mask is the old union plus it,
    as PackNet's, and the new backbone differs in free weights only. (The host's release
    mode, which shrinks committed tasks, is not the device's: it never changes a task.)"""

    name = "epi"
    defaults = {"epochs": 30, "lr": 1e-3, "keep": 0.4, "update_every": 10, "ema": 0.9,
                "release_ratio": 0.5, "ramp_frac": 0.5, "fixed_frac": 0.25}
    plan_state_bytes = 8  # the importance, the step's weight under the mask
    plan_grad_bytes = 8  # dL/dW_eff and |g * w|
    phases = LearnMethod.phases  # one phase, no retrain

    # -- the schedule, in steps (the host's) ----------------------------------------------
    @staticmethod
    def _every(p: Problem) -> int:
        return max(1, int(p.hp["update_every"]))

    @staticmethod
    def _ramp_end(p: Problem) -> int:
        return max(1, int(p.total_steps() * float(p.hp["ramp_frac"])))

    @staticmethod
    def _fixed_from(p: Problem) -> int:
        return int(p.total_steps() * (1.0 - float(p.hp["fixed_frac"])))

    def _density(self, p: Problem, step: int) -> float:
        """Cubic ramp (Zhu & Gupta) from 1 to ``keep``: fast early, gentle late."""
        keep = float(p.hp["keep"])
        return keep + (1.0 - keep) * (1.0 - min(1.0, step / self._ramp_end(p))) ** 3

    def _updated(self, p: Problem, steps: int) -> bool:
        """Whether the mask was updated within the first ``steps`` steps."""
        return min(steps, self._fixed_from(p)) >= self._every(p)

    # -- state and a step ----------------------------------------------------------------
    def init_sites(self, p: Problem, rng: np.random.Generator, a: dict[str, np.ndarray]) -> None:
        super().init_sites(p, rng, a)
        for n in p.trainable:
            a[f"imp.{n}"] = np.zeros(p.site[n].shape, np.float32)
            a[f"keep.{n}"] = pack_bits(np.zeros(math.prod(p.site[n].shape), dtype=bool))

    def step_weight(self, p: Problem, s: State, n: str) -> np.ndarray:
        w = s.arrays[f"weight.{n}"]
        if not self._updated(p, int(s.pos["adam"])):  # before the first update: dense
            return w
        bits = p.buffers.get(("active", n))
        if bits is None:  # a resumed run: from the state
            kept = unpack_bits(s.arrays[f"keep.{n}"], (w.size,))
            bits = p.buffers[("active", n)] = pack_bits(p.union[n] | kept)
        return _bits_to(w, bits, p, n)

    def update_site(self, p: Problem, s: State, n: str, g: np.ndarray, lr: float, t: int) -> None:
        a = s.arrays
        w, imp = a[f"weight.{n}"], a[f"imp.{n}"]
        beta = np.float32(p.hp["ema"])
        # importance of the free weights, from the weights before this step
        term = np.where(p.union[n].reshape(w.shape), np.float32(0.0), np.abs(f32(g) * w))
        imp *= beta
        imp += np.float32(1.0 - float(p.hp["ema"])) * term
        super().update_site(p, s, n, g, lr, t)
        if t % self._every(p) == 0 and t <= self._fixed_from(p):
            self.update_mask(p, s, n, t)

    def update_mask(self, p: Problem, s: State, n: str, step: int) -> None:
        """Site ``n``'s protected set at ``step``: the top ``density(step)`` of its free
        weights by importance, those protected whose importance stayed at or above
        ``release_ratio`` x the threshold first (hysteresis)."""
        a = s.arrays
        cand = ~p.union[n]
        n_c = int(cand.sum())
        k = max(1, int(round(self._density(p, step) * n_c)))
        imp = a[f"imp.{n}"].reshape(-1)
        score = np.where(cand, imp, np.float32(-1.0))
        tau = kth_largest(score, k)
        stay = unpack_bits(a[f"keep.{n}"], (imp.size,)) & (imp >= np.float32(p.hp["release_ratio"]) * tau)
        pri = np.where(stay, score + score.max() + np.float32(1.0), score)
        new = topk_mask(pri, k) & cand
        a[f"keep.{n}"] = pack_bits(new)
        p.buffers[("active", n)] = pack_bits(p.union[n] | new)

    def begin_phase(self, p: Problem, s: State, phase: int) -> None:
        """The end: too few steps for the schedule (no update, or one above ``keep``)
        ends at the target density, as the host does."""
        total = p.total_steps()
        if not self._updated(p, total) or self._density(p, total) > float(p.hp["keep"]) + 1e-6:
            for n in p.trainable:
                self.update_mask(p, s, n, self._ramp_end(p))


LEARN_METHODS: dict[str, LearnMethod] = {m.name: m for m in (SupSup(), PackNet(), Head(), LoRA(), Hashing(),
                                                                   EPI())}


def get_method(method: str | LearnMethod) -> LearnMethod:
    """The registered method of that name (a :class:`LearnMethod` passes through)."""
    if isinstance(method, LearnMethod):
        return method
    try:
        return LEARN_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(LEARN_METHODS)}") from None


def site_trainers() -> list[str]:
    """The methods that train mask sites (``--train-last`` applies to them)."""
    return [m.name for m in LEARN_METHODS.values() if m.trains_sites]
