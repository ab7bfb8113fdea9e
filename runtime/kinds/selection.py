"""Kinds that select entries of the shared backbone: weight bits, unit gates, soft masks,
hashed allocations. A task of these kinds runs on the backbone's graph and owns exactly
the entries it selects; every other entry stays free for later tasks."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..graph import Graph, MaskSite
from ..masks import materialize_bits, materialize_units, pack_bits, unpack_bits
from .base import Params, Resolve, TaskKind, TaskView, check_extra


def _select(weight: np.ndarray, keep: np.ndarray) -> np.ndarray:
    # select, never multiply: a masked-out entry is +0.0 whatever its sign (w * 0 can be
    # -0.0), so old outputs stay byte-identical when free entries change later
    return np.where(keep.reshape(weight.shape), weight, np.zeros((), weight.dtype))


class WeightBits(TaskKind):
    """One bit per masked weight (PackNet, SupSup, Piggyback): ``mask.<node>`` is uint8 of
    ``ceil(n / 8)`` bytes, bit ``i`` of the C-order flattened weight = bit ``i % 8``
    (least significant first) of byte ``i // 8``."""

    name = "weight_bits"
    prefixes = ("mask.",)
    learners = ("supsup", "packnet", "head", "hashing", "epi")

    def encode(self, parts: Mapping[str, np.ndarray], graph: Graph) -> dict[str, np.ndarray]:
        out = {}
        for k, v in parts.items():
            v = np.asarray(v)
            bits = k.startswith("mask.") and v.dtype == np.bool_
            out[k] = pack_bits(v) if bits else np.ascontiguousarray(v)
        return out

    def decode(self, view: TaskView) -> dict[str, np.ndarray]:
        out = dict(view.tensors)
        for s in self.sites(view):
            out[f"mask.{s.node}"] = unpack_bits(view.tensors[f"mask.{s.node}"], s.shape)
        return out

    def validate(self, view: TaskView) -> None:
        for s in self.sites(view):
            n = int(np.prod(s.shape))
            view.expect(f"mask.{s.node}", np.uint8, ((n + 7) // 8,))
        check_extra(view, self, {f"mask.{s.node}" for s in self.sites(view)})

    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        return {s.weight: materialize_bits(view.backbone[s.weight], view.tensors[f"mask.{s.node}"])
                for s in self.sites(view)}

    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        return {s.weight: unpack_bits(view.tensors[f"mask.{s.node}"], (int(np.prod(s.shape)),))
                for s in self.sites(view)}


class UnitGates(TaskKind):
    """One byte (0 or 1) per output unit of each masked weight (HAT): ``gate.<node>`` is
    uint8 of shape ``(units,)``; a closed unit zeroes its weight slice and its bias."""

    name = "unit_gates"
    prefixes = ("gate.",)

    def validate(self, view: TaskView) -> None:
        for s in self.sites(view):
            g = view.expect(f"gate.{s.node}", np.uint8, (s.units,))
            if g.size and int(g.max()) > 1:
                raise view.fail(f"gate.{s.node}", f"unit gates must be 0 or 1, found {int(g.max())}")
        check_extra(view, self, {f"gate.{s.node}" for s in self.sites(view)})

    @staticmethod
    def _apply(s: MaskSite, w: np.ndarray, gates: np.ndarray, bias: bool) -> np.ndarray:
        axis = 0 if bias else s.rule.unit_axis
        if axis == 0:
            return materialize_units(w, gates)
        shape = [1] * w.ndim
        shape[axis] = -1
        return _select(w, np.broadcast_to(gates.reshape(shape) != 0, w.shape))

    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        out = {}
        for s in self.sites(view):
            g = view.tensors[f"gate.{s.node}"]
            out[s.weight] = self._apply(s, view.backbone[s.weight], g, False)
            if s.bias is not None:
                out[s.bias] = self._apply(s, view.backbone[s.bias], g, True)
        return out

    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        out = {}
        for s in self.sites(view):
            keep = view.tensors[f"gate.{s.node}"] != 0
            shape = [1] * len(s.shape)
            shape[s.rule.unit_axis] = -1
            out[s.weight] = np.broadcast_to(keep.reshape(shape), s.shape).reshape(-1).copy()
            if s.bias is not None:
                out[s.bias] = keep.copy()
        return out


class SoftMask(TaskKind):
    """A real-valued mask in [0, 1] per masked weight (TSS-style soft masking):
    ``soft.<node>`` is float16 of the weight's shape; the task runs with ``W * m`` where
    ``m > 0`` and exactly +0.0 elsewhere, and owns the entries with ``m > 0``."""

    name = "soft_mask"
    prefixes = ("soft.",)

    def encode(self, parts: Mapping[str, np.ndarray], graph: Graph) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v, dtype=np.float16 if k.startswith("soft.") else None)
                for k, v in parts.items()}

    def validate(self, view: TaskView) -> None:
        for s in self.sites(view):
            key = f"soft.{s.node}"
            m = view.expect(key, np.float16, s.shape)
            if m.size and not (np.isfinite(m).all() and float(m.min()) >= 0.0 and float(m.max()) <= 1.0):
                bad = m[~(np.isfinite(m) & (m >= 0) & (m <= 1))]
                raise view.fail(key, f"a soft mask must lie in [0, 1]; found {float(bad.reshape(-1)[0])}")
        check_extra(view, self, {f"soft.{s.node}" for s in self.sites(view)})

    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        out = {}
        for s in self.sites(view):
            w = view.backbone[s.weight]
            m = np.asarray(view.tensors[f"soft.{s.node}"])
            out[s.weight] = _select(w * m.astype(w.dtype), m > 0)
        return out

    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        return {s.weight: (np.asarray(view.tensors[f"soft.{s.node}"]) > 0).reshape(-1)
                for s in self.sites(view)}


def task_seed(seed: int, t: int, site: int) -> int:
    """The uint32 hash seed of task ``t`` on mask site ``site`` of a run with ``seed`` (the
    hashing method's; here so the host method and the device learner share one)."""
    x = (int(seed) * 1_000_003 + (t + 1) * 0x9E3779B1 + (site + 1) * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    return x


def hash_mask(n: int, seed: int, threshold: int) -> np.ndarray:
    """Entry ``i`` of ``n`` is selected iff fmix32(i * 0x9E3779B1 + seed) < threshold
    (MurmurHash3's finalizer, in uint32 arithmetic: identical on every machine)."""
    with np.errstate(over="ignore"):
        h = np.arange(n, dtype=np.uint32) * np.uint32(0x9E3779B1) + np.uint32(seed)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h < np.uint32(threshold)


def hash_params(seed: int, density: float) -> np.ndarray:
    """The stored ``hash.<node>`` tensor for a seed and a fraction of entries to select."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    return np.array([seed & 0xFFFFFFFF, min(int(round(density * 2**32)), 2**32 - 1)], dtype=np.uint32)


class Hashed(TaskKind):
    """Hashed allocation: the entries a task owns are drawn by a seeded hash, so a task
    stores 8 bytes per masked weight tensor instead of a bit per weight. ``hash.<node>`` is
    uint32 ``(seed, threshold)``; entry ``i`` is selected iff ``hash_mask`` says so."""

    name = "hashed"
    prefixes = ("hash.",)

    def validate(self, view: TaskView) -> None:
        for s in self.sites(view):
            view.expect(f"hash.{s.node}", np.uint32, (2,))
        check_extra(view, self, {f"hash.{s.node}" for s in self.sites(view)})

    def _keep(self, view: TaskView, s: MaskSite) -> np.ndarray:
        seed, threshold = (int(v) for v in view.tensors[f"hash.{s.node}"])
        return hash_mask(int(np.prod(s.shape)), seed, threshold)

    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        out = {}
        for s in self.sites(view):
            w = view.backbone[s.weight]
            keep = self._keep(view, s)
            out[s.weight] = (materialize_bits(w, pack_bits(keep)) if w.dtype == np.float32
                             else _select(w, keep))
        return out

    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        return {s.weight: self._keep(view, s) for s in self.sites(view)}
