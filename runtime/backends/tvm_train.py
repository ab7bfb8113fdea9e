"""The compiled training step of a bundle (``compiler/tvm_train.py``), TVM runtime only.

    from edgecl.runtime.backends.tvm_train import load_train_step
    step = load_train_step("bundle/", "host")          # or target=None: this machine's
    a = Runtime("bundle/").activate("digits-0-1")       # a.params: graph name -> W_eff (W ⊙ M) ...
    loss, grads = step(x, labels, a.params, a.head)     # labels: ints in [0, classes) or one-hot
    grads["fc1.weight"], grads["fc1.bias"], grads["head.weight"], grads["head.bias"]

``params`` maps every parameter the backbone reads, by its graph name, to its array
(``ActiveTask.params``: masked weights are the effective ones). ``loss`` is the mean
softmax cross-entropy over the batch (float); ``grads`` maps each differentiated
parameter (``step.gradients``: every masked weight and its bias, by graph name, then
``head.weight``, ``head.bias``) to dL/d(that tensor) in its PyTorch layout and shape
(the head's ``[classes, F]``, not padded). The weights are the *effective* ones, so the
gradients are dL/dW_eff; ``packnet_update`` and ``score_grad`` turn them into a method's
gradient. ``step(..., return_logits=True)`` also returns the batch's logits.

The library is a Relax VM executable loaded through ``tvm_ffi`` and
``libtvm_runtime.so`` (never ``import tvm``: no compiler, no torch on the device).
Batches are zero-padded to the compiled size (padded rows have zero label weight and
contribute nothing) or cut into chunks of it whose losses and gradients add up.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from . import BackendUnavailable
from .packing import aligned_empty, is_aligned
from .tvm import _pick_target, load_tvm_runtime, load_vm


def _param(params: Mapping, name: str):
    """``params[name]``; a format-1 ``{layer: (weight, bias)}`` mapping is read too."""
    if name in params:
        return params[name]
    layer, _, kind = name.rpartition(".")
    pair = params.get(layer)
    if isinstance(pair, (tuple, list)) and kind in ("weight", "bias"):
        return pair[0] if kind == "weight" else pair[1]
    raise KeyError(f"params lacks {name!r} (the train step takes every backbone parameter by its graph name)")


def train_step_entry(bundle: Bundle, target: str | None = None) -> tuple[str | None, dict | None]:
    """(the target, its manifest ``train_step`` entry) for ``target`` (None: this
    machine's); the entry is None when the bundle holds no built step for it."""
    name = _pick_target(bundle, target)
    entry = (bundle.manifest.get("targets", {}).get(name) or {}).get("train_step") if name else None
    return name, entry


def has_train_step(bundle: Bundle, target: str | None = None) -> bool:
    """Whether the bundle holds a built training step for ``target`` (None: this machine)."""
    entry = train_step_entry(bundle, target)[1]
    return bool(entry) and "file" in entry


class TrainStep:
    """``step(x, y, params, head) -> (loss, grads)``; see the module docstring."""

    def __init__(self, bundle: Bundle, target: str | None = None) -> None:
        name, entry = train_step_entry(bundle, target)
        if not entry or "file" not in entry:
            why = (entry or {}).get("status", f"run: edgecl compile {bundle.root} --target host")
            raise BackendUnavailable(f"the bundle holds no TVM train step for "
                                     f"{target or 'this machine'}: {why}")
        self.bundle, self.target, self.entry = bundle, name, entry
        self._ffi = load_tvm_runtime()
        self._vm = load_vm(self._ffi, bundle.store.extract(entry["file"]))
        self._fn = self._vm[entry["function"]]
        self.batch = int(entry["batch"])
        self.head_rows = int(entry["head_rows"])
        self.names = list(entry["inputs"][2:])  # backbone parameters, head.weight, head.bias
        self.gradients = list(entry.get("gradients", self.names))
        graph = bundle.graph
        self._dtype = np.dtype(graph.input.dtype)
        self._x = aligned_empty((self.batch, *graph.input_shape), self._dtype)
        self._y = aligned_empty((self.batch, self.head_rows))
        self._hw = self._hb = None
        self._bufs: dict[str, np.ndarray] = {}

    def _tensor(self, name: str, a) -> object:
        a = np.asarray(a)
        if not is_aligned(a):
            buf = self._bufs.get(name)
            if buf is None or buf.shape != a.shape:
                buf = self._bufs[name] = aligned_empty(a.shape)
            buf[...] = a
            a = buf
        return self._ffi.from_dlpack(a)

    def _label_weights(self, y, n: int, classes: int) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim == 1:
            if y.shape[0] != n or y.dtype.kind not in "iu":
                raise ValueError(f"labels: expected {n} integers in [0, {classes}), got {y.shape} {y.dtype}")
            if n and (y.min() < 0 or y.max() >= classes):
                raise ValueError(f"labels must lie in [0, {classes}) (indices into the task's classes)")
            out = np.zeros((n, classes), np.float32)
            out[np.arange(n), y] = 1.0
            return out
        if y.shape != (n, classes):
            raise ValueError(f"one-hot labels: expected shape {(n, classes)}, got {y.shape}")
        return y.astype(np.float32, copy=False)

    def __call__(self, x: np.ndarray, y, params: Mapping, head, return_logits: bool = False):
        x = np.asarray(x, self._dtype)
        n = len(x)
        hw, hb = (np.asarray(h, np.float32) for h in head)
        classes = hw.shape[0]
        if classes > self.head_rows:
            raise ValueError(f"the head has {classes} classes; the train step was built for at most "
                             f"{self.head_rows}: compile again")
        if n == 0:
            raise ValueError("an empty batch has no loss")
        yw = self._label_weights(y, n, classes) / np.float32(n)
        # the padded head: zero weights, PAD_LOGIT bias (exp() of it is exactly 0)
        if self._hw is None:
            self._hw = aligned_empty((self.head_rows, hw.shape[1]))
            self._hb = aligned_empty((self.head_rows,))
        self._hw[:classes], self._hw[classes:] = hw, 0.0
        self._hb[:classes], self._hb[classes:] = hb, np.float32(self.entry["pad_logit"])
        shapes = self.bundle.graph.params  # a scalar stored as [1] is a 0-d input
        weights = [self._tensor(name, np.reshape(_param(params, name), shapes[name].shape))
                   for name in self.names[:-2]]
        weights += [self._ffi.from_dlpack(self._hw), self._ffi.from_dlpack(self._hb)]
        loss, grads, logits = 0.0, None, []
        for i in range(0, n, self.batch):
            m = min(self.batch, n - i)
            self._x[:m], self._y[:m, :classes] = x[i:i + m], yw[i:i + m]
            self._x[m:], self._y[m:], self._y[:m, classes:] = 0.0, 0.0, 0.0
            (lo, lg), gs = self._fn(self._ffi.from_dlpack(self._x), self._ffi.from_dlpack(self._y), *weights)
            loss += float(np.from_dlpack(lo))
            # the arrays keep the VM's output tensors alive, so no copy: the pooled
            # allocator reuses their memory only once they are dropped
            gs = [np.from_dlpack(g) for g in gs]
            if grads is None:
                grads = gs
            else:
                grads = [a + g for a, g in zip(grads, gs, strict=True)]
            if return_logits:
                logits.append(np.from_dlpack(lg)[:m, :classes].copy())
        out = dict(zip(self.gradients, grads, strict=True))
        out["head.weight"] = out["head.weight"][:classes]
        out["head.bias"] = out["head.bias"][:classes]
        if return_logits:
            return loss, out, np.concatenate(logits)
        return loss, out


def load_train_step(bundle: str | Path | Bundle, target: str | None = None) -> TrainStep:
    """The bundle's compiled training step for ``target`` (None: the one for this machine)."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    return TrainStep(bundle, target)


def _weight(grads: Mapping, name: str) -> str:
    """A weight's graph name; a format-1 layer name (``fc1``) means ``fc1.weight``."""
    return name if name in grads else f"{name}.weight"


def packnet_update(grads: Mapping[str, np.ndarray], free: Mapping[str, np.ndarray]) -> dict:
    """PackNet: only the free weights move (``free[weight name]`` boolean, the weight's shape)."""
    out = dict(grads)
    for name, f in free.items():
        key = _weight(grads, name)
        out[key] = np.where(f, grads[key], np.float32(0))
    return out


def score_grad(grads: Mapping[str, np.ndarray], backbone: Mapping[str, np.ndarray],
               weight: str) -> np.ndarray:
    """SupSup / Piggyback, straight-through: dL/dscores = dL/dW_eff ⊙ W (the unmasked weight)."""
    key = _weight(grads, weight)
    return grads[key] * np.asarray(backbone[key], np.float32)
