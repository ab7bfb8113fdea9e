"""TSS: sub-network discovery and soft-masking (Ke et al., 2023, arXiv:2310.09436).

As SupSup, every task learns real-valued popup scores per weight of the mask sites over a
fixed backbone; the forward pass uses the top ``density`` of each layer's scores as binary
gates and the backward pass hands the gates' gradient straight to the scores. TSS adds:

* a new task's scores start from the previous task's trained scores (not from scratch);
* after a task, a gradient-based importance of every score (``|dL/ds|`` over the task's
  training data, normalized per layer into [0, 1]) accumulates by element-wise max;
* while a later task learns, each score's update is scaled by ``1 - accumulated
  importance`` (soft-masking): scores important to earlier tasks barely move, so the new
  task reuses the gates (the knowledge) they encode, while unimportant scores stay free.

The backbone never changes and every task stores its own binary mask (task kind
``weight_bits``), so old tasks' outputs are byte-identical however many tasks follow.
See docs/method-tss.md for what differs from the paper and why.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.runtime.graph import Graph

from ..data import Task
from .supsup import SupSup

# The figures a task records (task_metrics), in the order they are stored in the run state.
METRIC_KEYS = ("density", "damped_gt50", "mean_importance_before", "mean_importance_after",
               "gate_overlap_prev", "scores_from_prev")


def normalize_importance(g: torch.Tensor, mode: int) -> torch.Tensor:
    """One layer's raw importance ``g >= 0`` into [0, 1].

    mode 0: ``tanh`` of the layer-standardized values, negatives clipped to 0 (the
    normalization of Ke et al.'s soft-masking: above-average entries approach 1);
    mode 1: divided by the layer's maximum."""
    g = g.double()
    if int(mode) == 1:
        top = g.max()
        out = g / top if top > 0 else torch.zeros_like(g)
    else:
        std = g.std() if g.numel() > 1 else torch.zeros((), dtype=g.dtype)
        out = torch.tanh((g - g.mean()) / std).clamp(min=0.0) if std > 0 else torch.zeros_like(g)
    return out.clamp(0.0, 1.0).float()


class TSS(SupSup):
    name = "tss"
    # soft: 1 soft-masks the score updates by (1 - importance), 0 turns it off (ablation);
    # prev_init: 1 starts a task's scores from the previous task's, 0 from scratch (ablation);
    # prev_rescale: 1 rescales the inherited scores per layer to the spread of fresh ones;
    # imp_norm: the per-layer normalization of the importance (see normalize_importance);
    # imp_batches: how many training batches the importance is measured on (0: all).
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-2, "density": 0.5, "head_lr": 0.0,
                "soft": 1.0, "prev_init": 1.0, "prev_rescale": 0.0, "imp_norm": 0.0,
                "imp_batches": 0}

    def __init__(self, graph: Graph, seed: int = 0, backbone: dict[str, np.ndarray] | None = None,
                 **hp: float) -> None:
        super().__init__(graph, seed, backbone, **hp)
        # accumulated importance of every score, in [0, 1] (element-wise max over tasks)
        self.importance: dict[str, torch.Tensor] = {
            s.node: torch.zeros(self.params[s.weight].shape) for s in self.sites}
        self.metrics: list[dict[str, float]] = []
        self._fresh: dict[str, torch.Tensor] = {}  # the task's freshly drawn scores (for init_acc)

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        super()._begin_task(task, gen)  # head and fresh scores (drawn either way: same rng use)
        self._fresh = self.scores[t]
        if t > 0 and self.hp["prev_init"]:
            self.scores[t] = {n: self._inherit(s, self._fresh[n]) for n, s in self.scores[t - 1].items()}

    def _inherit(self, prev: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """The previous task's scores as a new task's start. With ``prev_rescale`` they are
        brought back to the spread of freshly drawn scores per layer: the same order, so the
        same gates, but as easy to flip as at initialization (trained scores drift far from
        the threshold, and a new task then moves its gates slowly)."""
        if not self.hp["prev_rescale"]:
            return prev.clone()
        std = prev.std()
        if not std > 0:
            return prev.clone()
        return (prev - prev.mean()) / std * fresh.std() + fresh.mean()

    def _accuracy_at_init(self, task: Task, t: int) -> float:
        # "at initialization" is a fresh model: fresh scores, not the previous task's ones,
        # so before_acc - init_acc (FWT) measures what the inherited scores bring
        inherited = self.scores[t]
        self.scores[t] = self._fresh
        try:
            return super()._accuracy_at_init(task, t)
        finally:
            self.scores[t] = inherited

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        scores = {n: s.clone().requires_grad_(True) for n, s in self.scores[t].items()}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        head_lr = self.hp["head_lr"] or self.hp["lr"]
        opt = torch.optim.Adam([{"params": list(scores.values())}, {"params": [hw, hb], "lr": head_lr}],
                               lr=self.hp["lr"])
        # Adam divides each entry's step by its own gradient scale, so scaling a gradient by a
        # constant factor would not slow that entry; the factor is applied to the update instead
        # (what it does to a gradient under plain SGD).
        keep = {n: 1.0 - self.importance[n] for n in scores} if self.hp["soft"] else None
        imp_before = self._mean(self.importance)
        damped = (sum(int((self.importance[n] > 0.5).sum()) for n in scores)
                  / sum(s.numel() for s in scores.values())) if keep is not None else 0.0

        def step(x: torch.Tensor, y: torch.Tensor, _progress: float) -> None:
            h = self.run_features(x, self._masked(scores))
            loss = F.cross_entropy(F.linear(h, hw, hb), y)
            opt.zero_grad()
            loss.backward()
            if keep is None:
                opt.step()
                return
            old = {n: s.detach().clone() for n, s in scores.items()}
            opt.step()
            with torch.no_grad():
                for n, s in scores.items():
                    s.copy_(old[n] + keep[n] * (s - old[n]))

        self.epochs(task, gen, self.hp["epochs"], step)
        self.scores[t] = {n: s.detach() for n, s in scores.items()}
        self.heads[t] = (hw.detach(), hb.detach())

        fresh = self._task_importance(task, t)
        for n in self.importance:
            self.importance[n] = torch.maximum(self.importance[n], fresh[n])
        masks = {n: self.mask_of(s) for n, s in self.scores[t].items()}
        n_all = sum(m.numel() for m in masks.values())
        on = sum(int(m.sum()) for m in masks.values())
        if t > 0:
            prev = {n: self.mask_of(s) for n, s in self.scores[t - 1].items()}
            overlap = sum(int((masks[n] & prev[n]).sum()) for n in masks) / max(1, on)
        else:
            overlap = 0.0
        self.metrics.append({"density": on / n_all, "damped_gt50": damped,
                             "mean_importance_before": imp_before,
                             "mean_importance_after": self._mean(self.importance),
                             "gate_overlap_prev": overlap,
                             "scores_from_prev": float(t > 0 and bool(self.hp["prev_init"]))})

    @staticmethod
    def _mean(d: dict[str, torch.Tensor]) -> float:
        return float(sum(float(v.double().sum()) for v in d.values()) / sum(v.numel() for v in d.values()))

    def _task_importance(self, task: Task, t: int) -> dict[str, torch.Tensor]:
        """Per-layer normalized ``|dL/ds|`` of task ``t``'s scores, averaged over its
        training batches (fixed order, so a resumed run gives the same bytes)."""
        scores = {n: s.clone().requires_grad_(True) for n, s in self.scores[t].items()}
        hw, hb = self.heads[t]
        x, y = self._x(task.x_train), torch.from_numpy(task.y_train)
        bs = int(self.hp["batch_size"])
        n_batches = max(1, -(-len(x) // bs))
        if int(self.hp["imp_batches"]) > 0:
            n_batches = min(n_batches, int(self.hp["imp_batches"]))
        acc = {n: torch.zeros_like(s) for n, s in scores.items()}
        for i in range(n_batches):
            h = self.run_features(x[i * bs:(i + 1) * bs], self._masked(scores))
            loss = F.cross_entropy(F.linear(h, hw, hb), y[i * bs:(i + 1) * bs])
            grads = torch.autograd.grad(loss, list(scores.values()))
            for n, g in zip(scores, grads, strict=True):
                acc[n] += g.abs()
        return {n: normalize_importance(a / n_batches, int(self.hp["imp_norm"])) for n, a in acc.items()}

    def task_metrics(self, t: int) -> dict:
        m = self.metrics[t] if t < len(self.metrics) else {}
        return {f"tss_{k}": round(float(v), 6) for k, v in m.items()}

    def _extra_state(self) -> dict[str, torch.Tensor]:
        state = super()._extra_state()
        state.update({f"importance.{n}": v.contiguous() for n, v in self.importance.items()})
        for t, m in enumerate(self.metrics):
            state[f"tss_metrics.{t}"] = torch.tensor([m[k] for k in METRIC_KEYS], dtype=torch.float64)
        return state

    def _load_extra_state(self, state: dict[str, torch.Tensor], n_tasks: int) -> None:
        super()._load_extra_state(state, n_tasks)
        self.importance = {s.node: state[f"importance.{s.node}"].clone() for s in self.sites}
        self.metrics = [dict(zip(METRIC_KEYS, state[f"tss_metrics.{t}"].tolist(), strict=True))
                        for t in range(n_tasks)]
