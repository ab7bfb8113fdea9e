"""GIS: gradient-importance subnetworks with model spawning, a mixture of models
(after Kulkarni, "Continual Learning With Mixture of Experts using subnetwork selection
and masking"; see docs/method-gis.md).

The method keeps a list of models (backbones): model 0 is the main backbone, models 1..
are spawned. A task lives on one model and owns weights of it as in PackNet:

* it trains the model's free weights (and its head) with the model's frozen weights of
  earlier tasks in the forward pass (reuse: knowledge transfer);
* after it converges, the gradient scores ``|w * dL/dw|`` over the last batches of its
  data, normalized per layer, select its subnetwork: the free weights whose score exceeds
  ``threshold``; the rest are released (+0.0 for this task) and the kept ones retrained;
* task t runs with the union of its model's subnetworks up to t (task kind
  ``weight_bits``), so later training of free weights cannot change it: exact zero
  forgetting.

Each task stores its binary map and its per-weight scores (host state). A new task's
binary map on each model (from a probe head on that model's frozen subnetworks) is
compared with the old tasks' maps: the Jaccard overlap (1 - Hamming distance / union) and
the mean score deviation on the overlapped weights pick the model whose tasks are
similar (constructive overlap), or a new model is spawned when the overlap is small or
destructive, or the model is nearly full.

Without task boundaries, :func:`detect_onsets` finds a new task's onset in an unlabeled
stream: a run of inputs whose label-free gradient scores (:meth:`GIS.input_scores`)
deviate from the current task's reference by more than a threshold calibrated on the
task's own data, more often than the task's own inputs do (a CUSUM over the inputs);
:func:`learn_stream` learns a labelled stream without boundaries that way. Without a task
id, :meth:`GIS.select` picks the model with the lowest pseudo-label loss, then its task
whose gradient scores deviate least (a batch, as in the paper).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.runtime.graph import Graph

from ..data import Task, _digits, _make_task, _stratified_split
from ..torchnet import Params, features, init_backbone
from .base import MASK_BITS, Method, free_fraction
from .tss import normalize_importance

# The figures a task records (task_metrics), in the order the run state stores them.
METRIC_KEYS = ("model", "spawned", "overlap", "deviation", "frozen_pct", "own_pct", "onset_threshold")


def _pseudo_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-input loss against the model's own prediction (no label needed)."""
    return F.cross_entropy(logits, logits.detach().argmax(1), reduction="none")


class GIS(Method):
    name = "gis"
    kind = MASK_BITS
    # threshold: per-layer normalized score above which a free weight joins the subnetwork;
    # score_batches: how many of the task's batches the scores average (the last ones);
    # overlap_min / deviation_max: below / above them a model's tasks are not similar
    # enough to share it; min_free: a model with less free weight is full; max_models:
    # the mixture's size cap (1: never spawn); probe_epochs: epochs of the probe head;
    # onset_batch / onset_margin: the batch size of selection and onset detection, and the
    # margin over the largest median deviation of a task's own batches (selection's scale);
    # onset_quantile / onset_drift / onset_alarm: the onset test, a CUSUM over inputs: an input
    # exceeds a task's reference above that quantile of its own inputs' deviations; the sum
    # of (exceeds - drift), floored at 0, reaching onset_alarm raises an onset (detect_onsets);
    # warm_start: 1 keeps released weights' trained values as the next task's start (they
    # run as +0.0 for the tasks that released them), 0 sets them to 0 as PackNet does.
    defaults = {"epochs": 30, "batch_size": 32, "lr": 1e-3, "threshold": 0.3, "retrain_epochs": 10,
                "score_batches": 8, "overlap_min": 0.35, "deviation_max": 0.25, "min_free": 0.1,
                "max_models": 4, "probe_epochs": 5, "onset_batch": 16, "onset_margin": 1.1,
                "onset_quantile": 0.9, "onset_drift": 0.3, "onset_alarm": 6.0, "warm_start": 1}

    def __init__(self, graph: Graph, seed: int = 0, backbone: dict[str, np.ndarray] | None = None,
                 **hp: float) -> None:
        super().__init__(graph, seed, backbone, **hp)
        self.weight_of = {s.node: s.weight for s in self.sites}
        self.spawned: list[dict[str, torch.Tensor]] = []  # models 1.. (model 0 is self.params)
        self.owner: list[dict[str, torch.Tensor]] = [self._no_owner()]
        self.task_model: list[int] = []
        self.scores: list[dict[str, torch.Tensor]] = []  # per task: normalized scores, float16
        self.metrics: list[dict[str, float]] = []
        # per task: class means of its inputs' scores, its batch and its input thresholds (reference)
        self.refs: list[tuple[torch.Tensor, float, float]] = []
        self._choice: tuple[int, float, float, bool] | None = None  # the task being learned

    # -- models ----------------------------------------------------------------------
    def _no_owner(self) -> dict[str, torch.Tensor]:
        return {s.node: torch.zeros(s.shape, dtype=torch.int16) for s in self.sites}

    @property
    def n_models(self) -> int:
        return 1 + len(self.spawned)

    def model(self, m: int) -> dict[str, torch.Tensor]:
        return self.params if m == 0 else self.spawned[m - 1]

    def _set_model(self, m: int, params: dict[str, torch.Tensor]) -> None:
        if m == 0:
            self.params = params
        else:
            self.spawned[m - 1] = params

    def _spawn(self) -> int:
        # a fresh draw of the graph's initialization, seeded by (seed, model index)
        m = self.n_models
        self.spawned.append(init_backbone(self.graph, torch.Generator().manual_seed(self.seed * 7919 + m)))
        self.owner.append(self._no_owner())
        return m

    def tasks_on(self, m: int) -> list[int]:
        return [t for t, mt in enumerate(self.task_model) if mt == m]

    def free_fraction(self, m: int) -> float:
        return free_fraction(self.owner[m])

    def frozen_per_layer(self, m: int) -> dict[str, float]:
        """Percentage of each masked layer of model ``m`` that tasks own (frozen)."""
        return {n: 100.0 * float((o > 0).double().mean()) for n, o in self.owner[m].items()}

    # -- what a task runs with --------------------------------------------------------
    def _masked(self, m: int, upto: int) -> dict[str, torch.Tensor]:
        """Model ``m``'s weights for task index ``upto``: its subnetworks 1..upto+1 (selection)."""
        out = dict(self.model(m)) if m else {}
        for n, own in self.owner[m].items():
            w = self.model(m)[self.weight_of[n]]
            keep = (own > 0) & (own <= upto + 1)
            out[self.weight_of[n]] = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
        return out

    def task_params(self, t: int) -> Params:
        if t < len(self.tasks):
            return self._masked(self.task_model[t], t)
        m = self._choice[0] if self._choice is not None else 0
        return dict(self.model(m)) if m else {}  # the task being learned: its model as it is

    def task_backbone(self, t: int) -> tuple[str, dict[str, np.ndarray]] | None:
        m = self.task_model[t]
        if m == 0:
            return None
        return f"model{m}", {k: v.detach().numpy().astype(np.float32) for k, v in self.model(m).items()}

    def export_task(self, t: int) -> dict[str, np.ndarray]:
        own = self.owner[self.task_model[t]]
        return self.encode_task({f"mask.{n}": ((o > 0) & (o <= t + 1)).numpy() for n, o in own.items()}, t)

    # -- gradient scores ------------------------------------------------------------------
    def _batches(self, x: np.ndarray, y: np.ndarray | None,
                 last: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The last ``last`` mini-batches of the data in its stored order (deterministic)."""
        bs = int(self.hp["batch_size"])
        n = max(1, -(-len(x) // bs))
        first = max(0, n - int(last)) if last > 0 else 0
        xt = self._x(x)
        yt = None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))
        return [(xt[i * bs:(i + 1) * bs], None if yt is None else yt[i * bs:(i + 1) * bs])
                for i in range(first, n)]

    def raw_scores(self, params: dict[str, torch.Tensor], head: tuple[torch.Tensor, torch.Tensor],
                   batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """Mean ``|w * dL/dw|`` of every masked weight over ``batches`` (labels, or the
        pseudo-label loss where a batch has none). ``params``: every graph parameter."""
        ws = {n: params[self.weight_of[n]].detach().clone().requires_grad_(True) for n in self.weight_of}
        full = {**params, **{self.weight_of[n]: w for n, w in ws.items()}}
        acc = {n: torch.zeros_like(w) for n, w in ws.items()}
        for x, y in batches:
            z = F.linear(features(self.graph, full, x), *head)
            loss = _pseudo_loss(z).mean() if y is None else F.cross_entropy(z, y)
            grads = torch.autograd.grad(loss, list(ws.values()))
            for n, g in zip(ws, grads, strict=True):
                acc[n] += (g * ws[n].detach()).abs()
        return {n: a / max(1, len(batches)) for n, a in acc.items()}

    @staticmethod
    def normalized(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: normalize_importance(r, 0) for n, r in raw.items()}

    # -- model choice: overlap and deviation against the old tasks' maps --------------------
    def _probe(self, m: int, task: Task, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The new task's normalized scores on model ``m`` as its old tasks left it: a probe
        head fitted on the frozen features (the model's subnetworks), then its gradients."""
        t_last = self.tasks_on(m)[-1]
        params = {**self.model(m), **self._masked(m, t_last)}
        x, y = self._x(task.x_train), torch.from_numpy(task.y_train)
        with torch.no_grad():
            h = features(self.graph, params, x)
        head = _fit_head(h, y, task.n_classes, gen, int(self.hp["probe_epochs"]), int(self.hp["batch_size"]))
        return self.normalized(self.raw_scores(params, head, self._batches(task.x_train, task.y_train,
                                                                           int(self.hp["score_batches"]))))

    def similarity(self, new: dict[str, torch.Tensor], t: int) -> tuple[float, float]:
        """(overlap, deviation) of a new task's normalized scores with old task ``t``: the
        Jaccard overlap of the binary maps (1 - Hamming distance / union size) and the mean
        absolute score difference on their common weights (1.0 where none)."""
        thr = float(self.hp["threshold"])
        own = self.owner[self.task_model[t]]
        inter = union = 0
        dev = 0.0
        for n, s in new.items():
            a, b = s > thr, own[n] == t + 1
            both = a & b
            inter += int(both.sum())
            union += int((a | b).sum())
            dev += float((s[both] - self.scores[t][n][both].float()).abs().double().sum())
        return (inter / union if union else 0.0), (dev / inter if inter else 1.0)

    def _choose_model(self, task: Task, gen: torch.Generator) -> tuple[int, float, float, bool]:
        """(model, its best overlap, that task's deviation, spawned?) for a new task."""
        if not self.tasks:
            return 0, 0.0, 0.0, False
        best = (-1, -1.0, 1.0)
        for m in range(self.n_models):
            if not self.tasks_on(m) or self.free_fraction(m) < float(self.hp["min_free"]):
                continue
            new = self._probe(m, task, gen)
            for t in self.tasks_on(m):
                ov, dev = self.similarity(new, t)
                if dev <= float(self.hp["deviation_max"]) and ov > best[1]:
                    best = (m, ov, dev)
        m, ov, dev = best
        if m >= 0 and ov >= float(self.hp["overlap_min"]):
            return m, ov, dev, False
        if self.n_models < int(self.hp["max_models"]):
            return self._spawn(), max(ov, 0.0), dev, True
        # the mixture is full: the model with the most free weight takes it
        m = max(range(self.n_models), key=self.free_fraction)
        return m, max(ov, 0.0), dev, False

    # -- learning ---------------------------------------------------------------------------
    def _begin_task(self, task: Task, gen: torch.Generator) -> None:
        self._choice = self._choose_model(task, gen)
        self._new_head(task.n_classes, gen)

    def _accuracy_at_init(self, task: Task, t: int) -> float:
        if self.pretrained:
            return self.accuracy(task.x_test, task.y_test, t)
        params = self._initial_backbone()
        with torch.no_grad():
            z = F.linear(features(self.graph, params, self._x(task.x_test)), *self.heads[t])
        return float((z.argmax(1).numpy() == task.y_test).mean())

    def _fit(self, task: Task, gen: torch.Generator, n_epochs: int, t: int, m: int,
             trainable: dict[str, torch.Tensor], train_rest: bool,
             hidden: dict[str, torch.Tensor] | None = None) -> None:
        """Train model ``m``'s weights where ``trainable`` (and the head); restore the rest
        bit for bit after every step; weights where ``hidden`` run as +0.0 (selected, not
        multiplied). Biases and other unmasked parameters train with the model's first task
        only, as in PackNet."""
        model = self.model(m)
        names = list(self.weight_of)
        masked = set(self.weight_of.values())
        ws = {n: model[self.weight_of[n]].clone().requires_grad_(True) for n in names}
        rest = {k: v.clone().requires_grad_(train_rest) for k, v in model.items() if k not in masked}
        hw, hb = (p.clone().requires_grad_(True) for p in self.heads[t])
        frozen = {n: (~trainable[n], model[self.weight_of[n]].clone()) for n in names}
        frozen_rest = {k: v.detach().clone() for k, v in rest.items()}
        opt = torch.optim.Adam(list(ws.values()) + [hw, hb] + (list(rest.values()) if train_rest else []),
                               lr=self.hp["lr"])

        def step(x: torch.Tensor, y: torch.Tensor, _progress: float) -> None:
            params = {**rest, **{self.weight_of[n]: w if hidden is None else
                                 torch.where(hidden[n], torch.zeros((), dtype=w.dtype), w)
                                 for n, w in ws.items()}}
            loss = F.cross_entropy(F.linear(features(self.graph, params, x), hw, hb), y)
            opt.zero_grad()
            loss.backward()
            for n in names:
                ws[n].grad[frozen[n][0]] = 0
            opt.step()
            with torch.no_grad():  # owned weights are written back bit for bit
                for n in names:
                    keep, old = frozen[n]
                    ws[n].copy_(torch.where(keep, old, ws[n]))
                if not train_rest:
                    for k, v in rest.items():
                        v.copy_(frozen_rest[k])

        self.epochs(task, gen, n_epochs, step)
        self._set_model(m, {**{k: v.detach() for k, v in rest.items()},
                            **{self.weight_of[n]: ws[n].detach() for n in names}})
        self.heads[t] = (hw.detach(), hb.detach())

    def _train_task(self, task: Task, gen: torch.Generator) -> None:
        t = len(self.tasks)
        m, overlap, deviation, spawned = self._choice
        owner = self.owner[m]
        first_on_model = not self.tasks_on(m)
        free = {n: own == 0 for n, own in owner.items()}
        self._fit(task, gen, self.hp["epochs"], t, m, free, train_rest=first_on_model)
        # Selection after convergence: scores over the task's last batches, normalized per
        # layer over the free weights (the candidates), above the threshold.
        raw = self.raw_scores(self.model(m), self.heads[t],
                              self._batches(task.x_train, task.y_train, int(self.hp["score_batches"])))
        thr = float(self.hp["threshold"])
        model = dict(self.model(m))
        for n, own in owner.items():
            cand = free[n]
            keep = torch.zeros_like(cand)
            if bool(cand.any()):
                keep[cand] = normalize_importance(raw[n][cand], 0) > thr
            own[keep] = t + 1
            if not self.hp["warm_start"]:
                w = model[self.weight_of[n]]
                model[self.weight_of[n]] = torch.where(cand & ~keep, torch.zeros((), dtype=w.dtype), w)
        self._set_model(m, model)
        mine = {n: own == t + 1 for n, own in owner.items()}
        # retrain the subnetwork with the released weights running as +0.0, as the task will
        released = {n: own == 0 for n, own in owner.items()}
        self._fit(task, gen, self.hp["retrain_epochs"], t, m, mine, train_rest=first_on_model,
                  hidden=released)
        # the stored scores: over the whole layer, of the task as it runs (its masked weights)
        params = {**self.model(m), **self._masked(m, t)}
        last = self._batches(task.x_train, task.y_train, int(self.hp["score_batches"]))
        stored = self.normalized(self.raw_scores(params, self.heads[t], last))
        self.scores.append({n: s.half() for n, s in stored.items()})
        self.task_model.append(m)
        self.refs.append(self.reference(params, self.heads[t], task.x_train))
        n_own = sum(int(v.sum()) for v in mine.values())
        n_all = sum(v.numel() for v in mine.values())
        self.metrics.append({"model": float(m), "spawned": float(spawned), "overlap": overlap,
                             "deviation": deviation, "frozen_pct": 100.0 * (1.0 - self.free_fraction(m)),
                             "own_pct": 100.0 * n_own / n_all, "onset_threshold": self.refs[t][1]})
        self._choice = None

    # -- gradient scores of an input, onset references, task-agnostic selection ------------------
    def input_scores(self, params: dict[str, torch.Tensor], head: tuple[torch.Tensor, torch.Tensor],
                     x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted class, per-input gradient scores of the predicted class's logit, label-free):
        ``|x * d logit/dx|`` (the first layer's weight scores summed per input unit) and
        ``|a * w_pred|`` (the head's weight scores, over the features ``a``; the runtime's
        gradient router computes this part, runtime/routers/gradient.py), each L1-normalized
        per input, concatenated. Integer inputs (token ids) have only the second."""
        grad_x = x.dtype.is_floating_point
        xg = x.detach().clone().requires_grad_(grad_x)
        with torch.enable_grad():
            a = features(self.graph, params, xg)
            z = F.linear(a, *head)
            pred = z.argmax(1)
            parts = []
            if grad_x:
                (gx,) = torch.autograd.grad(z.gather(1, pred[:, None]).sum(), xg)
                parts.append((gx * xg).detach().abs().reshape(len(x), -1))
        parts.append((a.detach() * head[0][pred]).abs())
        return pred, torch.cat([p / p.sum(1, keepdim=True).clamp(min=1e-12) for p in parts], 1)

    def reference(self, params: dict[str, torch.Tensor], head: tuple[torch.Tensor, torch.Tensor],
                  x: np.ndarray) -> tuple[torch.Tensor, float, float]:
        """A task's reference on its own inputs ``x``: per class, the mean score vector of
        the inputs predicted as it; the batch threshold, ``onset_margin`` x the largest
        median deviation over its windows of ``onset_batch`` consecutive inputs (the scale
        :meth:`select` compares tasks on); and the input threshold, the ``onset_quantile``
        of its inputs' deviations (the onset test's, :func:`detect_onsets`). Both are
        calibrated on the same data."""
        pred, g = self.input_scores(params, head, self._x(x))
        n = head[0].shape[0]
        # a class none of its inputs is predicted as: any input predicted as it deviates
        means = torch.stack([g[pred == c].mean(0) if bool((pred == c).any())
                             else torch.full((g.shape[1],), 1e9) for c in range(n)])
        dev = (g - means[pred]).abs().sum(1)
        bs = min(int(self.hp["onset_batch"]), len(dev))
        # every window of a batch's length, not only aligned batches: a stream's batches
        # fall anywhere in a task's data
        windows = dev.unfold(0, bs, 1).median(dim=1).values
        per_input = float(torch.quantile(dev.double(), float(self.hp["onset_quantile"])))
        return means, float(windows.max()) * float(self.hp["onset_margin"]), per_input

    def deviation(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Per-input deviation of ``x``'s scores under task ``t`` from the task's reference."""
        pred, g = self.input_scores(self._run_params(t), self.heads[t], x)
        return (g - self.refs[t][0][pred]).abs().sum(1)

    def exceeds(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Per input: does ``x`` deviate from task ``t``'s reference by more than the task's
        input threshold (its own inputs do so with probability 1 - ``onset_quantile``)?"""
        return self.deviation(t, x) > self.refs[t][2]

    @torch.no_grad()
    def closest_task(self, x: np.ndarray | torch.Tensor, exclude: Sequence[int] = ()) -> int:
        """The task (of any model) whose reference the inputs ``x`` exceed least: the
        fraction of them over its input threshold, ties by the median deviation over its
        batch threshold. Label-free, as :meth:`select`, but without the pseudo-label loss's
        model choice: a binary head is confident on foreign classes, and on tasks whose
        classes recur the loss picked the wrong model for a quarter of the batches."""
        xt = x if isinstance(x, torch.Tensor) else self._x(x)
        cand = [t for t in range(len(self.tasks)) if t not in set(exclude)]
        if not cand:
            raise ValueError("gis: no task left to choose from")
        key = {}
        for t in cand:
            d = self.deviation(t, xt)
            key[t] = (float((d > self.refs[t][2]).double().mean()), float(d.median()) / self.refs[t][1])
        return min(cand, key=key.__getitem__)

    def _run_params(self, t: int) -> dict[str, torch.Tensor]:
        m = self.task_model[t]
        return {**self.model(m), **self._masked(m, t)}

    @torch.no_grad()
    def select(self, x: np.ndarray | torch.Tensor) -> tuple[int, int]:
        """(model, task) for a batch without a task id: the model whose best task has the
        lowest pseudo-label loss, then its task whose gradient scores deviate least from the
        stored ones (the batch's median deviation, over the task's onset threshold)."""
        if not self.tasks:
            raise ValueError("gis: no task learned yet")
        xt = x if isinstance(x, torch.Tensor) else self._x(x)
        loss = [float(_pseudo_loss(self.logits(xt, t)).mean()) for t in range(len(self.tasks))]
        m = self.task_model[int(np.argmin(loss))]
        # relative to each task's threshold: tasks whose own data vary more compare fairly
        devs = {t: float(self.deviation(t, xt).median()) / self.refs[t][1] for t in self.tasks_on(m)}
        return m, min(devs, key=devs.__getitem__)

    def task_metrics(self, t: int) -> dict:
        m = self.metrics[t] if t < len(self.metrics) else {}
        out = {f"gis_{k}": round(float(v), 6) for k, v in m.items()}
        for k in ("model", "spawned"):
            if f"gis_{k}" in out:
                out[f"gis_{k}"] = int(out[f"gis_{k}"])
        if m:
            # a spawned model is a backbone of its own: 32 bits per weight, once, for its first task
            out["gis_backbone_bits_per_weight"] = 32.0 if m["spawned"] else 0.0
        return out

    # -- run state ---------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {"task_model": torch.tensor(self.task_model, dtype=torch.int64),
                                          "n_models": torch.tensor(self.n_models)}
        for m, params in enumerate(self.spawned, start=1):
            state.update({f"model{m}.{k}": v.contiguous() for k, v in params.items()})
        for m, own in enumerate(self.owner):
            state.update({f"owner{m}.{n}": o for n, o in own.items()})
        for t, s in enumerate(self.scores):
            state.update({f"score{t}.{n}": v.contiguous() for n, v in s.items()})
        for t, (means, _, per_input) in enumerate(self.refs):
            state[f"ref{t}"] = means.contiguous()
            state[f"onset{t}"] = torch.tensor([per_input], dtype=torch.float64)
        for t, mt in enumerate(self.metrics):
            state[f"gis_metrics.{t}"] = torch.tensor([mt[k] for k in METRIC_KEYS], dtype=torch.float64)
        return state

    def _load_extra_state(self, state: dict[str, torch.Tensor], n_tasks: int) -> None:
        n_models = int(state["n_models"])
        self.task_model = [int(v) for v in state["task_model"].tolist()]
        self.spawned = [{p: state[f"model{m}.{p}"].clone() for p in self.graph.params}
                        for m in range(1, n_models)]
        self.owner = [{s.node: state[f"owner{m}.{s.node}"].clone() for s in self.sites}
                      for m in range(n_models)]
        self.scores = [{s.node: state[f"score{t}.{s.node}"].clone() for s in self.sites}
                       for t in range(n_tasks)]
        self.metrics = [dict(zip(METRIC_KEYS, state[f"gis_metrics.{t}"].tolist(), strict=True))
                        for t in range(n_tasks)]
        # a state written before the input threshold existed: the largest window median
        # (the batch threshold without its margin) stands in for it
        self.refs = [(state[f"ref{t}"].clone(), float(self.metrics[t]["onset_threshold"]),
                      float(state[f"onset{t}"][0]) if f"onset{t}" in state
                      else float(self.metrics[t]["onset_threshold"]) / float(self.hp["onset_margin"]))
                     for t in range(n_tasks)]


# -- onset detection on an unlabeled stream ------------------------------------------------------
def detect_onsets(method: GIS, x: np.ndarray, batch_size: int | None = None, *, follow: str = "next",
                  start: int | None = None) -> list[int]:
    """Batch indices where a new task starts in the unlabeled stream ``x`` (no boundaries,
    no labels), for a method that has learned the stream's tasks.

    The stream arrives in batches (of ``onset_batch``); each input is tested against the
    current task's reference: does its deviation exceed the task's input threshold (the
    ``onset_quantile`` of its own training inputs' deviations)? A CUSUM over the inputs,
    ``S = max(0, S + exceeds - onset_drift)``, rises while more inputs exceed than the
    drift allows, and raises an alarm at ``onset_alarm``. A batch whose inputs are half the
    current task's (classes that recur) still rises on its foreign half, which a single
    batch's median did not. The new task is, with ``follow="next"``, the next in learning
    order (a learner that detects the end of the task it has converged on, then learns the
    next one), with ``follow="select"`` the one :meth:`GIS.closest_task` picks on the
    inputs from the rise (after the last ``S = 0``) to a batch past the alarm (mostly the
    new task's; the task just left excluded). The onset is placed where the inputs stop
    fitting the old task's reference and start fitting the new one's (:func:`_split`),
    reported as the batch holding it, and the test restarts at the alarm under the new
    task. After the last learned task (``follow="next"``) an alarm is placed in the rise's
    first batch that exceeds more than the drift allows, and detection stops. ``start``:
    the first current task (default: :meth:`GIS.closest_task` on the first batch). An
    onset placed in the batch of the previous one is not a second onset (the choice after
    it was wrong, and is corrected)."""
    if follow not in ("next", "select"):
        raise ValueError(f"detect_onsets: follow must be 'next' or 'select', got {follow!r}")
    bs = int(batch_size or method.hp["onset_batch"])
    drift, alarm_at = float(method.hp["onset_drift"]), float(method.hp["onset_alarm"])
    xt = method._x(x)
    onsets: list[int] = []
    current = method.closest_task(xt[:bs]) if start is None else int(start)
    i = 0
    while i < len(x):
        s, rise, alarm = 0.0, i, -1
        exceeded: list[bool] = []  # from input i on, under the current task
        for j in range(i, len(x), bs):  # batch by batch from where the test (re)started
            for e in method.exceeds(current, xt[j:j + bs]).tolist():
                exceeded.append(e)
                s = max(0.0, s + float(e) - drift)
                if s == 0.0:
                    rise = i + len(exceeded)
                if s >= alarm_at:
                    alarm = i + len(exceeded)
                    break
            if alarm >= 0:
                break
        if alarm < 0:
            break
        if follow == "next":
            if current + 1 >= len(method.tasks):  # no later task's reference to place it by
                onsets.append(_onset_batch(exceeded, i, rise, alarm, bs, drift))
                break
            new = current + 1
        else:
            new = method.closest_task(xt[rise:alarm + bs], exclude=(current,))
        # placed where the inputs stop fitting the old task and start fitting the new one
        onset = _split(exceeded, method.exceeds(new, xt[i:alarm]).tolist(), i) // bs
        if not onsets or onset > onsets[-1]:
            onsets.append(onset)
        current = new
        i = alarm
    return onsets


def _onset_batch(exceeded: Sequence[bool], first: int, rise: int, alarm: int, bs: int, drift: float) -> int:
    """The batch of the rise that first exceeds more than the drift allows (the part of it
    from the rise to the alarm): a rise begun by the odd deviating input of the old task
    just before the boundary is not placed a batch early."""
    for b in range(rise // bs, (alarm - 1) // bs + 1):
        part = exceeded[max(b * bs, rise) - first:min((b + 1) * bs, alarm) - first]
        if sum(part) > drift * len(part):
            return b
    return rise // bs


def _split(old: Sequence[bool], new: Sequence[bool], first: int) -> int:
    """The input index c (from ``first`` on) that minimizes the inputs before c exceeding
    the old task plus those from c on exceeding the new one; the latest of equal ones (a
    boundary found late by a few inputs is still in its batch or the next)."""
    cost = best = sum(new)
    at = 0
    for k in range(len(new)):
        cost += int(old[k]) - int(new[k])
        if cost <= best:
            best, at = cost, k + 1
    return first + at


def onset_precision_recall(detected: Sequence[int], boundaries: Sequence[int], batch_size: int,
                           tolerance: int = 1) -> dict[str, float]:
    """Precision and recall of detected onset batches against true task boundaries (sample
    indices, the first sample of each task after the first): a boundary is found when a
    detection falls on the batch holding its first sample or up to ``tolerance`` batches
    after; each detection matches at most one boundary."""
    want = [b // batch_size for b in boundaries]
    used: set[int] = set()
    hit = 0
    for w in want:
        for d in detected:
            if d not in used and w <= d <= w + tolerance:
                used.add(d)
                hit += 1
                break
    return {"precision": len(used) / len(detected) if detected else 1.0,
            "recall": hit / len(want) if want else 1.0, "detected": len(detected), "boundaries": len(want)}


def stream_of(tasks: Sequence[Task], train: bool = True) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The tasks' inputs one after another, their global labels and the true boundaries."""
    xs, ys, bounds, n = [], [], [], 0
    for i, t in enumerate(tasks):
        x, y = (t.x_train, t.y_train) if train else (t.x_test, t.y_test)
        if i:
            bounds.append(n)
        xs.append(x)
        ys.append(np.asarray(t.classes)[y])
        n += len(x)
    return np.concatenate(xs), np.concatenate(ys), bounds


# classes recur across tasks: (0,1), (2,3) then (0,2), (1,3) ...
OVERLAPPING_PAIRS = ((0, 1), (2, 3), (0, 2), (1, 3), (4, 5), (2, 4))


def overlapping_digits(seed: int = 0, pairs: Sequence[tuple[int, int]] = OVERLAPPING_PAIRS,
                       test_fraction: float = 0.25) -> list[Task]:
    """Binary digit tasks whose classes recur across tasks (each task its own samples of
    the class, drawn without replacement per class where the data allows)."""
    x, y = _digits()
    tr, te = _stratified_split(y, test_fraction, np.random.default_rng(seed))
    uses = {c: sum(c in p for p in pairs) for c in range(10)}
    seen = dict.fromkeys(range(10), 0)
    tasks = []
    for a, b in pairs:
        pick_tr, pick_te = [], []
        for c in (a, b):  # the class's samples split in as many parts as tasks use it
            idx_tr, idx_te = tr[y[tr] == c], te[y[te] == c]
            k, i = uses[c], seen[c]
            pick_tr.append(np.array_split(idx_tr, k)[i])
            pick_te.append(np.array_split(idx_te, k)[i])
            seen[c] += 1
        sel_tr, sel_te = np.sort(np.concatenate(pick_tr)), np.sort(np.concatenate(pick_te))
        tasks.append(_make_task(f"digits-{a}v{b}", [a, b], x, y, sel_tr, sel_te))
    return tasks


def learn_stream(method: GIS, x: np.ndarray, y: np.ndarray, *, warmup: int = 8, margin: float = 1.3,
                 test_fraction: float = 0.2) -> list[int]:
    """Learn a labelled stream given without task boundaries; returns the sample indices
    where it found tasks to start.

    Each segment's first ``warmup`` batches (of ``onset_batch``) are learned as a task by a
    copy of the method (the probe: converged on them, its reference and thresholds
    calibrated on them, both times ``margin``: a reference from a few batches is tighter
    than one from a whole task); the first onset :func:`detect_onsets` finds after them
    under the probe's reference ends the segment, which the method then learns as a task
    (classes: the labels it holds; a stratified ``test_fraction`` held out for its test
    accuracy). A label with fewer than half a batch of samples in a segment is spill from a
    batch that straddles a boundary: those samples are left out."""
    if len(x) != len(y):
        raise ValueError(f"learn_stream: {len(x)} inputs but {len(y)} labels")
    if warmup < 1:
        raise ValueError(f"learn_stream: warmup must be at least 1 batch, got {warmup}")
    bs = int(method.hp["onset_batch"])
    starts = [0]
    pos = 0
    while pos < len(x):
        end = pos + _segment_length(method, x[pos:], y[pos:], warmup, bs, margin)
        _learn_segment(method, x[pos:end], y[pos:end], len(method.tasks), test_fraction)
        pos = end
        if pos < len(x):
            starts.append(pos)
    return starts


def _segment_length(method: GIS, x: np.ndarray, y: np.ndarray, warmup: int, bs: int, margin: float) -> int:
    """Samples of ``x`` before the next onset (all of it when none): a copy of the method
    learns the first ``warmup`` batches as a task (converged, as the detector assumes),
    whose reference then tests the following batches."""
    n_warm = min(len(x), warmup * bs)
    if n_warm == len(x):
        return len(x)
    probe = copy.deepcopy(method)
    probe.hp["onset_margin"] = float(margin)
    _learn_segment(probe, x[:n_warm], y[:n_warm], len(method.tasks), 0.0)
    # its input threshold is an in-sample quantile of a few batches: loosened by the margin too
    means, batch_thr, input_thr = probe.refs[-1]
    probe.refs[-1] = (means, batch_thr, input_thr * float(margin))
    onsets = detect_onsets(probe, x[n_warm:], bs, start=len(probe.tasks) - 1)
    return n_warm + onsets[0] * bs if onsets else len(x)


def _fit_head(h: torch.Tensor, y: torch.Tensor, n_classes: int, gen: torch.Generator, epochs: int,
              bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head on fixed features ``h`` (Adam, cross-entropy)."""
    hw = torch.zeros(n_classes, h.shape[1], requires_grad=True)
    hb = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([hw, hb], lr=1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(h), generator=gen)
        for i in range(0, len(h), bs):
            idx = order[i:i + bs]
            loss = F.cross_entropy(F.linear(h[idx], hw, hb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return hw.detach(), hb.detach()


def _learn_segment(method: GIS, x: np.ndarray, y: np.ndarray, index: int, test_fraction: float) -> None:
    labels, counts = np.unique(y, return_counts=True)
    spill = labels[counts < max(1, int(method.hp["onset_batch"]) // 2)]
    if len(spill) and len(spill) < len(labels):
        keep = ~np.isin(y, spill)
        x, y = x[keep], y[keep]
    classes = sorted(int(c) for c in np.unique(y))
    if test_fraction > 0:
        tr, te = _stratified_split(y, test_fraction, np.random.default_rng(index))
    else:  # a probe: every sample trains, the test accuracy is on them too
        tr = te = np.arange(len(y))
    method.learn(_make_task(f"segment-{index}", classes, x, y, tr, te))
