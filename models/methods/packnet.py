"""PackNet (Mallya & Lazebnik, 2018): train free weights, prune by magnitude, freeze.

``owner[w]`` is 0 for a free weight, else the 1-based index of the task that kept it.
Task t runs with the weights owned by tasks 1..t (nested masks). Biases (and every
other parameter that is not a masked weight: norms, embeddings) are learned with the
first task and frozen after it, as in the paper.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Task
from ..torchnet import Params
from .base import MASK_BITS, Method, free_fraction


class PackNet(Method):
    name = "packnet"
    kind = MASK_BITS
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "prune": 0.6, "retrain_epochs": 10}

    def __init__(self, graph, seed=0, backbone=None, **hp):
        super().__init__(graph, seed, backbone, **hp)
        self.owner = {s.node: torch.zeros(s.shape, dtype=torch.int16) for s in self.sites}
        self.weight_of = {s.node: s.weight for s in self.sites}

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        self._new_head(task.n_classes, gen)

    def task_params(self, t: int) -> Params:
        if t >= len(self.tasks):
            return {}
        out = {}
        for n, own in self.owner.items():  # a learned task: its nested mask, masked-out = +0.0
            w = self.params[self.weight_of[n]]
            keep = (own > 0) & (own <= t + 1)
            out[self.weight_of[n]] = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
        return out

    def _fit(self, task: Task, gen: torch.Generator, n_epochs: int, t: int,
             trainable: dict[str, torch.Tensor], train_bias: bool) -> None:
        """Train weights where ``trainable`` is True (and the head); restore the rest."""
        names = list(self.owner)
        ws = {n: self.params[self.weight_of[n]].clone().requires_grad_(True) for n in names}
        masked = set(self.weight_of.values())
        # Everything else (biases, norms, embeddings) trains with the first task only.
        rest = {k: v.clone().requires_grad_(train_bias) for k, v in self.params.items() if k not in masked}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        frozen_w = {n: (~trainable[n], self.params[self.weight_of[n]].clone()) for n in names}
        frozen_rest = {k: v.detach().clone() for k, v in rest.items()}
        train = list(ws.values()) + [hw, hb] + ([*rest.values()] if train_bias else [])
        opt = torch.optim.Adam(train, lr=self.hp["lr"])

        def step(x, y, _progress):
            params = {**rest, **{self.weight_of[n]: w for n, w in ws.items()}}
            loss = F.cross_entropy(F.linear(self.run_features(x, params), hw, hb), y)
            opt.zero_grad()
            loss.backward()
            for n in names:
                ws[n].grad[frozen_w[n][0]] = 0
            opt.step()
            with torch.no_grad():  # owned weights are restored bit for bit
                for n in names:
                    keep, old = frozen_w[n]
                    ws[n].copy_(torch.where(keep, old, ws[n]))
                if not train_bias:
                    for k, v in rest.items():
                        v.copy_(frozen_rest[k])

        self.epochs(task, gen, n_epochs, step)
        for n in names:
            self.params[self.weight_of[n]] = ws[n].detach()
        for k, v in rest.items():
            self.params[k] = v.detach()
        self.heads[t] = (hw.detach(), hb.detach())

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        first = t == 0
        free = {n: own == 0 for n, own in self.owner.items()}
        self._fit(task, gen, self.hp["epochs"], t, free, train_bias=first)
        # Prune: keep the largest free weights of each layer, release the rest (set to 0).
        for n, own in self.owner.items():
            w = self.params[self.weight_of[n]]
            cand = free[n]
            k = int(round(cand.sum().item() * (1.0 - self.hp["prune"])))
            keep = torch.zeros_like(cand)
            if k > 0:
                mags = torch.where(cand, w.abs(), torch.full_like(w, -1.0))
                keep.view(-1)[torch.topk(mags.view(-1), k).indices] = True
            own[keep] = t + 1
            self.params[self.weight_of[n]] = torch.where(cand & ~keep, torch.zeros_like(w), w)
        # Retrain only what this task kept, with released weights held at zero.
        mine = {n: own == t + 1 for n, own in self.owner.items()}
        self._fit(task, gen, self.hp["retrain_epochs"], t, mine, train_bias=first)
        for n, own in self.owner.items():  # released weights stay exactly 0 for the next task
            w = self.params[self.weight_of[n]]
            self.params[self.weight_of[n]] = torch.where(own == 0, torch.zeros_like(w), w)

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        return self.encode_task({f"mask.{n}": ((own > 0) & (own <= t + 1)).numpy()
                                 for n, own in self.owner.items()}, t)

    def free_fraction(self) -> float:
        return free_fraction(self.owner)

    def _extra_state(self):
        return {f"owner.{n}": o for n, o in self.owner.items()}

    def _load_extra_state(self, state, n_tasks):
        self.owner = {n: state[f"owner.{n}"].clone() for n in self.owner}
