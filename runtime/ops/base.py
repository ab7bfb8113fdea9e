"""What an op is: one definition holding everything every consumer needs of it.

An op (``Op`` subclass, registered by name in :data:`edgecl.runtime.ops.OPS`) knows

* its attributes (name -> type and default; unknown or ill-typed ones are errors),
* which of its inputs may be parameters and their role (``weight``, ``bias``, ...),
* what a mask on its parameters means (:class:`MaskRule`),
* shape inference, a numpy forward and, on a trainable path, a numpy backward,
* its PyTorch forward (host only: torch is imported by the caller, never here),
* its ONNX emission, and where a builtin exists, its TVM (Relax) emission.

Shapes include the batch axis first. Values are float32 unless an op says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

Shape = tuple[int, ...]


class OpError(ValueError):
    """A node whose op, attributes or input shapes are not valid."""


@dataclass(frozen=True)
class MaskRule:
    """What a mask on this op's parameters means.

    A weight-level mask (one bit per element) selects entries of input ``weight``; a
    unit gate selects output units: slices ``unit_axis`` of the weight (and of the bias
    input ``bias``, if present), which are the output's axis ``out_axis``.
    """

    weight: int = 1
    bias: int | None = 2
    unit_axis: int = 0
    out_axis: int = 1


# Attribute types a graph may hold (JSON-representable).
INT, FLOAT, INTS, FLOATS, STR = "int", "float", "ints", "floats", "str"


def _check_attr(kind: str, value: Any) -> Any:
    if kind == INT and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == FLOAT and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == INTS and isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    if kind == FLOATS and isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    if kind == STR and isinstance(value, str):
        return value
    raise TypeError(f"expected {kind}, got {value!r}")


class Op:
    name: ClassVar[str]
    # attribute -> (type, default); a default of None means required
    attrs: ClassVar[dict[str, tuple[str, Any]]] = {}
    # input index -> role, for inputs that may (or must) be parameters
    param_roles: ClassVar[dict[int, str]] = {}
    n_inputs: ClassVar[tuple[int, int]] = (1, 1)  # min, max
    mask: ClassVar[MaskRule | None] = None
    # whether ``backward`` is implemented (the on-device learner can run through it)
    differentiable: ClassVar[bool] = True
    # In place (see ``Graph.inplace``): ``inplace`` ops may write their output over input 0
    # (``forward_inplace``), and their backward gives the same gradients whether ``xs[0]``
    # is the input or the output; ``fresh_output`` ops return a new array (never a view of
    # an input or a parameter) and their backward never reads it, so an in-place successor
    # may overwrite it.
    inplace: ClassVar[bool] = False
    fresh_output: ClassVar[bool] = False

    # -- validation ---------------------------------------------------------------
    def check_attrs(self, attrs: dict) -> dict:
        """Attributes with defaults filled in; raises OpError naming a bad one."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpError(f"{self.name}: unknown attribute(s) {sorted(unknown)}; "
                          f"it takes {sorted(self.attrs) or 'none'}")
        out = {}
        for key, (kind, default) in self.attrs.items():
            if key in attrs:
                try:
                    out[key] = _check_attr(kind, attrs[key])
                except TypeError as e:
                    raise OpError(f"{self.name}: attribute {key!r}: {e}") from None
            elif default is None:
                raise OpError(f"{self.name}: attribute {key!r} is required")
            else:
                out[key] = default
        return out

    # -- what every op provides ---------------------------------------------------
    def infer(self, shapes: Sequence[Shape], attrs: dict) -> list[Shape]:
        raise NotImplementedError

    def forward(self, xs: Sequence[np.ndarray], attrs: dict) -> list[np.ndarray]:
        raise NotImplementedError

    def forward_inplace(self, xs: Sequence[np.ndarray], attrs: dict) -> list[np.ndarray]:
        """``forward``, its output written over ``xs[0]`` (only for ``inplace`` ops; the
        executor calls it when it owns ``xs[0]`` and nothing reads it afterwards)."""
        raise NotImplementedError(f"{self.name}: no in-place forward")

    def backward(self, xs: Sequence[np.ndarray], ys: Sequence[np.ndarray],
                 gys: Sequence[np.ndarray], attrs: dict, need: Sequence[bool]) -> list[np.ndarray | None]:
        """Gradients of the loss w.r.t. each input (None where ``need`` is False)."""
        raise OpError(f"{self.name}: no backward pass; it cannot be on a trainable path")

    def torch(self, xs: Sequence[Any], attrs: dict) -> list[Any]:
        raise NotImplementedError

    def onnx(self, b: Any, inputs: list[str], outputs: list[str], attrs: dict) -> None:
        raise NotImplementedError

    def tvm(self, bb: Any, xs: Sequence[Any], attrs: dict, shapes: Sequence[Shape]) -> list[Any]:
        raise NotImplementedError(f"{self.name}: no TVM emission")

    def tflite(self, b: Any, inputs: list[str], outputs: list[str], attrs: dict,
               shapes: Sequence[Shape]) -> None:
        """Emit TFLite builtins into ``b`` (``compiler/tflite_export.TfliteBuilder``);
        ``shapes`` are the inputs' graph (NCHW) shapes at batch 1."""
        raise NotImplementedError(f"{self.name}: no TFLite emission")


def unbroadcast(g: np.ndarray, shape: Shape) -> np.ndarray:
    """Sum ``g`` down to ``shape`` (the inverse of numpy broadcasting)."""
    if g.shape == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def broadcast_shapes(a: Shape, b: Shape) -> Shape:
    try:
        return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        raise OpError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast") from None


def norm_axis(axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise OpError(f"axis {axis} is out of range for rank {rank}")
    return a


def prod(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)
