"""The TVM backend: the bundle's compiled library for this machine, TVM runtime only.

Loads ``targets.<target>.file`` with ``tvm_ffi.load_module`` after
``libtvm_runtime.so`` (from the installed ``apache-tvm`` wheel, found without importing
the ``tvm`` Python package, which would pull in ``tvm.relax`` and the compiler).
Activation packs the task's ``W ⊙ M`` into the compiled layout once
(``packing.pack_params``); a call copies the batch into a 64-byte aligned buffer of one
of the compiled batch sizes (zero-padded) and slices the logits.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

import numpy as np

from . import Backend, BackendUnavailable, has_module
from .packing import aligned_empty, pack_params

_LOADED: dict[str, object] = {}


class _BlockTorch:
    """tvm_ffi imports torch when it can, for interop we do not use: keep it out (fast,
    and the device rule 'no torch' holds even on a host that has it)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not needed by edgecl's TVM backend")
        return None


def load_tvm_runtime():
    """``tvm_ffi`` with TVM's runtime library loaded (once per process)."""
    if "ffi" in _LOADED:
        return _LOADED["ffi"]
    block = "torch" not in sys.modules
    if block:
        sys.meta_path.insert(0, _BlockTorch())
    try:
        import tvm_ffi
    finally:
        if block:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BlockTorch)]
    lib = runtime_library()
    if lib is None:
        raise BackendUnavailable("libtvm_runtime.so (from the apache-tvm wheel) is not installed")
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    _LOADED["ffi"] = tvm_ffi
    return tvm_ffi


def runtime_library() -> Path | None:
    """``tvm/lib/libtvm_runtime.so`` on ``sys.path``, found without importing ``tvm``."""
    for entry in sys.path:
        lib = Path(entry or ".") / "tvm" / "lib" / "libtvm_runtime.so"
        if lib.is_file():
            return lib
    return None


def _pick_target(bundle, target: str | None) -> str | None:
    targets = bundle.manifest.get("targets", {})
    if target is not None:
        return target if target in targets else None
    from .. import profiles

    machine = platform.machine()
    if "host" in targets and targets["host"].get("machine") == machine:
        return "host"
    # The library built for *this* board: another aarch64 target's code may use
    # instructions this CPU lacks (jetson-orin's dotprod on a Pi 4).
    here = profiles.identify(profiles.detect())
    if here in profiles.PROFILES:
        name = profiles.get(here).tvm_target
        if targets.get(name, {}).get("machine") == machine:
            return name
    return None


class TvmBackend(Backend):
    name = "tvm"

    def __init__(self, bundle, target: str | None = None, **options) -> None:
        super().__init__(bundle, **options)
        self.target = _pick_target(bundle, target)
        if self.target is None:
            raise BackendUnavailable(f"the bundle holds no TVM library for {target or platform.machine()}")
        entry = bundle.manifest["targets"][self.target]
        self.entry = entry
        self.layout = entry["layout"]
        ffi = load_tvm_runtime()
        self._module = ffi.load_module(str(bundle.root / entry["file"]))
        self._batches = sorted(int(b) for b in self.layout["batches"])
        self._fns = {b: self._module[self.layout["functions"][str(b)]] for b in self._batches}
        shape = tuple(bundle.model["input_shape"])
        rows = int(self.layout["head_rows"])
        self._x = {b: aligned_empty((b, *shape)) for b in self._batches}
        self._y = {b: aligned_empty((b, rows)) for b in self._batches}
        self._packed: list[np.ndarray] = []

    @classmethod
    def available(cls, bundle=None) -> str | None:
        if not has_module("tvm_ffi") or runtime_library() is None:
            return "apache-tvm / apache-tvm-ffi are not installed"
        if bundle is not None and _pick_target(bundle, None) is None:
            return (f"the bundle holds no TVM library for this machine ({platform.machine()}): "
                    "run edgecl.compiler.tvm_build.compile_bundle")
        return None

    def _activate(self, info: dict) -> None:
        a = self.materialized(info)
        self._classes = len(info["classes"])
        self._packed = pack_params(self.bundle.model["layers"], self.bundle.model["input_shape"],
                                   a.params, a.head, self.layout)

    def _call(self, b: int, x: np.ndarray, n: int) -> np.ndarray:
        xb = self._x[b]
        xb[:n] = x
        if n < b:
            xb[n:] = 0.0
        self._fns[b](xb, *self._packed, self._y[b])
        return self._y[b][:n, : self._classes]

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        largest = self._batches[-1]
        if n <= largest:
            b = next(b for b in self._batches if b >= n)
            return self._call(b, x, n).copy()
        out = np.empty((n, self._classes), np.float32)
        for i in range(0, n, largest):
            m = min(largest, n - i)
            b = next(b for b in self._batches if b >= m)
            out[i:i + m] = self._call(b, x[i:i + m], m)
        return out


BACKEND = TvmBackend
