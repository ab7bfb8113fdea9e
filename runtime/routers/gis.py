"""The GIS router (gradient-importance subnetworks with a mixture of models, after
Kulkarni's subnetwork-selection paper; docs/method-gis.md): first the model, then the
task within it.

Per input: the model (backbone) whose best task has the lowest pseudo-label loss (the
cross-entropy of a task's output against its own prediction: no label needed); then,
among that model's tasks, the one whose gradient scores deviate least from the scores
its own data induced: the gradient router's score (``GradientRouter``), reused as is.
Tasks of the other models score below every task of the chosen one, so the shared
decision (confidence, novelty, fallback) works unchanged. With one model (no task on a
backbone of its own) it routes as the gradient router does. Adding a task stores the
gradient router's statistics only.
"""

from __future__ import annotations

import numpy as np

from .gradient import GradientRouter

# deviations are L1 distances of L1-normalized vectors, so in [0, 2]: tasks off the
# chosen model are pushed below any task on it
OFF_MODEL = 4.0


def pseudo_label_loss(logits: np.ndarray) -> np.ndarray:
    """Per input: cross-entropy against the argmax of the logits (``logsumexp - max``)."""
    z = logits.astype(np.float64)
    top = z.max(axis=1)
    return np.log(np.exp(z - top[:, None]).sum(axis=1))


class GisRouter(GradientRouter):
    name = "gis"

    def models(self, runtime) -> list[str]:
        """The backbone each routed task runs on (the bundle's main one unless it has its own)."""
        b = runtime.bundle
        return [b.task(task).get("backbone", b.main) for task in self.tasks]

    def chosen_models(self, runtime, x: np.ndarray) -> np.ndarray:
        """Per input, the model whose best task has the lowest pseudo-label loss."""
        x = runtime.check_input(x)
        models = self.models(runtime)
        names = sorted(set(models))
        loss = np.stack([pseudo_label_loss(runtime.logits(x, task)) for task in self.tasks], axis=1)
        per_model = np.stack([loss[:, [t for t, m in enumerate(models) if m == name]].min(axis=1)
                              for name in names], axis=1)
        return np.asarray(names)[per_model.argmin(axis=1)]

    def scores(self, runtime, x):
        # minus the gradient-score deviation, per task; -inf (a class the task's own data
        # never predicted) is the largest deviation there is, still on its model
        dev = np.maximum(super().scores(runtime, x), -2.0)
        if len(set(self.models(runtime))) == 1:
            return dev
        chosen = self.chosen_models(runtime, x)
        inside = np.asarray(self.models(runtime))[None, :] == chosen[:, None]
        return np.where(inside, dev, dev - OFF_MODEL)
