"""Parameter hashing: each task addresses the shared weight table through its own hash.

Task t draws, per masked weight tensor of ``n`` entries, a hash seed ``seed_t`` (derived
from the run's seed, the task index and the tensor) and selects the entries
``hash_mask(n, seed_t, threshold)`` picks (``edgecl.runtime.kinds.hash_mask``: MurmurHash3's
finalizer, identical on every machine; ``threshold = density * 2**32``). An entry the hash
picks that an earlier task already owns is a *collision*: the task keeps only the free
ones, so the tasks' logical parameter sets never overlap. ``owner[w]`` is 0 for a free
entry, else the 1-based index of the task that owns it.

The task trains only its own entries (with the head; biases and other non-masked
parameters train with the first task only, then freeze, as in PackNet), and runs with
the union of its own entries and those of every earlier task (``reuse=1``, the default:
earlier tasks' frozen weights are features it builds on, which is what buys accuracy at
a small density), or with its own entries only (``reuse=0``: full isolation, each task a
disjoint random sparse subnetwork). Earlier tasks' entries are written back after every
optimizer step, so their outputs stay byte-identical: exact zero forgetting.

Storage. By default (``store=0``) the bundle stores the task's run mask as ``weight_bits``
(1 bit per weight, exact; every backend and the on-device learner read it). The ``hashed``
kind (8 bytes per tensor) cannot hold it exactly: it materializes one hash's picks without
removing earlier tasks' entries. ``store=1`` stores the ``hash_chain`` kind
(``edgecl.runtime.kinds.hashing``): the (seed, threshold) rows of tasks 1..t per tensor,
from which the runtime recomputes the exact set (``64 t`` bits per tensor, plus a mode
byte); that kind must be registered in ``edgecl.runtime.kinds.KINDS`` to be used.

Reported per task (``task_metrics``): ``collision_rate`` (share of the hash's picks
already owned), ``own_density`` (share of all masked weights the task owns),
``run_density`` (share it runs with), ``free_frac`` and ``fragmentation`` after the
task (1 - longest free run / free entries, per tensor, weighted by free entries), and
the storage figures.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.runtime.kinds import hash_mask, hash_params
from edgecl.runtime.kinds.hashing import HashChain, chain_mask
from edgecl.runtime.kinds.selection import task_seed

from ..data import Task
from ..torchnet import Params
from .base import MASK_BITS, Method, free_fraction

HASH_CHAIN = HashChain.name
_METRIC_KEYS = ("hash_picks", "collisions", "collision_rate", "own_density", "run_density",
                "free_frac", "fragmentation", "hashed_bits_per_weight", "chain_bits_per_weight")


def _longest_run(free: np.ndarray) -> int:
    """Longest run of True in a 1-D bool array."""
    if not free.any():
        return 0
    d = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return int((ends - starts).max())


class Hashing(Method):
    name = "hashing"
    kind = MASK_BITS
    defaults = {"epochs": 30, "batch_size": 32, "lr": 2e-3,
                "density": 0.3,   # fraction of a tensor's entries each task's hash picks
                "reuse": 1,       # 1: a task runs with earlier tasks' entries too; 0: its own only
                "store": 0}       # 0: weight_bits (1 bit/weight); 1: hash_chain (8 bytes/tensor/task)

    def __init__(self, graph, seed: int = 0, backbone: dict[str, np.ndarray] | None = None,
                 **hp: float) -> None:
        super().__init__(graph, seed, backbone, **hp)
        if not 0.0 < float(self.hp["density"]) <= 1.0:
            raise ValueError(f"{self.name}: density must lie in (0, 1], got {self.hp['density']}")
        if int(self.hp["store"]) == 1:
            self.kind = HASH_CHAIN  # the instance's kind: what the bundle records
        self.owner = {s.node: torch.zeros(s.shape, dtype=torch.int16) for s in self.sites}
        self.weight_of = {s.node: s.weight for s in self.sites}
        self.metrics: list[dict[str, float]] = []

    # -- selections ------------------------------------------------------------------
    def hash_seeds(self, t: int) -> dict[str, int]:
        return {s.node: task_seed(self.seed, t, i) for i, s in enumerate(self.sites)}

    def hash_selection(self, t: int) -> dict[str, torch.Tensor]:
        """What task t's hash picks, before collisions are removed (bool, weight shape)."""
        thr = int(hash_params(0, float(self.hp["density"]))[1])
        out = {}
        for n, seed in self.hash_seeds(t).items():
            shape = self.owner[n].shape
            out[n] = torch.from_numpy(hash_mask(int(np.prod(shape)), seed, thr).reshape(shape))
        return out

    def _mask(self, t: int) -> dict[str, torch.Tensor]:
        """The entries task t runs with."""
        if int(self.hp["reuse"]):
            return {n: (own > 0) & (own <= t + 1) for n, own in self.owner.items()}
        return {n: own == t + 1 for n, own in self.owner.items()}

    def _masked(self, mask: dict[str, torch.Tensor]) -> Params:
        out = {}
        for n, keep in mask.items():  # selection, not product: masked-out is +0.0 whatever the sign
            w = self.params[self.weight_of[n]]
            out[self.weight_of[n]] = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
        return out

    def task_params(self, t: int) -> Params:
        return self._masked(self._mask(t))  # the task being learned already owns its entries

    # -- learning ----------------------------------------------------------------------
    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        self._new_head(task.n_classes, gen)
        t = len(self.heads) - 1
        picks = self.hash_selection(t)
        n_pick = n_coll = 0
        for n, own in self.owner.items():  # allocate: the hash's picks that are still free
            n_pick += int(picks[n].sum())
            n_coll += int((picks[n] & (own > 0)).sum())
            own[picks[n] & (own == 0)] = t + 1
        self.metrics.append({k: 0.0 for k in _METRIC_KEYS}
                            | {"hash_picks": float(n_pick), "collisions": float(n_coll),
                               "collision_rate": n_coll / max(1, n_pick)})

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        first = t == 0
        names = list(self.owner)
        mine = {n: own == t + 1 for n, own in self.owner.items()}
        run_mask = self._mask(t)
        ws = {n: self.params[self.weight_of[n]].clone().requires_grad_(True) for n in names}
        old_w = {n: self.params[self.weight_of[n]].clone() for n in names}
        masked = set(self.weight_of.values())
        rest = {k: v.clone().requires_grad_(first) for k, v in self.params.items() if k not in masked}
        frozen_rest = {k: v.detach().clone() for k, v in rest.items()}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        opt = torch.optim.Adam(list(ws.values()) + [hw, hb] + (list(rest.values()) if first else []),
                               lr=self.hp["lr"])
        zero = torch.zeros(())

        def step(x: torch.Tensor, y: torch.Tensor, _progress: float) -> None:
            params = {**rest, **{self.weight_of[n]: torch.where(run_mask[n], ws[n], zero) for n in names}}
            loss = F.cross_entropy(F.linear(self.run_features(x, params), hw, hb), y)
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                for n in names:
                    ws[n].grad = torch.where(mine[n], ws[n].grad, zero)
            opt.step()
            with torch.no_grad():  # everything but the task's own entries restored bit for bit
                for n in names:
                    ws[n].copy_(torch.where(mine[n], ws[n], old_w[n]))
                if not first:
                    for k, v in rest.items():
                        v.copy_(frozen_rest[k])

        self.epochs(task, gen, self.hp["epochs"], step)
        for n in names:
            self.params[self.weight_of[n]] = ws[n].detach()
        for k, v in rest.items():
            self.params[k] = v.detach()
        self.heads[t] = (hw.detach(), hb.detach())
        self._account(t)

    def _account(self, t: int) -> None:
        total = sum(o.numel() for o in self.owner.values())
        n_free = frag = 0.0
        for own in self.owner.values():
            free = (own == 0).numpy().reshape(-1)
            f = int(free.sum())
            if f:
                frag += f * (1.0 - _longest_run(free) / f)
                n_free += f
        self.metrics[t].update(
            own_density=sum(int((o == t + 1).sum()) for o in self.owner.values()) / total,
            run_density=sum(int(m.sum()) for m in self._mask(t).values()) / total,
            free_frac=n_free / total, fragmentation=frag / max(1.0, n_free),
            hashed_bits_per_weight=64.0 * len(self.owner) / total,
            chain_bits_per_weight=(64.0 * (t + 1) * len(self.owner) + 8) / total)

    # -- what the bundle and the run store ---------------------------------------------
    def task_metrics(self, t: int) -> dict:
        m = self.metrics[t]
        out = {k: round(m[k], 6) for k in ("collision_rate", "own_density", "run_density", "free_frac",
                                           "fragmentation")}
        out.update({k: round(m[k], 8) for k in ("hashed_bits_per_weight", "chain_bits_per_weight")})
        out.update(hash_picks=int(m["hash_picks"]), collisions=int(m["collisions"]),
                   reuse=int(self.hp["reuse"]))
        return out

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        if self.kind != HASH_CHAIN:
            return self.encode_task({f"mask.{n}": keep.numpy() for n, keep in self._mask(t).items()}, t)
        thr = int(hash_params(0, float(self.hp["density"]))[1])
        mode = 0 if int(self.hp["reuse"]) else 1
        seeds = [self.hash_seeds(j) for j in range(t + 1)]
        parts: dict[str, np.ndarray] = {"chain.mode": np.array([mode], dtype=np.uint8)}
        for n, keep in self._mask(t).items():
            rows = np.array([[s[n], thr] for s in seeds], dtype=np.uint32)
            if not np.array_equal(chain_mask(keep.numel(), rows, mode), keep.numpy().reshape(-1)):
                raise AssertionError(f"hashing: task {t}'s chain does not reproduce its mask of {n}")
            parts[f"chain.{n}"] = rows
        return self.encode_task(parts, t)

    def free_fraction(self) -> float:
        return free_fraction(self.owner)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"owner.{n}": o for n, o in self.owner.items()}
        for t, m in enumerate(self.metrics):
            state[f"hashing.metrics.{t}"] = torch.tensor([m[k] for k in _METRIC_KEYS], dtype=torch.float64)
        return state

    def _load_extra_state(self, state: dict[str, torch.Tensor], n_tasks: int) -> None:
        self.owner = {n: state[f"owner.{n}"].clone() for n in self.owner}
        self.metrics = [dict(zip(_METRIC_KEYS, state[f"hashing.metrics.{t}"].tolist(), strict=True))
                        for t in range(n_tasks)]
