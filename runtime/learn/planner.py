"""The RAM planner: the bytes a learning run needs, and a batch size that fits.

Everything is float32 (4 bytes) unless said otherwise. With ``L`` the weighted layers,
``n_l`` the weights of layer l, ``T`` the set of layers with a trainable entry
(supsup: every layer; packnet: layers with a free weight; head: none), ``F`` the
feature width, ``C`` the new task's classes, ``B`` the batch, ``N`` the samples:

    weights     = backbone file bytes (mapped, paged in as read)
                  + 4 * sum_l n_l                  (materialized / trainable copies)
                  + sum_l n_l / 8 * (tasks + 2)   (packed masks: old, free, new)
    trainable   = supsup: 4 * sum_l n_l (scores);  packnet: 0 (the copy above);  head: 0
    gradients   = 4 * sum_{l in T} n_l           (free parameters' layers only)
    optimizer   = 2 * 4 * sum_{l in T} n_l       (Adam m and v)
    head        = 4 * 4 * (C*F + C)              (value, gradient, m, v)
    activations = 4 * B * (3 * sum_ops out_size + max_conv window size)
                  (forward cache of every op's output, the backward's two live gradients,
                  and the im2col view a conv materializes)
    data        = 4 * N * prod(input_shape) + 8 * N   (+ head mode: 4 * N * F features)
    slack       = 8 MiB                           (Python objects, temporaries)

The minimum is the plan at B = 1. The child's address-space limit is the baseline of a
bare child (measured: the interpreter, numpy, OpenBLAS' threads, the kernels) plus the
budget; see :mod:`edgecl.runtime.learn.child`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ..layers import output_shapes, weight_count

MiB = 1 << 20
SLACK = 8 * MiB


@dataclass
class Plan:
    batch_size: int
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    head: int
    activations: int
    data: int
    slack: int

    @property
    def total(self) -> int:
        return (self.weights + self.trainable + self.gradients + self.optimizer + self.head
                + self.activations + self.data + self.slack)

    def as_dict(self) -> dict:
        return dict(asdict(self), total=self.total)


def _op_sizes(layers: Sequence[dict], input_shape: Sequence[int]) -> tuple[list[int], int]:
    """Per-op output size (per sample) and the largest conv window view (per sample)."""
    shapes = output_shapes(layers, input_shape)
    win = 0
    for layer, before, after in zip(layers, [tuple(input_shape)] + shapes[:-1], shapes, strict=True):
        if layer["op"] == "conv2d":
            c, h, w = (int(v) for v in before)
            k, p = int(layer["kernel_size"]), int(layer.get("padding", 0))
            win = max(win, c * after[1] * after[2] * k * k + c * (h + 2 * p) * (w + 2 * p))
    return [math.prod(s) for s in shapes], win


def plan(model: dict, *, mode: str, n_tasks: int, n_classes: int, n_samples: int,
         batch_size: int, trainable_layers: Sequence[str] | None = None,
         backbone_bytes: int = 0) -> Plan:
    layers = model["layers"]
    counts = {layer["name"]: weight_count(layer) for layer in layers if layer["op"] in ("linear", "conv2d")}
    n_w = sum(counts.values())
    if mode == "head":
        t_layers: list[str] = []
    elif trainable_layers is None:
        t_layers = list(counts)
    else:
        t_layers = list(trainable_layers)
    n_t = sum(counts[n] for n in t_layers)
    feat = int(model["feature_dim"])
    sizes, win = _op_sizes(layers, model["input_shape"])
    in_size = math.prod(int(s) for s in model["input_shape"])
    b = int(batch_size)
    weights = backbone_bytes + 4 * n_w + (n_w // 8 + len(counts)) * (n_tasks + 2)
    if mode == "head":
        acts = 4 * b * (sum(sizes) + win)
        data = 4 * n_samples * (in_size + feat) + 8 * n_samples
    else:
        acts = 4 * b * (3 * sum(sizes) + win + 2 * n_classes)
        data = 4 * n_samples * in_size + 8 * n_samples
    return Plan(
        batch_size=b, weights=weights,
        trainable=4 * n_w if mode == "supsup" else 0,
        gradients=4 * n_t, optimizer=8 * n_t,
        head=16 * (n_classes * feat + n_classes),
        activations=acts, data=data, slack=SLACK)


def choose(budget_bytes: int | None, preferred_batch: int, **kw) -> tuple[Plan, Plan]:
    """(the plan for the largest batch <= preferred that fits, the minimum plan).

    Raises ``ValueError`` with the minimum when even a batch of 1 does not fit."""
    minimum = plan(batch_size=1, **kw)
    if budget_bytes is None:
        return plan(batch_size=preferred_batch, **kw), minimum
    if minimum.total > budget_bytes:
        raise ValueError(minimum.total)
    lo, hi = 1, max(1, int(preferred_batch))
    while lo < hi:  # the total grows with the batch: the largest that fits
        mid = (lo + hi + 1) // 2
        if plan(batch_size=mid, **kw).total <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return plan(batch_size=lo, **kw), minimum
