"""Argument checks shared by the native kernels and their numpy twins.

Every kernel checks its arguments here before any C code runs, so C never reads or
writes past a buffer: a wrong dtype, shape, layout, size or an overlap of buffers is a
``ValueError`` that names the argument.
"""

from __future__ import annotations

import operator

import numpy as np


def nbytes_for(n: int) -> int:
    """Bytes of a packed mask of ``n`` bits."""
    return (n + 7) // 8


def count(name: str, n) -> int:
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def shape_of(name: str, shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        shape = tuple(count(name, d) for d in shape)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of ints, got {shape!r}") from None
    return shape


def array(name: str, a, dtypes: tuple, *, writable: bool = False) -> np.ndarray:
    """A C-contiguous ndarray of one of ``dtypes`` (writable if asked)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in dtypes:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{name} must have dtype {want}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return a


def f32(name: str, a, *, writable: bool = False) -> np.ndarray:
    return array(name, a, (np.dtype(np.float32),), writable=writable)


def int16(name: str, a) -> np.ndarray:
    return array(name, a, (np.dtype(np.int16),))


def bools(name: str, a, *, writable: bool = False) -> np.ndarray:
    """bool or uint8 (nonzero = 1)."""
    return array(name, a, (np.dtype(np.bool_), np.dtype(np.uint8)), writable=writable)


def bits(name: str, a, n: int, *, writable: bool = False) -> np.ndarray:
    """A packed mask: uint8, C-contiguous, holding at least ``n`` bits."""
    array(name, a, (np.dtype(np.uint8),), writable=writable)
    if a.size < nbytes_for(n):
        raise ValueError(f"{name} holds {a.size * 8} bits ({a.size} bytes), need {n} "
                         f"({nbytes_for(n)} bytes)")
    return a


def same_shape(name: str, a: np.ndarray, ref_name: str, ref: np.ndarray) -> None:
    if a.shape != ref.shape:
        raise ValueError(f"{name} has shape {a.shape}, {ref_name} has shape {ref.shape}")


def no_overlap(**arrays) -> None:
    """Buffers of one call must be distinct memory (the C side declares them restrict)."""
    items = [(k, v) for k, v in arrays.items() if v is not None and v.size]
    for i, (ka, a) in enumerate(items):
        for kb, b in items[i + 1:]:
            if np.may_share_memory(a, b):
                raise ValueError(f"{ka} and {kb} must not share memory")


def out_array(name: str, out, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A caller-owned output buffer, or a new one."""
    if out is None:
        return np.empty(shape, dtype)
    array(name, out, (np.dtype(dtype),), writable=True)
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}, need {tuple(shape)}")
    return out


def bits_arg(name: str, a, n) -> tuple[np.ndarray, int]:
    """A packed mask and its bit count (default: every bit of its bytes)."""
    array(name, a, (np.dtype(np.uint8),))
    n = a.size * 8 if n is None else count("n", n)
    bits(name, a, n)
    return a, n
