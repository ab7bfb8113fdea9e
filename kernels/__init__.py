"""edgecl.kernels: the C kernels of the device runtime, each with a numpy twin.

The hot paths of mask work -- materializing ``W ⊙ M`` from the mapped backbone and a
task's packed mask, masked optimizer steps that touch only free weights, nested
(PackNet) masks, mask algebra, packing -- and the depthwise convolutions of the numpy
executor and learner (forward, input and weight gradients), ReLU and the gradient
through a ReLU or clamp, as portable C99 built with
cffi (API mode) when the package is installed, with a numpy reference for each.

    from edgecl import kernels
    kernels.status()                        # "native (cffi, .../_native....so; ...)"
    out = kernels.materialize_bits(w, bits)
    kernels.masked_sgd_momentum_(w, g, buf, free_bits, lr=0.01, momentum=0.9)
    kernels.materialize_bits(w, bits, impl="numpy")   # the twin, explicitly

Every function takes ``impl=None`` (the active implementation), ``"native"`` or
``"numpy"``; the modules :mod:`edgecl.kernels.native` and
:mod:`edgecl.kernels.reference` hold each implementation by itself.

Where the compiled module cannot be loaded, the kernels fall back to numpy and warn
once (a RuntimeWarning, at the first kernel call). ``EDGECL_KERNELS=numpy`` forces
the fallback; ``EDGECL_KERNELS=native`` makes a missing native module an error.
Device side: this package imports numpy and cffi only.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

from . import reference

__all__ = [
    "available", "status", "implementation",
    "materialize_bits", "materialize_units", "pack", "unpack", "owner_mask", "free_mask",
    "threshold_mask", "popcount", "overlap", "hamming", "and_", "or_", "andnot",
    "masked_sgd_momentum_", "masked_adam_", "score_step_",
    "route_prototype", "prepare_route_prototype",
    "depthwise_conv2d", "depthwise_conv2d_grad_input", "depthwise_conv2d_grad_weight", "relu", "clamp_grad",
]

ENV = "EDGECL_KERNELS"

_impl_native: ModuleType | None = None
_native_error: str | None = None
try:
    from . import native as _impl_native
except Exception as e:  # ImportError, or an OSError from a broken .so
    _native_error = f"{type(e).__name__}: {e}"

_warned = False


def _mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "native", "numpy"):
        raise ValueError(f"{ENV} must be 'auto', 'native' or 'numpy', got {mode!r}")
    return mode


def _fallback_reason() -> str | None:
    """Why the numpy fallback is active, or None when the native kernels are."""
    mode = _mode()
    if mode == "numpy":
        return f"{ENV}=numpy"
    if _impl_native is None:
        return f"the compiled module could not be loaded ({_native_error})"
    return None


def available() -> bool:
    """True when the compiled kernels are loaded and in use."""
    return _fallback_reason() is None


def status() -> str:
    """One line for ``edgecl inspect``: which implementation runs, and why."""
    reason = _fallback_reason()
    if reason is None:
        return f"native (cffi, {_impl_native.PATH}; {_impl_native.BUILD_INFO})"
    return f"numpy fallback: {reason}"


def implementation(impl: str | None = None) -> ModuleType:
    """The module that runs kernels: ``impl`` None (active), "native" or "numpy"."""
    global _warned
    if impl == "numpy":
        return reference
    if impl == "native":
        if _impl_native is None:
            raise RuntimeError(f"edgecl native kernels are not available: {_native_error}")
        return _impl_native
    if impl is not None:
        raise ValueError(f"impl must be None, 'native' or 'numpy', got {impl!r}")
    reason = _fallback_reason()
    if reason is None:
        return _impl_native
    if _mode() == "native":
        raise RuntimeError(f"{ENV}=native but the native kernels are not available: {_native_error}")
    if not _warned:
        _warned = True
        warnings.warn(f"edgecl.kernels: using the numpy fallback, {reason}", RuntimeWarning,
                      stacklevel=3)
    return reference


def _dispatch(name: str):
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def kernel(*args, impl: str | None = None, **kwargs):
        return getattr(implementation(impl), name)(*args, **kwargs)

    return kernel


materialize_bits = _dispatch("materialize_bits")
materialize_units = _dispatch("materialize_units")
pack = _dispatch("pack")
unpack = _dispatch("unpack")
owner_mask = _dispatch("owner_mask")
free_mask = _dispatch("free_mask")
threshold_mask = _dispatch("threshold_mask")
popcount = _dispatch("popcount")
overlap = _dispatch("overlap")
hamming = _dispatch("hamming")
and_ = _dispatch("and_")
or_ = _dispatch("or_")
andnot = _dispatch("andnot")
masked_sgd_momentum_ = _dispatch("masked_sgd_momentum_")
masked_adam_ = _dispatch("masked_adam_")
score_step_ = _dispatch("score_step_")
route_prototype = _dispatch("route_prototype")
prepare_route_prototype = _dispatch("prepare_route_prototype")
depthwise_conv2d = _dispatch("depthwise_conv2d")
depthwise_conv2d_grad_input = _dispatch("depthwise_conv2d_grad_input")
depthwise_conv2d_grad_weight = _dispatch("depthwise_conv2d_grad_weight")
relu = _dispatch("relu")
clamp_grad = _dispatch("clamp_grad")
