"""Supermasks over a frozen backbone: SupSup (Wortsman et al., 2020) and Piggyback
(Mallya et al., 2018).

Each task learns real-valued scores per weight; the forward pass uses a binary mask
of them and the backward pass hands the mask's gradient straight to the scores
(straight-through estimator). The backbone never changes, so earlier tasks cannot
forget. SupSup: a random signed-constant backbone and the top-k scores per layer
(edge-popup). Piggyback: a trained backbone and the scores above a threshold.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Task
from ..torchnet import Params, init_backbone
from .base import MASK_BITS, Method


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask):  # noqa: ARG004 - the mask is computed by the caller
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class SupSup(Method):
    name = "supsup"
    kind = MASK_BITS
    uses_bias = False
    # head_lr: the head's learning rate (0: the same as the scores'); a pretrained
    # backbone's features can be small, and its head then needs larger steps than the scores
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-2, "density": 0.5, "head_lr": 0.0}

    def __init__(self, graph, seed=0, backbone=None, **hp):
        super().__init__(graph, seed, backbone, **hp)
        self.scores: list[dict[str, torch.Tensor]] = []

    def _initial_backbone(self):
        return init_backbone(self.graph, torch.Generator().manual_seed(self.seed),
                             signed_constant=True)

    def _init_scores(self, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        bound = (6.0 / (w[0].numel())) ** 0.5  # kaiming uniform, as in edge-popup
        return (torch.rand(w.shape, generator=gen) * 2 - 1) * bound

    def mask_of(self, scores: torch.Tensor) -> torch.Tensor:
        """Top ``density`` of the scores of one layer (ties broken by index)."""
        k = max(1, int(round(scores.numel() * self.hp["density"])))
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        mask[torch.topk(scores.detach().reshape(-1), k, sorted=False).indices] = True
        return mask.view(scores.shape)

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        self._new_head(task.n_classes, gen)
        self.scores.append({site.node: self._init_scores(self.params[site.weight], gen)
                            for site in self.sites})

    def _masked(self, scores: dict[str, torch.Tensor]) -> Params:
        out = {}
        for site in self.sites:
            s = scores[site.node]
            w = self.params[site.weight]
            m = _StraightThrough.apply(s, self.mask_of(s).to(w.dtype))
            out[site.weight] = (torch.where(m.detach().bool(), w, torch.zeros((), dtype=w.dtype))
                                if not s.requires_grad else w * m)
        return out

    def task_params(self, t: int) -> Params:
        return self._masked(self.scores[t])

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        scores = {n: s.clone().requires_grad_(True) for n, s in self.scores[t].items()}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        head_lr = self.hp["head_lr"] or self.hp["lr"]
        opt = torch.optim.Adam([{"params": list(scores.values())}, {"params": [hw, hb], "lr": head_lr}],
                               lr=self.hp["lr"])

        def step(x, y, _progress):
            h = self.run_features(x, self._masked(scores))
            loss = F.cross_entropy(F.linear(h, hw, hb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        self.epochs(task, gen, self.hp["epochs"], step)
        self.scores[t] = {n: s.detach() for n, s in scores.items()}
        self.heads[t] = (hw.detach(), hb.detach())

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        return self.encode_task({f"mask.{n}": self.mask_of(s).numpy().astype(bool)
                                 for n, s in self.scores[t].items()}, t)

    def _extra_state(self):
        return {f"scores.{t}.{n}": s for t, d in enumerate(self.scores) for n, s in d.items()}

    def _load_extra_state(self, state, n_tasks):
        self.scores = [{s.node: state[f"scores.{t}.{s.node}"].clone() for s in self.sites}
                       for t in range(n_tasks)]


class Piggyback(SupSup):
    """Supermasks over a *trained* backbone: scores above ``threshold`` are kept.

    The backbone is given (``backbone=``: imported, pretrained, or from another run) or, if not, trained
    densely on the first task of the stream before any mask is learned.
    """

    name = "piggyback"
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "head_lr": 0.0, "threshold": 5e-3,
                "score_init": 1e-2, "pretrain_epochs": 30}

    def _initial_backbone(self):
        return init_backbone(self.graph, torch.Generator().manual_seed(self.seed))

    def _pretrain(self, task: Task, gen: torch.Generator) -> None:
        ws = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        hw, hb = (p.clone().requires_grad_(True)
                  for p in (torch.zeros(task.n_classes, self.feature_dim), torch.zeros(task.n_classes)))
        opt = torch.optim.Adam([*ws.values(), hw, hb], lr=1e-3)

        def step(x, y, _progress):
            h = self.run_features(x, ws)
            loss = F.cross_entropy(F.linear(h, hw, hb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        self.epochs(task, gen, self.hp["pretrain_epochs"], step)
        self.params = {k: v.detach() for k, v in ws.items()}
        self.pretrained = True

    def _accuracy_at_init(self, task, t):
        return self.accuracy(task.x_test, task.y_test, t)  # the backbone is the trained one

    def _init_scores(self, w, gen):
        return torch.full(w.shape, float(self.hp["score_init"]))

    def mask_of(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.detach() > self.hp["threshold"]

    def _begin_task(self, task, gen):
        if not self.pretrained:
            self._pretrain(task, gen)
        super()._begin_task(task, gen)
