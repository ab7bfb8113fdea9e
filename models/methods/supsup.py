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

from edgecl.runtime.masks import pack_bits

from ..data import Task
from ..torchnet import Params, features, init_backbone
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
    mask_kind = MASK_BITS
    uses_bias = False
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-2, "density": 0.5}

    def __init__(self, layers, input_shape, seed=0, **hp):
        super().__init__(layers, input_shape, seed, **hp)
        self.scores: list[dict[str, torch.Tensor]] = []

    def _initial_backbone(self):
        return init_backbone(self.layers, torch.Generator().manual_seed(self.seed),
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
        self.scores.append({layer["name"]: self._init_scores(self.params[f"{layer['name']}.weight"],
                                                              gen)
                            for layer in self.weighted_layers()})

    def _masked(self, scores: dict[str, torch.Tensor]) -> Params:
        out = {}
        for name, s in scores.items():
            w = self.params[f"{name}.weight"]
            m = _StraightThrough.apply(s, self.mask_of(s).to(w.dtype))
            out[name] = (torch.where(m.detach().bool(), w, torch.zeros((), dtype=w.dtype))
                         if not s.requires_grad else w * m, None)
        return out

    def task_params(self, t: int) -> Params:
        return self._masked(self.scores[t])

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        scores = {n: s.clone().requires_grad_(True) for n, s in self.scores[t].items()}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        opt = torch.optim.Adam([*scores.values(), hw, hb], lr=self.hp["lr"])

        def step(x, y, _progress):
            h = features(self.layers, self._masked(scores), x)
            loss = F.cross_entropy(F.linear(h, hw, hb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        self.epochs(task, gen, self.hp["epochs"], step)
        self.scores[t] = {n: s.detach() for n, s in scores.items()}
        self.heads[t] = (hw.detach(), hb.detach())

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        out = {f"mask.{n}": pack_bits(self.mask_of(s).numpy()) for n, s in self.scores[t].items()}
        out.update(self.export_head(t))
        return out

    def _extra_state(self):
        return {f"scores.{t}.{n}": s for t, d in enumerate(self.scores) for n, s in d.items()}

    def _load_extra_state(self, state, n_tasks):
        names = [layer["name"] for layer in self.weighted_layers()]
        self.scores = [{n: state[f"scores.{t}.{n}"].clone() for n in names}
                       for t in range(n_tasks)]


class Piggyback(SupSup):
    """Supermasks over a *trained* backbone: scores above ``threshold`` are kept.

    The backbone is given (``set_backbone``, e.g. from another run) or, if not, trained
    densely on the first task of the stream before any mask is learned.
    """

    name = "piggyback"
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "threshold": 5e-3,
                "score_init": 1e-2, "pretrain_epochs": 30}

    def __init__(self, layers, input_shape, seed=0, **hp):
        super().__init__(layers, input_shape, seed, **hp)
        self.pretrained = False

    def _initial_backbone(self):
        return init_backbone(self.layers, torch.Generator().manual_seed(self.seed))

    def set_backbone(self, weights: dict[str, np.ndarray]) -> None:
        for k in self.params:
            if k not in weights or tuple(weights[k].shape) != tuple(self.params[k].shape):
                raise ValueError(f"given backbone lacks {k} of shape {tuple(self.params[k].shape)}")
            self.params[k] = torch.from_numpy(np.array(weights[k], dtype=np.float32))
        self.pretrained = True

    def _pretrain(self, task: Task, gen: torch.Generator) -> None:
        ws = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        hw, hb = (p.clone().requires_grad_(True)
                  for p in (torch.zeros(task.n_classes, self.feature_dim), torch.zeros(task.n_classes)))
        opt = torch.optim.Adam([*ws.values(), hw, hb], lr=1e-3)
        names = [layer["name"] for layer in self.weighted_layers()]

        def step(x, y, _progress):
            h = features(self.layers, {n: (ws[f"{n}.weight"], None) for n in names}, x)
            loss = F.cross_entropy(F.linear(h, hw, hb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        self.epochs(task, gen, self.hp["pretrain_epochs"], step)
        self.params = {k: v.detach() for k, v in ws.items()}
        self.pretrained = True

    def _accuracy_at_init(self, task, t):
        return self.accuracy(task.x_test, task.y_test, t)  # the backbone is the given one

    def _init_scores(self, w, gen):
        return torch.full(w.shape, float(self.hp["score_init"]))

    def mask_of(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.detach() > self.hp["threshold"]

    def _begin_task(self, task, gen):
        if not self.pretrained:
            self._pretrain(task, gen)
        super()._begin_task(task, gen)

    def _extra_state(self):
        return {**super()._extra_state(), "pretrained": torch.tensor(int(self.pretrained))}

    def _load_extra_state(self, state, n_tasks):
        super()._load_extra_state(state, n_tasks)
        self.pretrained = bool(int(state["pretrained"]))
