"""EPI, evolving parameter isolation: importance re-estimated online, masks that evolve.

While a task trains, every free weight's importance is an exponential moving average of
``|g * w|`` (``g`` the gradient of the loss w.r.t. the weight's *effective* value, so the
first-order estimate of what the weight adds or removes, defined for weights inside and
outside the mask alike). Every ``update_every`` steps the task's mask is updated per
layer: the most important free weights are protected for the task (up to a density that
ramps from dense to ``keep``), and protected weights whose importance fell below
``release_ratio`` of the protection threshold are released back to the free pool. Free
weights outside the mask keep training (straight-through), so a released or not yet
protected weight can become important again. The last ``fixed_frac`` of the steps trains
with the mask fixed. When the task is committed its mask is fixed: ``owner[w] = t + 1``.

``owner[w]`` is 0 for a free weight, else the 1-based index of the task that protected
it; task t runs with the weights owned by tasks 1..t (nested masks, as PackNet), masked
out entries selected to +0.0. Owned weights are written back after every optimizer step,
so committed tasks stay byte-identical (the ``weight_bits`` kind; every backend runs it).
Biases and other non-masked parameters train with the first task only, then freeze.

``release=1`` (off by default) also lets a new task take weights of committed tasks whose
importance for their own task became low: their masks shrink (they are superseded as new
revisions), the accuracy drop it causes is measured on a few stored samples per task and
kept within ``max_bwt`` (the release is halved, then refused, beyond it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Task
from ..torchnet import Params
from .base import MASK_BITS, Method, free_fraction

# Per-task figures kept in the run state (one float vector per task), in this order.
_METRIC_KEYS = ("drift_mean", "drift_max", "drift_last", "mask_updates", "protected", "released",
                "owned_frac", "revision", "release_taken", "release_drop")


class EPI(Method):
    name = "epi"
    kind = MASK_BITS
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-3,
                "keep": 0.4,            # fraction of the free weights (per layer) a task ends protecting
                "update_every": 10,     # K: steps between mask updates
                "ema": 0.9,             # importance moving-average factor
                "release_ratio": 0.5,   # protected weights below this x threshold are released
                "ramp_frac": 0.5,       # density goes 1 -> keep over this fraction of the steps
                "fixed_frac": 0.25,     # the last steps train with the mask fixed
                "drift_topk": 0.1,      # top-k fraction whose set change is the importance drift
                "release": 0,           # 1: may free low-importance weights of committed tasks
                "release_frac": 0.2,    # at most this fraction of a committed task's own weights
                "max_bwt": 0.01,        # largest accuracy drop a release may cause (per old task)
                "release_samples": 64}  # samples per task kept (release mode only) to measure it

    def __init__(self, graph, seed: int = 0, backbone: dict[str, np.ndarray] | None = None,
                 **hp: float) -> None:
        super().__init__(graph, seed, backbone, **hp)
        self.owner = {s.node: torch.zeros(s.shape, dtype=torch.int16) for s in self.sites}
        self.weight_of = {s.node: s.weight for s in self.sites}
        self.metrics: list[dict[str, float]] = []
        self.buffers: list[tuple[np.ndarray, np.ndarray]] = []  # release mode only

    # -- masks ---------------------------------------------------------------------
    def _mask(self, t: int) -> dict[str, torch.Tensor]:
        return {n: (own > 0) & (own <= t + 1) for n, own in self.owner.items()}

    def task_params(self, t: int) -> Params:
        if t >= len(self.tasks):
            return {}  # the task being learned: dense over free weights until its mask exists
        return self._masked(self._mask(t))

    def _masked(self, mask: dict[str, torch.Tensor]) -> Params:
        out = {}
        for n, keep in mask.items():  # selection, not product: masked-out is +0.0 whatever the sign
            w = self.params[self.weight_of[n]]
            out[self.weight_of[n]] = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
        return out

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        self._new_head(task.n_classes, gen)
        t = len(self.heads) - 1
        self.metrics.append({k: 0.0 for k in _METRIC_KEYS} | {"revision": 1.0})
        if int(self.hp["release"]) and t > 0:
            self._release_committed(t)

    # -- training with an evolving mask ---------------------------------------------
    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        first = t == 0
        names = list(self.owner)
        hp = self.hp
        frozen = {n: own > 0 for n, own in self.owner.items()}  # owned by committed tasks
        free = {n: ~f for n, f in frozen.items()}
        active = {n: torch.ones_like(f) for n, f in frozen.items()}  # dense warm-up
        protected = {n: torch.zeros_like(f) for n, f in frozen.items()}
        imp = {n: torch.zeros(f.shape) for n, f in frozen.items()}
        ws = {n: self.params[self.weight_of[n]].clone().requires_grad_(True) for n in names}
        old_w = {n: self.params[self.weight_of[n]].clone() for n in names}
        masked = set(self.weight_of.values())
        rest = {k: v.clone().requires_grad_(first) for k, v in self.params.items() if k not in masked}
        frozen_rest = {k: v.detach().clone() for k, v in rest.items()}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        opt = torch.optim.Adam(list(ws.values()) + [hw, hb] + (list(rest.values()) if first else []),
                               lr=hp["lr"])
        bs = int(hp["batch_size"])
        total = int(hp["epochs"]) * max(1, -(-len(task.x_train) // bs))
        k_every, beta = max(1, int(hp["update_every"])), float(hp["ema"])
        ramp_end = max(1, int(total * float(hp["ramp_frac"])))
        fixed_from = int(total * (1.0 - float(hp["fixed_frac"])))
        state = {"step": 0, "topk": None}
        drifts: list[float] = []
        churn = {"protected": 0, "released": 0}

        def density(step: int) -> float:  # cubic ramp (Zhu & Gupta): fast early, gentle late
            p = min(1.0, step / ramp_end)
            return float(hp["keep"]) + (1.0 - float(hp["keep"])) * (1.0 - p) ** 3

        def update_mask(step: int) -> None:
            d = density(step)
            top = {}
            for n in names:
                cand = free[n]
                n_c = int(cand.sum())
                if n_c == 0:
                    top[n] = torch.zeros_like(cand)
                    continue
                k = max(1, int(round(d * n_c)))
                score = torch.where(cand, imp[n], torch.full_like(imp[n], -1.0)).view(-1)
                tau = torch.topk(score, k).values[-1]
                # hysteresis: a protected weight stays unless its importance fell below
                # release_ratio * tau; the rest of the budget goes to the most important.
                stay = protected[n] & (imp[n] >= float(hp["release_ratio"]) * tau)
                pri = torch.where(stay.view(-1), score + score.max() + 1.0, score)
                new = torch.zeros(cand.numel(), dtype=torch.bool)
                new[torch.topk(pri, k).indices] = True
                new = new.view(cand.shape) & cand
                churn["protected"] += int((new & ~protected[n]).sum()) if state["topk"] is not None else 0
                # released as outdated: importance fell below the threshold (not merely
                # displaced while the density budget ramps down)
                churn["released"] += int((protected[n] & ~new & ~stay).sum())
                protected[n] = new
                active[n] = frozen[n] | new
                kk = max(1, int(round(float(hp["drift_topk"]) * n_c)))
                tk = torch.zeros(cand.numel(), dtype=torch.bool)
                tk[torch.topk(score, kk).indices] = True
                top[n] = tk
            if state["topk"] is not None:  # Jaccard distance between successive top-k sets
                inter = sum(int((top[n] & state["topk"][n]).sum()) for n in names)
                union = sum(int((top[n] | state["topk"][n]).sum()) for n in names)
                drifts.append(1.0 - inter / max(1, union))
            state["topk"] = top

        def step(x: torch.Tensor, y: torch.Tensor, _progress: float) -> None:
            eff = {n: torch.where(active[n], ws[n], torch.zeros(())).detach().requires_grad_(True)
                   for n in names}
            params = {**rest, **{self.weight_of[n]: eff[n] for n in names}}
            loss = F.cross_entropy(F.linear(self.run_features(x, params), hw, hb), y)
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                for n in names:
                    g = eff[n].grad
                    imp[n].mul_(beta).add_((g * ws[n]).abs() * free[n], alpha=1 - beta)
                    # straight-through: free weights outside the mask keep learning
                    ws[n].grad = torch.where(free[n], g, torch.zeros(()))
            opt.step()
            with torch.no_grad():  # committed tasks' weights restored bit for bit
                for n in names:
                    ws[n].copy_(torch.where(frozen[n], old_w[n], ws[n]))
                if not first:
                    for k, v in rest.items():
                        v.copy_(frozen_rest[k])
            state["step"] += 1
            s = state["step"]
            if s % k_every == 0 and s <= fixed_from:
                update_mask(s)

        self.epochs(task, gen, hp["epochs"], step)
        if state["topk"] is None or density(state["step"]) > float(hp["keep"]) + 1e-6:
            update_mask(ramp_end)  # too few steps for the schedule: end at the target density
        for n in names:
            self.params[self.weight_of[n]] = ws[n].detach()
            self.owner[n][protected[n]] = t + 1
        for k, v in rest.items():
            self.params[k] = v.detach()
        self.heads[t] = (hw.detach(), hb.detach())
        total_w = sum(o.numel() for o in self.owner.values())
        self.metrics[t].update(
            drift_mean=float(np.mean(drifts)) if drifts else 0.0,
            drift_max=float(np.max(drifts)) if drifts else 0.0,
            drift_last=drifts[-1] if drifts else 0.0,
            mask_updates=float(len(drifts) + 1), protected=float(churn["protected"]),
            released=float(churn["released"]),
            owned_frac=sum(int((o == t + 1).sum()) for o in self.owner.values()) / total_w)
        if int(hp["release"]):
            r = np.random.default_rng(self.seed * 7919 + t)
            idx = r.permutation(len(task.x_train))[: int(hp["release_samples"])]
            self.buffers.append((np.ascontiguousarray(task.x_train[idx]), task.y_train[idx].copy()))

    # -- release mode: committed tasks give back weights that became unimportant --------
    def _buffer_acc(self, j: int, mask: dict[str, torch.Tensor]) -> float:
        x, y = self.buffers[j]
        xt = self._x(x)
        with torch.no_grad():
            h = self.run_features(xt, self._masked(mask))
            return float((F.linear(h, *self.heads[j]).argmax(1).numpy() == y).mean())

    def _own_importance(self, j: int) -> dict[str, torch.Tensor]:
        """|g * w| of task j's own weights for task j's loss on its stored samples."""
        x, y = self.buffers[j]
        eff = {n: v.detach().requires_grad_(True) for n, v in self._masked(self._mask(j)).items()}
        by_node = {self.weight_of[n]: n for n in self.owner}
        loss = F.cross_entropy(F.linear(self.run_features(self._x(x), eff), *self.heads[j]),
                               torch.from_numpy(y))
        loss.backward()
        return {by_node[w]: (e.grad * e).abs().detach() for w, e in eff.items()}

    def _release_committed(self, t: int) -> None:
        before = [self._buffer_acc(j, self._mask(j)) for j in range(t)]
        scores = [self._own_importance(j) for j in range(t)]
        frac = float(self.hp["release_frac"])
        for _ in range(4):  # halve the release until every old task stays within max_bwt
            cand = {n: torch.zeros_like(o, dtype=torch.bool) for n, o in self.owner.items()}
            for j in range(t):
                for n, own in self.owner.items():
                    mine = own == j + 1
                    k = int(mine.sum() * frac)
                    if k == 0:
                        continue
                    s = torch.where(mine, scores[j][n], torch.full_like(scores[j][n], float("inf"))).view(-1)
                    cand[n].view(-1)[torch.topk(s, k, largest=False).indices] = True
            drops = []
            for j in range(t):
                m = {n: keep & ~cand[n] for n, keep in self._mask(j).items()}
                drops.append(before[j] - self._buffer_acc(j, m))
            if max(drops) <= float(self.hp["max_bwt"]):
                break
            frac /= 2
        else:
            self.metrics[t].update(release_taken=0.0, release_drop=0.0)
            return  # refused: no release keeps every old task within the limit
        taken = 0
        for j in range(t):
            lost = sum(int((cand[n] & (o > 0) & (o <= j + 1)).sum()) for n, o in self.owner.items())
            if lost:  # task j's mask shrinks: a new revision
                self.metrics[j]["revision"] += 1
                self.metrics[j]["release_drop"] = max(self.metrics[j]["release_drop"], drops[j])
        for n, own in self.owner.items():
            taken += int(cand[n].sum())
            own[cand[n]] = 0
        self.metrics[t].update(release_taken=float(taken), release_drop=float(max(drops)))

    def task_revision(self, t: int) -> int:
        """1, or 1 + the number of times a later task took weights of task t (release mode)."""
        return int(self.metrics[t]["revision"])

    # -- what the bundle and the run store --------------------------------------------
    def task_metrics(self, t: int) -> dict:
        m = self.metrics[t]
        out = {"drift_mean": round(m["drift_mean"], 4), "drift_max": round(m["drift_max"], 4),
               "drift_last": round(m["drift_last"], 4), "mask_updates": int(m["mask_updates"]),
               "protected": int(m["protected"]), "released": int(m["released"]),
               "owned_frac": round(m["owned_frac"], 4)}
        if int(self.hp["release"]):
            out.update(revision=int(m["revision"]), release_taken=int(m["release_taken"]),
                       release_drop=round(m["release_drop"], 4))
        return out

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        return self.encode_task({f"mask.{n}": keep.numpy() for n, keep in self._mask(t).items()}, t)

    def free_fraction(self) -> float:
        return free_fraction(self.owner)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"owner.{n}": o for n, o in self.owner.items()}
        for t, m in enumerate(self.metrics):
            state[f"epi.metrics.{t}"] = torch.tensor([m[k] for k in _METRIC_KEYS], dtype=torch.float64)
        for t, (x, y) in enumerate(self.buffers):
            state[f"epi.buffer.{t}.x"] = torch.from_numpy(np.ascontiguousarray(x))
            state[f"epi.buffer.{t}.y"] = torch.from_numpy(np.ascontiguousarray(y))
        return state

    def _load_extra_state(self, state: dict[str, torch.Tensor], n_tasks: int) -> None:
        self.owner = {n: state[f"owner.{n}"].clone() for n in self.owner}
        self.metrics = [dict(zip(_METRIC_KEYS, state[f"epi.metrics.{t}"].tolist(), strict=True))
                        for t in range(n_tasks)]
        self.buffers = [(state[f"epi.buffer.{t}.x"].numpy().copy(), state[f"epi.buffer.{t}.y"].numpy().copy())
                        for t in range(n_tasks) if f"epi.buffer.{t}.x" in state]
