"""The TVM backend: the bundle's compiled library for this machine, TVM runtime only.

Loads ``targets.<target>.file`` with ``tvm_ffi.load_module`` after
``libtvm_runtime.so`` (from the installed ``apache-tvm`` wheel, found without importing
the ``tvm`` Python package, which would pull in ``tvm.relax`` and the compiler).
The library is a Relax VM executable (``compiler/tvm_build.py``): ``transform_params``
takes the task's ``W ⊙ M`` by the graph's parameter names plus the (padded) head and
returns the weights in the compiled layout, once per activation; ``forward_b{B}`` takes
a batch of one of the compiled sizes and those weights. A call copies the batch into a
64-byte aligned buffer (zero-padded) and slices the logits.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from pathlib import Path

import numpy as np

from . import Backend, BackendUnavailable, has_module
from .packing import aligned_empty, as_aligned

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


VM_KIND = "relax-vm"
KDL_CPU, POOLED_ALLOCATOR = 1, 2


def load_vm(ffi, path: Path):
    """The Relax VM of a compiled library, initialised on the CPU (pooled allocator)."""
    lib = ffi.load_module(str(path))
    vm = lib["vm_load_executable"]()
    vm["vm_initialization"](KDL_CPU, 0, POOLED_ALLOCATOR)
    return vm


def _entry_problem(entry: dict) -> str | None:
    if (entry.get("layout") or {}).get("kind") != VM_KIND:
        return ("its TVM library was built by an older edgecl (a hand-packed layer-table layout): "
                "compile the bundle again (edgecl compile)")
    return None


class TvmBackend(Backend):
    name = "tvm"

    def __init__(self, bundle, target: str | None = None, **options) -> None:
        super().__init__(bundle, **options)
        self.target = _pick_target(bundle, target)
        if self.target is None:
            raise BackendUnavailable(f"the bundle holds no TVM library for {target or platform.machine()}")
        entry = bundle.manifest["targets"][self.target]
        why = _entry_problem(entry)
        if why:
            raise BackendUnavailable(why)
        self.entry = entry
        self.layout = entry["layout"]
        self._ffi = ffi = load_tvm_runtime()
        self._vm = load_vm(ffi, bundle.store.extract(entry["file"]))
        self._transform = self._vm[self.layout["transform"]]
        self._batches = sorted(int(b) for b in self.layout["batches"])
        self._fns = {b: self._vm[self.layout["functions"][str(b)]] for b in self._batches}
        graph = bundle.graph
        self._dtype = np.dtype(self.layout.get("input", {}).get("dtype", graph.input.dtype))
        self._x = {b: aligned_empty((b, *graph.input_shape), self._dtype) for b in self._batches}
        self._xt = {b: ffi.from_dlpack(self._x[b]) for b in self._batches}
        self._rows = int(self.layout["head_rows"])
        self._weights: list = []

    @classmethod
    def available(cls, bundle=None) -> str | None:
        if not has_module("tvm_ffi") or runtime_library() is None:
            return "apache-tvm / apache-tvm-ffi are not installed"
        if bundle is not None:
            target = _pick_target(bundle, None)
            if target is None:
                return (f"the bundle holds no TVM library for this machine ({platform.machine()}): "
                        f"run: edgecl compile {bundle.root} --target host")
            return _entry_problem(bundle.manifest["targets"][target])
        return None

    def _activate(self, info: dict) -> None:
        """The task's W ⊙ M (by the graph's parameter names) and head through the library's
        own weight transform, once; the transformed tensors stay on the TVM side."""
        a = self.materialized(info)
        hw, hb = (np.asarray(h, np.float32) for h in a.head)
        classes = hw.shape[0]
        if classes > self._rows:
            raise ValueError(f"the task has {classes} classes; the compiled head holds {self._rows}")
        head_w = np.zeros((self._rows, hw.shape[1]), np.float32)
        head_w[:classes] = hw
        head_b = np.zeros(self._rows, np.float32)
        head_b[:classes] = hb
        arrays = {**a.params, "head.weight": head_w, "head.bias": head_b}
        params = self.bundle.graph.params
        # by the graph's shapes (a scalar stored as [1] is a 0-d input)
        tensors = [self._ffi.from_dlpack(as_aligned(np.reshape(arrays[name], params[name].shape)
                                                    if name in params else arrays[name]))
                   for name in self.layout["params"]]
        self._weights = list(self._transform(tensors))
        self._classes = classes

    def _call(self, b: int, x: np.ndarray, n: int) -> np.ndarray:
        xb = self._x[b]
        xb[:n] = x
        if n < b:
            xb[n:] = 0
        out = self._fns[b](self._xt[b], *self._weights)
        return np.from_dlpack(out)[:n, : self._classes]

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
