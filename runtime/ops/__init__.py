"""The op registry: every op a model graph may use, defined once.

    from edgecl.runtime.ops import OPS, get_op
    op = get_op("Conv")            # shape inference, numpy forward/backward, torch,
                                   # ONNX and TVM emission, what a mask on it means

An op outside the registry is an error at import (naming the node), never silently
passed through. See ``docs/graph.md`` for the graph that holds them.
"""

from __future__ import annotations

from .base import MaskRule, Op, OpError, Shape
from .elementwise import (
    Add,
    Clip,
    Div,
    Gelu,
    HardSigmoid,
    HardSwish,
    Mul,
    Relu,
    Sigmoid,
    Softmax,
    Sub,
    Tanh,
)
from .nn import Conv, Gather, Linear, MatMul
from .norm import BatchNormalization, LayerNormalization
from .pool import AveragePool, GlobalAveragePool, MaxPool, ReduceMean
from .shape import Concat, Flatten, Reshape, Transpose
from .topk import KeepTopK

OPS: dict[str, Op] = {cls.name: cls() for cls in (
    Conv, Linear, MatMul, Gather,
    Add, Sub, Mul, Div, Relu, Clip, HardSigmoid, HardSwish, Sigmoid, Tanh, Gelu, Softmax,
    MaxPool, AveragePool, GlobalAveragePool, ReduceMean,
    Flatten, Reshape, Transpose, Concat,
    BatchNormalization, LayerNormalization,
    KeepTopK,
)}


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise OpError(f"unsupported op {name!r}; edgecl supports {', '.join(sorted(OPS))}") from None


__all__ = ["OPS", "MaskRule", "Op", "OpError", "Shape", "get_op"]
