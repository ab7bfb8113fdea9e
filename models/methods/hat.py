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
from ..torchnet import Params
from .base import MASK_UNITS, Method

# Ops after which channel c of the output is channel c of the input and a gated-off
# (all-zero) channel stays all zero (not BatchNormalization or Sigmoid: they shift 0).
_CHANNELWISE = {"Relu", "Clip", "HardSwish", "Tanh", "Gelu", "MaxPool", "AveragePool",
                "GlobalAveragePool", "Flatten"}


class HAT(Method):
    name = "hat"
    kind = MASK_UNITS
    defaults = {"epochs": 40, "batch_size": 32, "lr": 0.05, "smax": 400.0, "c": 0.75,
                "thres_cosh": 50.0, "thres_emb": 6.0, "clipgrad": 10000.0}

    def __init__(self, graph, seed=0, backbone=None, **hp):
        super().__init__(graph, seed, backbone, **hp)
        self.emb: list[dict[str, torch.Tensor]] = []
        self.cum = {s.node: torch.zeros(s.units, dtype=torch.bool) for s in self.sites}

    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        self._new_head(task.n_classes, gen)
        self.emb.append({s.node: torch.randn(s.units, generator=gen) for s in self.sites})

    def task_params(self, t: int) -> Params:
        return {}

    def task_gates(self, t: int) -> dict[str, torch.Tensor]:
        return {n: (e > 0).float() for n, e in self.emb[t].items()}

    def _gated_source(self) -> dict[str, str | None]:
        """Per site: the gated site whose units are its input channels, when the input
        comes from it through ops that keep channels apart; else None."""
        producer = {o: n for n in self.graph.backbone_nodes for o in n.outputs}
        sites = {s.node for s in self.sites}
        out = {}
        for site in self.sites:
            node = next(n for n in self.graph.backbone_nodes if n.name == site.node)
            value, src = node.inputs[0], None
            while value in producer:
                p = producer[value]
                if p.name in sites:
                    src = p.name
                    break
                if p.op not in _CHANNELWISE:
                    break
                value = p.inputs[0]
            out[site.node] = src
        return out

    def _frozen(self) -> dict[str, torch.Tensor]:
        """Per weight: True where both its unit and its input unit belong to earlier tasks.

        Where the input units are not one gated layer's (the graph input, a residual
        Add, a Concat), every input counts as in use: the whole row of an owned unit is
        frozen, which keeps forgetting exactly zero at some cost in capacity."""
        out = {}
        source = self._gated_source()
        for site in self.sites:
            n = site.node
            rows = self.cum[n]
            w = self.params[site.weight]
            src = source[n]
            if src is None or site.op == "Conv" and self._group(n) != 1:
                cols = torch.ones(w.shape[1], dtype=torch.bool)
            elif w.shape[1] != self.cum[src].numel():
                cols = self.cum[src].repeat_interleave(w.shape[1] // self.cum[src].numel())  # flattened
            else:
                cols = self.cum[src]
            shape = (-1,) + (1,) * (w.dim() - 1)
            colshape = (1, -1) + (1,) * (w.dim() - 2)
            out[n] = (rows.view(shape) & cols.view(colshape)).expand_as(w)
        return out

    def _group(self, node: str) -> int:
        return next(n for n in self.graph.backbone_nodes if n.name == node).attrs.get("group", 1)

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        hp = self.hp
        smax = hp["smax"]
        names = [site.node for site in self.sites]
        wname = {site.node: site.weight for site in self.sites}
        bname = {site.node: site.bias for site in self.sites}
        ws = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        emb = {n: e.clone().requires_grad_(True) for n, e in self.emb[t].items()}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        frozen = self._frozen()
        other = [k for k in ws if k not in set(wname.values()) | {b for b in bname.values() if b}]
        frozen_vals = {k: v.clone() for k, v in self.params.items()}
        free = {n: (~c).float() for n, c in self.cum.items()}
        free_total = sum(f.sum() for f in free.values())
        opt = torch.optim.SGD([*ws.values(), *emb.values(), hw, hb], lr=hp["lr"])

        def step(x, y, progress):
            s = 1.0 / smax + (smax - 1.0 / smax) * progress
            gates = {n: torch.sigmoid(s * e) for n, e in emb.items()}
            logits = F.linear(self.run_features(x, ws, gates), hw, hb)
            if free_total > 0:
                reg = sum((gates[n] * free[n]).sum() for n in names) / free_total
            else:
                reg = sum(g.sum() for g in gates.values()) / sum(g.numel() for g in gates.values())
            loss = F.cross_entropy(logits, y) + hp["c"] * reg
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                for n in names:  # gate gradients of weights earlier tasks use
                    ws[wname[n]].grad[frozen[n]] = 0
                    if bname[n]:
                        ws[bname[n]].grad[self.cum[n]] = 0
                for k in other:  # parameters outside the gated sites: the first task's
                    if ws[k].grad is not None and t > 0:
                        ws[k].grad.zero_()
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
                    k = wname[n]
                    ws[k].copy_(torch.where(frozen[n], frozen_vals[k], ws[k]))
                    if bname[n]:
                        kb = bname[n]
                        ws[kb].copy_(torch.where(self.cum[n], frozen_vals[kb], ws[kb]))
                if t > 0:
                    for k in other:
                        ws[k].copy_(frozen_vals[k])

        self.epochs(task, gen, hp["epochs"], step)
        self.params = {k: v.detach() for k, v in ws.items()}
        self.emb[t] = {n: e.detach() for n, e in emb.items()}
        self.heads[t] = (hw.detach(), hb.detach())
        for n in names:
            self.cum[n] |= self.emb[t][n] > 0

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        return self.encode_task({f"gate.{n}": (e > 0).numpy().astype(np.uint8)
                                 for n, e in self.emb[t].items()}, t)

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
