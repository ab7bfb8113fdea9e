"""Mask encodings of the bundle, and materializing a task's weights from them.

Weight-level masks are bit-packed: the weight tensor is flattened in C order and bit
``i`` of the mask is bit ``i % 8`` (least significant first) of byte ``i // 8``
(``numpy.packbits(..., bitorder="little")``). Unit masks (HAT) are one byte per output
unit (row of a linear weight, output channel of a convolution), 0 or 1.

Materializing selects rather than multiplies: a masked-out weight becomes +0.0 whatever
its sign, so old tasks' outputs stay byte-identical when free weights change later.

These functions run the C kernels of :mod:`edgecl.kernels` when they are built (float32
weights, the common case) and their numpy twins otherwise; both give the same bytes.
"""

from __future__ import annotations

import numpy as np

from .. import kernels


def _bytes(bits) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(bits, dtype=np.uint8)).reshape(-1)


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Bool array of any shape -> uint8 bytes in the bundle's bit order."""
    return kernels.pack(np.ascontiguousarray(np.asarray(mask, dtype=bool)))


def unpack_bits(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 bytes in the bundle's bit order -> bool array of ``shape``."""
    return kernels.unpack(_bytes(bits), tuple(int(d) for d in shape))


def materialize_bits(weight: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``W ⊙ M`` for a bit-packed weight-level mask (masked-out entries are +0.0)."""
    if weight.dtype == np.float32:
        return kernels.materialize_bits(np.ascontiguousarray(weight), _bytes(bits))
    mask = unpack_bits(bits, weight.shape)
    return np.where(mask, weight, np.zeros((), weight.dtype))


def materialize_units(weight: np.ndarray, gates: np.ndarray) -> np.ndarray:
    """Rows / output channels of ``weight`` kept where ``gates`` is 1, else +0.0."""
    gates = np.asarray(gates)
    if weight.dtype == np.float32 and weight.ndim >= 1 and gates.size == weight.shape[0]:
        keep = np.ascontiguousarray(gates.reshape(-1) != 0)
        return kernels.materialize_units(np.ascontiguousarray(weight), keep)
    keep = np.asarray(gates, dtype=bool).reshape((-1,) + (1,) * (weight.ndim - 1))
    return np.where(keep, weight, np.zeros((), weight.dtype))


def density(bits: np.ndarray, n: int) -> float:
    """Fraction of ones among the first ``n`` bits."""
    if n == 0:
        return 0.0
    return kernels.popcount(_bytes(bits), n) / n
