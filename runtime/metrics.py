"""Continual-learning metrics as the literature defines them (Lopez-Paz & Ranzato, 2017).

``R[i][j]`` is the accuracy on task j after learning tasks 0..i. With T tasks:

* ACC = mean_j R[T-1][j]
* BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])            (0.0 means no forgetting)
* FWT = mean_{j>0}   (R[j-1][j] - b_j)                 (b_j: accuracy at initialization)
"""

from __future__ import annotations

from collections.abc import Sequence


def acc(r: Sequence[Sequence[float | None]]) -> float:
    last = r[-1]
    return float(sum(last) / len(last))


def bwt(r: Sequence[Sequence[float | None]]) -> float:
    t = len(r)
    if t < 2:
        return 0.0
    return float(sum(r[-1][j] - r[j][j] for j in range(t - 1)) / (t - 1))


def fwt(before: Sequence[float | None], init: Sequence[float | None]) -> float | None:
    """``before[j] = R[j-1][j]``, ``init[j] = b_j``; entry 0 is ignored."""
    pairs = [(b, i) for b, i in zip(before[1:], init[1:], strict=True)]
    if not pairs or any(b is None or i is None for b, i in pairs):
        return None
    return float(sum(b - i for b, i in pairs) / len(pairs))
