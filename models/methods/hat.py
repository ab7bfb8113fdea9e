"""HAT: hard attention to the task (Serrà et al., 2018).

Every task learns an embedding per unit of each layer; its gate is sigmoid(s * e),
with s annealed from 1/s_max to s_max over each epoch. A weight's gradient is scaled
by 1 - min(a_out, a_in) of the cumulative mask of earlier tasks, embeddings' gradients
are compensated for the annealing, and a regulariser keeps the new task's mask sparse
relative to the units still free. At inference the gates are binarized (e > 0), and
the cumulative mask used for gating is binarized the same way, so a unit an earlier
task uses has exactly frozen inputs: with binarized gates the forgetting is exactly 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Task
from ..torchnet import Params, features
from .base import MASK_UNITS, Method


class HAT(Method):
    name = "hat"
    mask_kind = MASK_UNITS
    defaults = {"epochs": 40, "batch_size": 32, "lr": 0.05, "smax": 400.0, "c": 0.75,
                "thres_cosh": 50.0, "thres_emb": 6.0, "clipgrad": 10000.0}

    def __init__(self, layers, input_shape, seed=0, **hp):
        super().__init__(layers, input_shape, seed, **hp)
        self.emb: list[dict[str, torch.Tensor]] = []
        self.cum = {layer["name"]: torch.zeros(self._units(layer), dtype=torch.bool)
                    for layer in self.weighted_layers()}

    @staticmethod
    def _units(layer: dict) -> int:
        return layer["out_features"] if layer["op"] == "linear" else layer["out_channels"]

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        self._new_head(task.n_classes, gen)
        self.emb.append({layer["name"]: torch.randn(self._units(layer), generator=gen)
                         for layer in self.weighted_layers()})

    def task_params(self, t: int) -> Params:
        return {layer["name"]: (self.params[f"{layer['name']}.weight"],
                                self.params.get(f"{layer['name']}.bias"))
                for layer in self.weighted_layers()}

    def task_gates(self, t: int) -> dict[str, torch.Tensor]:
        return {n: (e > 0).float() for n, e in self.emb[t].items()}

    def _frozen(self) -> dict[str, torch.Tensor]:
        """Per weight: True where both its unit and its input unit belong to earlier tasks."""
        out, prev, prev_layer = {}, None, None
        for layer in self.layers:
            if layer["op"] not in ("linear", "conv2d"):
                continue
            n = layer["name"]
            rows = self.cum[n]
            w = self.params[f"{n}.weight"]
            if prev is None:  # inputs of the first layer are always in use
                cols = torch.ones(w.shape[1], dtype=torch.bool)
            elif layer["op"] == "linear" and prev_layer["op"] == "conv2d":
                cols = prev.repeat_interleave(w.shape[1] // prev.numel())  # flattened channels
            else:
                cols = prev
            shape = (-1, 1) if w.dim() == 2 else (-1, 1, 1, 1)
            colshape = (1, -1) if w.dim() == 2 else (1, -1, 1, 1)
            out[n] = rows.view(shape) & cols.view(colshape)
            out[n] = out[n].expand_as(w)
            prev, prev_layer = rows, layer
        return out

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        hp = self.hp
        smax = hp["smax"]
        names = [layer["name"] for layer in self.weighted_layers()]
        ws = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        emb = {n: e.clone().requires_grad_(True) for n, e in self.emb[t].items()}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        frozen = self._frozen()
        frozen_vals = {k: v.clone() for k, v in self.params.items()}
        free = {n: (~c).float() for n, c in self.cum.items()}
        free_total = sum(f.sum() for f in free.values())
        opt = torch.optim.SGD([*ws.values(), *emb.values(), hw, hb], lr=hp["lr"])

        def step(x, y, progress):
            s = 1.0 / smax + (smax - 1.0 / smax) * progress
            gates = {n: torch.sigmoid(s * e) for n, e in emb.items()}
            params = {n: (ws[f"{n}.weight"], ws.get(f"{n}.bias")) for n in names}
            logits = F.linear(features(self.layers, params, x, gates), hw, hb)
            if free_total > 0:
                reg = sum((gates[n] * free[n]).sum() for n in names) / free_total
            else:
                reg = sum(g.sum() for g in gates.values()) / sum(g.numel() for g in gates.values())
            loss = F.cross_entropy(logits, y) + hp["c"] * reg
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                for n in names:  # gate gradients of weights earlier tasks use
                    ws[f"{n}.weight"].grad[frozen[n]] = 0
                    if f"{n}.bias" in ws:
                        ws[f"{n}.bias"].grad[self.cum[n]] = 0
                for e in emb.values():  # compensate for the annealed slope
                    se = torch.clamp(s * e, -hp["thres_cosh"], hp["thres_cosh"])
                    e.grad *= smax / s * (torch.cosh(se) + 1) / (torch.cosh(e.clamp(
                        -hp["thres_cosh"], hp["thres_cosh"])) + 1)
            torch.nn.utils.clip_grad_norm_([*ws.values(), *emb.values(), hw, hb], hp["clipgrad"])
            opt.step()
            with torch.no_grad():
                for e in emb.values():
                    e.clamp_(-hp["thres_emb"], hp["thres_emb"])
                for n in names:  # what earlier tasks use is restored bit for bit
                    k = f"{n}.weight"
                    ws[k].copy_(torch.where(frozen[n], frozen_vals[k], ws[k]))
                    if f"{n}.bias" in ws:
                        kb = f"{n}.bias"
                        ws[kb].copy_(torch.where(self.cum[n], frozen_vals[kb], ws[kb]))

        self.epochs(task, gen, hp["epochs"], step)
        self.params = {k: v.detach() for k, v in ws.items()}
        self.emb[t] = {n: e.detach() for n, e in emb.items()}
        self.heads[t] = (hw.detach(), hb.detach())
        for n in names:
            self.cum[n] |= self.emb[t][n] > 0

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        out = {f"gate.{n}": (e > 0).numpy().astype(np.uint8) for n, e in self.emb[t].items()}
        out.update(self.export_head(t))
        return out

    def used_fraction(self) -> float:
        total = sum(c.numel() for c in self.cum.values())
        return sum(int(c.sum()) for c in self.cum.values()) / total

    def _extra_state(self):
        state = {f"emb.{t}.{n}": e for t, d in enumerate(self.emb) for n, e in d.items()}
        state.update({f"cum.{n}": c.to(torch.uint8) for n, c in self.cum.items()})
        return state

    def _load_extra_state(self, state, n_tasks):
        names = list(self.cum)
        self.emb = [{n: state[f"emb.{t}.{n}"].clone() for n in names} for t in range(n_tasks)]
        self.cum = {n: state[f"cum.{n}"].bool().clone() for n in names}
