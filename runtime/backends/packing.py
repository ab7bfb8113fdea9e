"""Host buffers for the TVM runtime: numpy only, device side.

Compiled TVM code assumes 64-byte aligned tensors (``tvm_ffi.from_dlpack`` refuses
others, and an unaligned buffer passed another way can crash the kernel), and DLPack
cannot export a read-only array (the backbone is a read-only memory map). Arrays go to
TVM through these helpers. There is no per-op weight layout here any more: a compiled
library transforms its own weights (``transform_params``, derived by the compiler).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALIGN = 64


def aligned_empty(shape: Sequence[int], dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(n * dtype.itemsize + ALIGN, dtype=np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n * dtype.itemsize].view(dtype).reshape(tuple(shape))


def aligned_copy(a: np.ndarray, dtype=None) -> np.ndarray:
    a = np.asarray(a)
    out = aligned_empty(a.shape, a.dtype if dtype is None else dtype)
    out[...] = a
    return out


def is_aligned(a: np.ndarray, dtype=np.float32) -> bool:
    """Whether ``a`` can go to TVM as is (dtype, C order, writable, 64-byte aligned)."""
    return (a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.flags.writeable
            and a.ctypes.data % ALIGN == 0)


def as_aligned(a, dtype=np.float32) -> np.ndarray:
    """``a`` itself when it can go to TVM as is, else an aligned copy."""
    a = np.asarray(a)
    return a if is_aligned(a, dtype) else aligned_copy(a, dtype)
