"""Mask encodings of the bundle, and the numpy reference for materializing weights.

Weight-level masks are bit-packed: the weight tensor is flattened in C order and bit
``i`` of the mask is bit ``i % 8`` (least significant first) of byte ``i // 8``
(``numpy.packbits(..., bitorder="little")``). Unit masks (HAT) are one byte per output
unit (row of a linear weight, output channel of a convolution), 0 or 1.

Materializing selects rather than multiplies: a masked-out weight becomes +0.0 whatever
its sign, so old tasks' outputs stay byte-identical when free weights change later.
"""

from __future__ import annotations

import numpy as np


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Bool array of any shape -> uint8 bytes in the bundle's bit order."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder="little")


def unpack_bits(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 bytes in the bundle's bit order -> bool array of ``shape``."""
    n = int(np.prod(shape, dtype=np.int64))
    flat = np.unpackbits(np.asarray(bits, dtype=np.uint8), count=n, bitorder="little")
    return flat.view(bool).reshape(shape)


def materialize_bits(weight: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``W ⊙ M`` for a bit-packed weight-level mask (masked-out entries are +0.0)."""
    mask = unpack_bits(bits, weight.shape)
    return np.where(mask, weight, np.zeros((), weight.dtype))


def materialize_units(weight: np.ndarray, gates: np.ndarray) -> np.ndarray:
    """Rows / output channels of ``weight`` kept where ``gates`` is 1, else +0.0."""
    keep = np.asarray(gates, dtype=bool).reshape((-1,) + (1,) * (weight.ndim - 1))
    return np.where(keep, weight, np.zeros((), weight.dtype))


def density(bits: np.ndarray, n: int) -> float:
    """Fraction of ones among the first ``n`` bits."""
    if n == 0:
        return 0.0
    return float(unpack_bits(bits, (n,)).sum()) / n
