"""A hash chain: a task's entries recomputed from the hash seeds of every task up to it.

The ``hashed`` kind materializes one hash's picks; a task of the ``hashing`` method owns
only the picks no earlier task owns (collisions removed), so its set depends on the
earlier tasks' hashes. ``hash_chain`` stores them all, which keeps the task file self
contained and exact: ``chain.<node>`` is uint32 ``(k, 2)``, row ``j`` the ``(seed,
threshold)`` of the ``j``-th task of the chain (in learning order, this task last), and
``chain.mode`` uint8 ``(1,)``:

- mode 0 (nested): the task runs with, and owns, the union of all ``k`` rows' picks (its
  own entries and those of the earlier tasks, which equal their picks);
- mode 1 (own only): the last row's picks minus the union of the earlier rows' picks.

Entry ``i`` is picked by a row iff ``hash_mask`` says so (``fmix32(i*0x9E3779B1+seed) <
threshold``). 8 bytes per row per masked weight tensor, plus one: for a tensor of ``n``
entries ``64 k / n`` bits per weight instead of one.
"""

from __future__ import annotations

import numpy as np

from ..graph import MaskSite
from ..masks import materialize_bits, pack_bits
from .base import Params, Resolve, TaskKind, TaskView, check_extra
from .selection import hash_mask


def chain_mask(n: int, rows: np.ndarray, mode: int) -> np.ndarray:
    """The entries (flat bool of ``n``) a chain of ``(seed, threshold)`` rows selects."""
    earlier = np.zeros(n, dtype=bool)
    for seed, thr in rows[:-1]:
        earlier |= hash_mask(n, int(seed), int(thr))
    last = hash_mask(n, int(rows[-1][0]), int(rows[-1][1]))
    return earlier | last if mode == 0 else last & ~earlier


class HashChain(TaskKind):
    name = "hash_chain"
    prefixes = ("chain.",)

    def validate(self, view: TaskView) -> None:
        mode = view.expect("chain.mode", np.uint8, (1,))
        if int(mode[0]) > 1:
            raise view.fail("chain.mode", f"must be 0 (nested) or 1 (own only), found {int(mode[0])}")
        k = None
        for s in self.sites(view):
            key = f"chain.{s.node}"
            t = view.get(key)
            if t.dtype != np.uint32 or t.ndim != 2 or t.shape[1] != 2 or t.shape[0] < 1:
                raise view.fail(key, f"{t.dtype} of shape {tuple(t.shape)}; "
                                     "expected uint32 of shape (k, 2), k >= 1")
            if k is not None and t.shape[0] != k:
                raise view.fail(key, f"a chain of {t.shape[0]} rows; the other tensors have {k}")
            k = t.shape[0]
        check_extra(view, self, {"chain.mode"} | {f"chain.{s.node}" for s in self.sites(view)})

    def _keep(self, view: TaskView, s: MaskSite) -> np.ndarray:
        return chain_mask(int(np.prod(s.shape)), np.asarray(view.tensors[f"chain.{s.node}"]),
                          int(view.tensors["chain.mode"][0]))

    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        out = {}
        for s in self.sites(view):
            # masked-out entries selected to +0.0 (never multiplied), as every selection kind
            out[s.weight] = materialize_bits(view.backbone[s.weight], pack_bits(self._keep(view, s)))
        return out

    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        return {s.weight: self._keep(view, s) for s in self.sites(view)}
