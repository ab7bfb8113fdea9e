"""Gradient-score routing, after the subnetwork-selection seed paper: compare the
gradient an input induces in each task's subnetwork with the gradients that task's own
data induced.

For task t and input x, the score vector is |a ⊙ ∂logit_ŷ/∂a| over the backbone
features a (the head's input) (ŷ: the task's predicted class; gradient × activation, the usual
importance score), L1-normalized. Each task stores, per class, the mean of these
vectors over its own inputs; the router's score is minus the L1 deviation of an input's
vector from the stored one of its predicted class. (The entropy's gradient vanishes on
confident inputs, which is why the winning logit is used.) Adding a task stores its
statistics only.
"""

from __future__ import annotations

import numpy as np

from .base import Router


def _grad_scores(runtime, x: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, L1-normalized |a ⊙ ∂logit_ŷ/∂a|) at the backbone features."""
    from .. import executor

    active = runtime.activate(task)
    a = executor.features(active.graph, active.params, x)  # the task's own graph, if it has one
    hw, hb = active.head
    pred = (a @ hw.T + hb).argmax(axis=1)
    g = np.abs(a * hw[pred])  # gradient of the winning logit times activation, per unit
    return pred, g / np.clip(g.sum(axis=1, keepdims=True), 1e-12, None)


class GradientRouter(Router):
    name = "gradient"

    def __init__(self) -> None:
        super().__init__()
        self.mean: list[np.ndarray] = []  # per task: [classes, units]

    def _add(self, runtime, task, x, y):
        pred, g = _grad_scores(runtime, runtime.check_input(x), task)
        n_classes = runtime.activate(task).head[0].shape[0]
        # per class of the task: the mean score vector of the inputs predicted as it
        self.mean.append(np.stack([g[pred == c].mean(axis=0) if (pred == c).any()
                                   else np.full(g.shape[1], np.inf) for c in range(n_classes)]))

    def scores(self, runtime, x):
        x = runtime.check_input(x)
        out = np.empty((len(x), len(self.tasks)))
        for t, task in enumerate(self.tasks):
            pred, g = _grad_scores(runtime, x, task)
            out[:, t] = -np.abs(g - self.mean[t][pred]).sum(axis=1)
        return out

    def _arrays(self):
        return {f"mean.{t}": m for t, m in enumerate(self.mean)}

    def _load_arrays(self, a):
        self.mean = [np.array(a[f"mean.{t}"]) for t in range(len(self.tasks))]
