"""Import a user's model into an edgecl graph: a PyTorch module (through
``torch.export``), a saved ``ExportedProgram`` (``.pt2``), or an ONNX file.

    graph, weights = import_torch(module, example)              # or import_onnx("m.onnx")
    graph, weights = import_model("pkg.mod:factory", features="encoder")

Each front end maps its ops onto the registry's (``edgecl.runtime.ops``) and then the
same passes run on the graph: nodes whose inputs are all constants are evaluated at
import (position embeddings, shape arithmetic), a zero Pad feeding a Conv becomes the
Conv's pads, and a BatchNormalization is folded into the Conv/Linear before it when
that layer feeds nothing else. An op outside the registry fails here, naming the node.

The features (where task heads attach) default to the input of the last Linear; name
another value (or a module path: its last output) with ``features``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.runtime.errors import EdgeclError
from edgecl.runtime.graph import Graph, GraphError, Node, Param, Value
from edgecl.runtime.ops import OPS, get_op


class ImportError_(EdgeclError):
    """A model that cannot be imported; the message names the node and op."""


@dataclass
class _Builder:
    """Nodes and constants being collected by a front end."""

    input: Value
    nodes: list[Node] = field(default_factory=list)
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # every param's value
    alias: dict[str, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)  # value -> module path it came from
    _n: int = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}" if base not in self.consts and not any(n.name == base for n in self.nodes) \
            and base != self.input.name else f"{base}_{self._n}"

    def const(self, value: Any, base: str = "const") -> str:
        name = self.name(base)
        self.consts[name] = np.asarray(value, dtype=np.float32) if not isinstance(value, np.ndarray) \
            else value
        return name

    def get(self, value: str) -> str:
        while value in self.alias:
            value = self.alias[value]
        return value

    def add(self, op: str, inputs: Sequence[str], out: str, module: str = "", **attrs: Any) -> str:
        self.nodes.append(Node(out, op, tuple(inputs), (out,), attrs))
        if module:
            self.modules[out] = module
        return out


# -- passes on the collected nodes ---------------------------------------------------
def _fold_constants(b: _Builder) -> None:
    """Evaluate nodes whose inputs are all constants (not reading the model input)."""
    kept = []
    for n in b.nodes:
        if all(i in b.consts for i in n.inputs):
            op = get_op(n.op)
            attrs = op.check_attrs(n.attrs)
            y = op.forward([b.consts[i] for i in n.inputs], attrs)[0]
            b.consts[n.outputs[0]] = np.asarray(y)
        else:
            kept.append(n)
    b.nodes = kept


def _uses(nodes: Sequence[Node]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            out[i] = out.get(i, 0) + 1
    return out


def _fold_batchnorm(b: _Builder, keep: set[str]) -> None:
    """BN(Conv(x)) -> Conv'(x) when the conv's output feeds only the BN."""
    producer = {n.outputs[0]: n for n in b.nodes}
    uses = _uses(b.nodes)
    drop: set[str] = set()
    replace: dict[str, Node] = {}
    for n in b.nodes:
        if n.op != "BatchNormalization":
            continue
        src = producer.get(n.inputs[0])
        if src is None or src.op not in ("Conv", "Linear") or uses.get(src.outputs[0]) != 1 \
                or src.outputs[0] in keep or src.inputs[1] not in b.consts:
            continue
        if src.op == "Linear" and len(b.consts[src.inputs[1]].shape) != 2:
            continue
        scale, bias, mean, var = (b.consts[i].astype(np.float64) for i in n.inputs[1:])
        eps = float(n.attrs.get("epsilon", 1e-5))
        k = scale / np.sqrt(var + eps)
        w = b.consts[src.inputs[1]].astype(np.float64)
        old_b = b.consts[src.inputs[2]].astype(np.float64) if len(src.inputs) > 2 else 0.0
        wname = src.inputs[1]
        bname = src.inputs[2] if len(src.inputs) > 2 else wname.rsplit(".", 1)[0] + ".bias"
        if bname in b.consts and uses.get(bname, 0) > 1 or uses.get(wname, 0) > 1:
            continue  # shared parameters: leave the BN alone
        if bname not in b.consts and bname in {x.outputs[0] for x in b.nodes}:
            bname = b.name(bname)
        b.consts[wname] = (w * k.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        b.consts[bname] = ((old_b - mean) * k + bias).astype(np.float32)
        replace[src.outputs[0]] = Node(src.name, src.op, (src.inputs[0], wname, bname), (n.outputs[0],),
                                       src.attrs)
        drop.add(n.outputs[0])
    if not replace:
        return
    nodes = []
    for n in b.nodes:
        if n.outputs[0] in drop:
            continue
        nodes.append(replace.get(n.outputs[0], n))
    b.nodes = nodes


def _fold_pads(b: _Builder) -> None:
    """A zero "Pad" pseudo-node (spatial only) feeding only Convs becomes their pads."""
    pads = {n.outputs[0]: n for n in b.nodes if n.op == "_Pad"}
    if not pads:
        return
    nodes = []
    for n in b.nodes:
        if n.op == "_Pad":
            continue
        if n.op in ("Conv", "MaxPool", "AveragePool") and n.inputs[0] in pads:
            p = pads[n.inputs[0]]
            top, left, bottom, right = p.attrs["pads"]
            old = n.attrs.get("pads", [0, 0, 0, 0])
            attrs = dict(n.attrs, pads=[old[0] + top, old[1] + left, old[2] + bottom, old[3] + right])
            if n.op == "AveragePool":
                attrs["count_include_pad"] = 1
            n = Node(n.name, n.op, (p.inputs[0], *n.inputs[1:]), n.outputs, attrs)
        elif any(i in pads for i in n.inputs):
            p = pads[next(i for i in n.inputs if i in pads)]
            raise ImportError_(f"node {p.name!r} (pad): a zero pad is supported only before a Conv or a "
                               f"pooling; here it feeds {n.name!r} ({n.op})")
        nodes.append(n)
    b.nodes = nodes


def _features_value(b: _Builder, features: str | None, out: str) -> str:
    names = {o for n in b.nodes for o in n.outputs}
    if features is None:
        linears = [n for n in b.nodes if n.op == "Linear"]
        if not linears:
            return out
        return linears[-1].inputs[0]
    if features == "output":
        return out
    if features in names:
        return features
    inside = [v for v, m in b.modules.items() if m == features or m.startswith(features + ".")]
    if inside:
        return [o for n in b.nodes for o in n.outputs if o in set(inside)][-1]
    hint = ", ".join(sorted({m.split(".")[0] for m in b.modules.values() if m})[:20])
    raise ImportError_(f"--features {features!r} is neither a value of the graph nor a module; "
                       f"top-level modules: {hint}")


def finish(b: _Builder, out: str, features: str | None, name: str) -> tuple[Graph, dict[str, np.ndarray]]:
    """Run the passes and return the validated graph and its weights."""
    b.nodes = [Node(n.name, n.op, tuple(b.get(i) for i in n.inputs), n.outputs, n.attrs) for n in b.nodes]
    out = b.get(out)
    _fold_constants(b)
    _fold_pads(b)
    feat = _features_value(b, features, out)
    _fold_batchnorm(b, {feat})
    for n in b.nodes:
        if n.op not in OPS:
            raise ImportError_(f"node {n.name!r}: op {n.op!r} is not supported")
    # Parameters: the constants the remaining nodes read, with their role.
    roles: dict[str, str] = {}
    for n in b.nodes:
        op = get_op(n.op)
        for i, v in enumerate(n.inputs):
            if v in b.consts:
                role = op.param_roles.get(i)
                if role is None:
                    raise ImportError_(f"node {n.name!r} ({n.op}): input {i} is a constant, which this op "
                                       "takes only as a computed value")
                roles.setdefault(v, role)
    params = [Param(k, tuple(int(s) for s in b.consts[k].shape), roles[k]) for k in b.consts if k in roles]
    if feat in b.consts:
        raise ImportError_(f"features {feat!r} is a constant")
    try:
        g = Graph([b.input], params, b.nodes, feat, name=name)
        # Drop what the features do not need (the imported classifier, decoders).
        need = {p for n in g.backbone_nodes for p in n.inputs if p in g.params}
        g = Graph([b.input], [p for p in params if p.name in need], g.backbone_nodes, feat, name=name)
    except GraphError as e:
        raise ImportError_(str(e)) from None
    weights = {p.name: np.asarray(b.consts[p.name], dtype=np.float32, order="C") for p in g.params.values()}
    return g, weights


# -- PyTorch (torch.export) ------------------------------------------------------------
def _ints(v: Any, n: int) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * n


def _torch_handlers() -> dict[str, Callable]:
    """aten op -> translator(builder, fx node, args as value names / python values, out)."""

    def conv(b, n, a, out, mod):
        x, w = a[0], a[1]
        bias = a[2] if len(a) > 2 and a[2] is not None else None
        stride = _ints(a[3] if len(a) > 3 else 1, 2)
        pad = a[4] if len(a) > 4 else 0
        dil = _ints(a[5] if len(a) > 5 else 1, 2)
        groups = int(a[6]) if len(a) > 6 else 1
        if isinstance(pad, str):
            raise ImportError_(f"node {n.name!r} (conv2d): padding={pad!r}; use integer padding")
        ph, pw = _ints(pad, 2)
        ins = [x, w] + ([bias] if bias else [])
        return b.add("Conv", ins, out, mod, strides=stride, pads=[ph, pw, ph, pw], dilations=dil,
                     group=groups)

    def linear(b, n, a, out, mod):
        ins = [a[0], a[1]] + ([a[2]] if len(a) > 2 and a[2] is not None else [])
        return b.add("Linear", ins, out, mod)

    def batch_norm(b, n, a, out, mod):
        x, w, bias, mean, var = a[:5]
        eps = float(a[7]) if len(a) > 7 else 1e-5
        if len(a) > 5 and a[5]:
            raise ImportError_(f"node {n.name!r} (batch_norm): in training mode; export the model in eval()")
        c = _shape(n.args[0])[1]
        if w is None:
            w = b.const(np.ones(c, np.float32), f"{out}.scale")
        if bias is None:
            bias = b.const(np.zeros(c, np.float32), f"{out}.shift")
        return b.add("BatchNormalization", [x, w, bias, mean, var], out, mod, epsilon=eps)

    def layer_norm(b, n, a, out, mod):
        x, shape = a[0], a[1]
        w = a[2] if len(a) > 2 and a[2] is not None else b.const(np.ones(shape, np.float32), f"{out}.scale")
        ins = [x, w] + ([a[3]] if len(a) > 3 and a[3] is not None else [])
        eps = float(a[4]) if len(a) > 4 else 1e-5
        return b.add("LayerNormalization", ins, out, mod, axis=-len(shape), epsilon=eps)

    def unary(op, **kw):
        return lambda b, n, a, out, mod: b.add(op, [a[0]], out, mod, **kw)

    def binary(op):
        def f(b, n, a, out, mod):
            x, y = a[0], a[1]
            if len(a) > 2 and a[2] not in (1, 1.0):  # add(x, y, alpha)
                y = b.add("Mul", [y, b.const(a[2])], b.name(out + "_alpha"), mod)
            xs = [v if isinstance(v, str) else b.const(v) for v in (x, y)]
            if xs[0] in b.consts and xs[1] not in b.consts and op in ("Add", "Mul"):
                xs = xs[::-1]  # the constant goes second (the op's const slot)
            elif xs[0] in b.consts and xs[1] not in b.consts:  # c - x, c / x
                neg = {"Sub": ("Mul", -1.0, "Add"), "Div": None}[op]
                if neg is None:
                    raise ImportError_(f"node {n.name!r}: constant / tensor is not supported")
                t = b.add("Mul", [xs[1], b.const(-1.0)], b.name(out + "_neg"), mod)
                return b.add("Add", [t, xs[0]], out, mod)
            return b.add(op, xs, out, mod)
        return f

    def hardtanh(b, n, a, out, mod):
        return b.add("Clip", [a[0]], out, mod, min=float(a[1] if len(a) > 1 else -1.0),
                     max=float(a[2] if len(a) > 2 else 1.0))

    def clamp(b, n, a, out, mod):
        lo = a[1] if len(a) > 1 and a[1] is not None else float("-inf")
        hi = a[2] if len(a) > 2 and a[2] is not None else float("inf")
        return b.add("Clip", [a[0]], out, mod, min=float(lo), max=float(hi))

    def gelu(b, n, a, out, mod):
        approx = n.kwargs.get("approximate", a[1] if len(a) > 1 else "none")
        return b.add("Gelu", [a[0]], out, mod, approximate=str(approx))

    def softmax(b, n, a, out, mod):
        return b.add("Softmax", [a[0]], out, mod, axis=int(a[1]))

    def pool(op):
        def f(b, n, a, out, mod):
            k = _ints(a[1], 2)
            s = _ints(a[2], 2) if len(a) > 2 and a[2] else k
            p = _ints(a[3], 2) if len(a) > 3 else [0, 0]
            if op == "MaxPool" and len(a) > 4 and _ints(a[4], 2) != [1, 1]:
                raise ImportError_(f"node {n.name!r} (max_pool2d): dilation is not supported")
            ceil = int(bool(a[5] if op == "MaxPool" and len(a) > 5 else a[4] if op == "AveragePool"
                            and len(a) > 4 else False))
            attrs = {"kernel_shape": k, "strides": s, "pads": [p[0], p[1], p[0], p[1]], "ceil_mode": ceil}
            if op == "AveragePool":
                attrs["count_include_pad"] = int(bool(a[5])) if len(a) > 5 else 1
                if len(a) > 6 and a[6] is not None:
                    raise ImportError_(f"node {n.name!r} (avg_pool2d): divisor_override is not supported")
            return b.add(op, [a[0]], out, mod, **attrs)
        return f

    def adaptive_avg(b, n, a, out, mod):
        if _ints(a[1], 2) != [1, 1]:
            shape = _shape(n.args[0])
            oh, ow = _ints(a[1], 2)
            if shape[2] % oh or shape[3] % ow:
                raise ImportError_(f"node {n.name!r}: adaptive_avg_pool2d to {a[1]} from {shape[2:]}")
            k = [shape[2] // oh, shape[3] // ow]
            return b.add("AveragePool", [a[0]], out, mod, kernel_shape=k, strides=k)
        return b.add("GlobalAveragePool", [a[0]], out, mod)

    def mean(b, n, a, out, mod):
        dims = a[1] if len(a) > 1 and a[1] is not None else list(range(len(_shape(n.args[0]))))
        keep = bool(a[2]) if len(a) > 2 else bool(n.kwargs.get("keepdim", False))
        return b.add("ReduceMean", [a[0]], out, mod, axes=_ints(dims, 1), keepdims=int(keep))

    def flatten(b, n, a, out, mod):
        start = int(a[1]) if len(a) > 1 else 0
        end = int(a[2]) if len(a) > 2 else -1
        rank = len(_shape(n.args[0]))
        if start == 1 and end in (-1, rank - 1):
            return b.add("Flatten", [a[0]], out, mod, axis=1)
        return reshape_to(b, n, a, out, mod)

    def reshape_to(b, n, a, out, mod):
        target = list(_shape(n))
        return b.add("Reshape", [a[0]], out, mod, shape=[0] + [int(s) for s in target[1:]])

    def transpose(b, n, a, out, mod):
        rank = len(_shape(n.args[0]))
        d0, d1 = int(a[1]) % rank, int(a[2]) % rank
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return b.add("Transpose", [a[0]], out, mod, perm=perm)

    def permute(b, n, a, out, mod):
        rank = len(_shape(n.args[0]))
        return b.add("Transpose", [a[0]], out, mod, perm=[int(d) % rank for d in a[1]])

    def cat(b, n, a, out, mod):
        return b.add("Concat", list(a[0]), out, mod, axis=int(a[1]) if len(a) > 1 else 0)

    def matmul(b, n, a, out, mod):
        return b.add("MatMul", [a[0], a[1]], out, mod)

    def embedding(b, n, a, out, mod):
        return b.add("Gather", [a[0], a[1]], out, mod)

    def pad(b, n, a, out, mod):
        p = _ints(a[1], 1)
        mode = a[2] if len(a) > 2 else "constant"
        value = a[3] if len(a) > 3 and a[3] is not None else 0.0
        if mode != "constant" or float(value) != 0.0 or len(p) != 4:
            raise ImportError_(f"node {n.name!r} (pad): only a zero pad of the last two axes is supported")
        left, right, top, bottom = p
        return b.add("_Pad", [a[0]], out, mod, pads=[top, left, bottom, right])

    def identity(b, n, a, out, mod):
        b.alias[out] = a[0]
        return out

    def dropout(b, n, a, out, mod):
        if len(a) > 2 and a[2]:
            raise ImportError_(f"node {n.name!r} (dropout): in training mode; export the model in eval()")
        return identity(b, n, a, out, mod)

    return {
        "aten.conv2d.default": conv, "aten.linear.default": linear,
        "aten.batch_norm.default": batch_norm,
        "aten._native_batch_norm_legit_no_training.default": lambda b, n, a, out, mod: batch_norm(
            b, n, [*a[:5], False, 0.0, a[6] if len(a) > 6 else 1e-5], out, mod),
        "aten.layer_norm.default": layer_norm,
        "aten.relu.default": unary("Relu"), "aten.sigmoid.default": unary("Sigmoid"),
        "aten.tanh.default": unary("Tanh"), "aten.hardswish.default": unary("HardSwish"),
        "aten.hardsigmoid.default": unary("HardSigmoid", alpha=1 / 6, beta=0.5),
        "aten.hardtanh.default": hardtanh, "aten.relu6.default": unary("Clip", min=0.0, max=6.0),
        "aten.clamp.default": clamp, "aten.gelu.default": gelu,
        "aten.softmax.int": softmax, "aten._softmax.default": softmax,
        "aten.add.Tensor": binary("Add"), "aten.sub.Tensor": binary("Sub"),
        "aten.mul.Tensor": binary("Mul"), "aten.div.Tensor": binary("Div"),
        "aten.max_pool2d.default": pool("MaxPool"), "aten.avg_pool2d.default": pool("AveragePool"),
        "aten.adaptive_avg_pool2d.default": adaptive_avg, "aten.mean.dim": mean,
        "aten.flatten.using_ints": flatten, "aten.view.default": reshape_to,
        "aten.reshape.default": reshape_to, "aten.unsqueeze.default": reshape_to,
        "aten.squeeze.dim": reshape_to, "aten.squeeze.default": reshape_to,
        "aten.transpose.int": transpose, "aten.permute.default": permute, "aten.t.default": transpose,
        "aten.cat.default": cat, "aten.concat.default": cat,
        "aten.matmul.default": matmul, "aten.bmm.default": matmul,
        "aten.embedding.default": embedding, "aten.pad.default": pad,
        "aten.constant_pad_nd.default": lambda b, n, a, out, mod: pad(b, n, [a[0], a[1], "constant",
                                                                          a[2] if len(a) > 2 else 0.0],
                                                                      out, mod),
        "aten.dropout.default": dropout, "aten.contiguous.default": identity, "aten.clone.default": identity,
        "aten.alias.default": identity, "aten.detach.default": identity,
        "aten.lift_fresh_copy.default": identity,
    }


def _shape(fx_node: Any) -> tuple[int, ...]:
    val = fx_node.meta.get("val") if hasattr(fx_node, "meta") else None
    if val is None or not hasattr(val, "shape"):
        raise ImportError_(f"node {getattr(fx_node, 'name', fx_node)!r}: no shape information")
    return tuple(int(s) for s in val.shape)


def _module_path(fx_node: Any) -> str:
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).removeprefix("L['self'].").removeprefix("L__self__.").replace("L__self__", "")


def import_exported(ep: Any, *, features: str | None = None, name: str = "model") -> tuple[Graph, dict]:
    """An ``ExportedProgram`` as a graph and its weights."""
    import torch

    sig = ep.graph_signature
    state = {**ep.state_dict, **getattr(ep, "constants", {})}
    placeholder_target = {}
    user_inputs = []
    for spec in sig.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            placeholder_target[spec.arg.name] = spec.target
        elif spec.kind.name == "USER_INPUT":
            user_inputs.append(spec.arg.name)
    if len(user_inputs) != 1:
        raise ImportError_(f"the model takes {len(user_inputs)} tensor inputs; edgecl imports models of one")
    handlers = _torch_handlers()
    consts: dict[str, np.ndarray] = {}
    b: _Builder | None = None
    values: dict[str, Any] = {}
    out_name = ""
    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if n.name in placeholder_target:
                key = placeholder_target[n.name]
                t = state[key].detach().cpu()
                consts[key] = t.numpy().astype(np.float32) if t.dtype.is_floating_point else t.numpy()
                values[n.name] = key
            else:
                val = n.meta["val"]
                dtype = "float32" if val.dtype.is_floating_point else "int64"
                b = _Builder(Value("x", tuple(int(s) for s in val.shape[1:]), dtype))
                values[n.name] = "x"
            continue
        if b is None:
            raise ImportError_("the exported program has no user input before its first op")
        b.consts.update(consts)
        consts.clear()
        if n.op == "output":
            res = n.args[0]
            res = res[0] if isinstance(res, (list, tuple)) else res
            out_name = values[res.name]
            break
        if n.op != "call_function":
            raise ImportError_(f"node {n.name!r}: {n.op} nodes are not supported")
        target = str(n.target)
        if target == "<built-in function getitem>":
            src, idx = n.args
            if idx != 0:
                raise ImportError_(f"node {n.name!r}: only the first output of {src.name!r} is supported")
            b.alias[n.name] = values[src.name]
            values[n.name] = n.name
            continue
        h = handlers.get(target)
        if h is None:
            raise ImportError_(f"node {n.name!r}: op {target} (module {_module_path(n) or 'top'}) is not "
                               f"supported; edgecl's ops: {', '.join(sorted(OPS))}")

        def conv_arg(v: Any) -> Any:
            if isinstance(v, torch.fx.Node):
                return values[v.name]
            if isinstance(v, (list, tuple)):
                return [conv_arg(x) for x in v]
            return v
        args = [conv_arg(v) for v in n.args]
        values[n.name] = h(b, n, args, n.name, _module_path(n))
    if b is None:
        raise ImportError_("the exported program has no input")
    return finish(b, out_name, features, name)


def import_torch(module: Any, example: Any, *, features: str | None = None,
                 name: str = "model") -> tuple[Graph, dict]:
    """A PyTorch module (in eval mode) traced by ``torch.export`` on ``example``."""
    import torch

    module = module.eval()
    with torch.no_grad():
        ep = torch.export.export(module, (example,))
    return import_exported(ep, features=features, name=name)


# -- ONNX ---------------------------------------------------------------------------
_ONNX_SAME = {"Relu", "Sigmoid", "Tanh", "HardSwish", "Softmax", "MatMul", "Add", "Sub", "Mul", "Div",
              "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Transpose", "Concat",
              "BatchNormalization", "LayerNormalization", "HardSigmoid", "Gelu"}


_BATCH_SENTINEL = 7919  # a prime no real axis size is a multiple of, in practice


def _onnx_shape(b: _Builder, value: str, batch: int) -> tuple[int, ...]:
    """The static shape of a value built so far (batch axis = ``batch``)."""
    if value in b.consts:
        return tuple(b.consts[value].shape)
    shapes: dict[str, tuple[int, ...]] = {"x": (batch, *b.input.shape)}
    for n in b.nodes:
        xs = [shapes[i] if i in shapes else tuple(b.consts[i].shape) for i in n.inputs]
        if n.op == "_Pad":
            t, l_, bo, r = n.attrs["pads"]
            x = xs[0]
            shapes[n.outputs[0]] = (*x[:-2], x[-2] + t + bo, x[-1] + l_ + r)
        elif n.op == "_Erf":
            shapes[n.outputs[0]] = xs[0]
        else:
            op = get_op(n.op)
            shapes[n.outputs[0]] = tuple(op.infer(xs, op.check_attrs(n.attrs))[0])
        if n.outputs[0] == value:
            break
    return shapes[value]


def _onnx_slice(node, xs, attr):
    data, starts, ends = xs[:3]
    axes = xs[3] if len(xs) > 3 else range(len(starts))
    steps = xs[4] if len(xs) > 4 else [1] * len(starts)
    idx = [slice(None)] * data.ndim
    for a, s0, e0, st in zip(axes, starts, ends, steps, strict=True):
        idx[int(a)] = slice(int(s0), int(max(min(e0, 2**62), -(2**62))), int(st))
    return data[tuple(idx)]


def _onnx_cast(node, xs, attr):
    from onnx import helper

    return xs[0].astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))


# ONNX ops evaluated at import when every input is a constant.
_ONNX_CONST_EVAL: dict[str, Callable] = {
    "ConstantOfShape": lambda node, xs, attr: np.full(
        [int(d) for d in xs[0]], *(__import__("onnx").numpy_helper.to_array(attr(node, "value")).reshape(-1)
                                    if attr(node, "value") is not None else [np.float32(0)])),
    "Concat": lambda node, xs, attr: np.concatenate(xs, axis=int(attr(node, "axis", 0))),
    "Reshape": lambda node, xs, attr: xs[0].reshape([int(d) if d != 0 else xs[0].shape[i]
                                                     for i, d in enumerate(xs[1])]),
    "Slice": _onnx_slice,
    "Transpose": lambda node, xs, attr: np.transpose(xs[0], attr(node, "perm")),
    "Cast": _onnx_cast,
    "Unsqueeze": lambda node, xs, attr: np.expand_dims(xs[0], tuple(int(a) for a in (
        xs[1] if len(xs) > 1 else attr(node, "axes")))),
    "Squeeze": lambda node, xs, attr: np.squeeze(xs[0], tuple(int(a) for a in (
        xs[1] if len(xs) > 1 else attr(node, "axes")))),
    "Add": lambda node, xs, attr: xs[0] + xs[1], "Sub": lambda node, xs, attr: xs[0] - xs[1],
    "Mul": lambda node, xs, attr: xs[0] * xs[1], "Div": lambda node, xs, attr: xs[0] / xs[1],
    "Gather": lambda node, xs, attr: np.take(xs[0], xs[1].astype(np.int64), axis=int(attr(node, "axis", 0))),
}


def import_onnx(path: str | Path, *, features: str | None = None,
                name: str | None = None) -> tuple[Graph, dict]:
    """An ONNX model (opset <= 17 semantics; Gelu of opset 20 too) as a graph."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        m = onnx.load(str(path))
    except Exception as e:
        raise ImportError_(f"{path}: not a readable ONNX model ({e})") from e
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    real_inputs = [i for i in g.input if i.name not in inits]
    if len(real_inputs) != 1:
        raise ImportError_(f"{path}: the model takes {len(real_inputs)} inputs; edgecl imports models of one")
    vi = real_inputs[0]
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    if any(d <= 0 for d in dims[1:]):
        raise ImportError_(f"{path}: input {vi.name!r} needs static sizes after the batch axis, has {dims}")
    dtype = "int64" if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64 else "float32"
    b = _Builder(Value("x", tuple(dims[1:]), dtype))
    b.alias[vi.name] = "x"
    # The batch size as exported (or a sentinel for a dynamic one): Shape(x) folds to a
    # constant with it, and a Reshape whose target starts with it keeps the batch axis.
    batch = dims[0] if dims[0] > 0 else _BATCH_SENTINEL
    for k, v in inits.items():
        b.consts[k] = v.astype(np.float32) if v.dtype.kind == "f" else v

    def attr(node, key, default=None):
        for a in node.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default

    for i, node in enumerate(g.node):
        nm = node.name or f"{node.op_type}_{i}"
        out = node.output[0]
        ins = [b.get(x) for x in node.input if x]
        op = node.op_type
        where = f"node {nm!r} ({op})"
        if op == "Constant":
            b.consts[out] = numpy_helper.to_array(attr(node, "value"))
            continue
        if op in ("Identity", "Dropout"):
            b.alias[out] = ins[0]
            continue
        if op == "Shape":
            b.consts[out] = np.array(_onnx_shape(b, ins[0], batch), np.int64)
            continue
        if op in _ONNX_CONST_EVAL and all(x in b.consts for x in ins):
            # shape arithmetic on constants (exporters write pads this way): evaluate it now
            b.consts[out] = _ONNX_CONST_EVAL[op](node, [b.consts[x] for x in ins], attr)
            continue
        if op == "Conv":
            k = list(b.consts[ins[1]].shape[2:]) if ins[1] in b.consts else attr(node, "kernel_shape")
            if len(k) != 2:
                raise ImportError_(f"{where}: only 2-D convolutions are supported")
            if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise ImportError_(f"{where}: auto_pad is not supported; export with explicit pads")
            b.add("Conv", ins, out, strides=list(attr(node, "strides", [1, 1])),
                  pads=list(attr(node, "pads", [0, 0, 0, 0])),
                  dilations=list(attr(node, "dilations", [1, 1])),
                  group=int(attr(node, "group", 1)))
        elif op == "Gemm":
            if attr(node, "transA", 0) or float(attr(node, "alpha", 1.0)) != 1 \
                    or float(attr(node, "beta", 1.0)) != 1:
                raise ImportError_(f"{where}: only Gemm(transA=0, alpha=1, beta=1) is supported")
            w = ins[1]
            if not attr(node, "transB", 0):
                if w not in b.consts:
                    raise ImportError_(f"{where}: Gemm with transB=0 needs a constant weight")
                w = b.const(np.ascontiguousarray(b.consts[w].T), f"{w}.T")
            b.add("Linear", [ins[0], w, *ins[2:]], out)
        elif op == "MatMul" and ins[1] in b.consts and b.consts[ins[1]].ndim == 2:
            w = b.const(np.ascontiguousarray(b.consts[ins[1]].T), f"{ins[1]}.T")
            b.add("Linear", [ins[0], w], out)
        elif op == "Clip":
            lo = float(b.consts[ins[1]]) if len(ins) > 1 and ins[1] else float(attr(node, "min", -np.inf))
            hi = float(b.consts[ins[2]]) if len(ins) > 2 and ins[2] else float(attr(node, "max", np.inf))
            b.add("Clip", ins[:1], out, min=lo, max=hi)
        elif op == "Reshape":
            if ins[1] not in b.consts:
                raise ImportError_(f"{where}: the target shape must be a constant")
            target = [int(s) for s in b.consts[ins[1]]]
            if target and target[0] == batch:
                target[0] = 0
            if batch in target or (batch == _BATCH_SENTINEL and any(t % batch == 0 and t > batch
                                                                    for t in target)):
                raise ImportError_(f"{where}: reshapes across the batch axis; axis 0 must stay the batch")
            b.add("Reshape", ins[:1], out, shape=target)
        elif op == "ReduceMean":
            axes = attr(node, "axes") or (list(b.consts[ins[1]]) if len(ins) > 1 else None)
            b.add("ReduceMean", ins[:1], out, axes=[int(a) for a in axes],
                  keepdims=int(attr(node, "keepdims", 1)))
        elif op == "Gather":
            if int(attr(node, "axis", 0)) != 0:
                raise ImportError_(f"{where}: only Gather on axis 0 is supported")
            b.add("Gather", ins, out)
        elif op == "Erf":
            b.add("_Erf", ins, out)
        elif op == "Pad":
            p = b.consts.get(ins[1])
            if p is None or (len(ins) > 2 and ins[2] and float(b.consts[ins[2]]) != 0) \
                    or attr(node, "mode", b"constant") not in (b"constant", "constant") or len(p) != 8 \
                    or any(p[[0, 1, 4, 5]]):
                raise ImportError_(f"{where}: only a constant zero pad of the spatial axes is supported")
            b.add("_Pad", ins[:1], out, pads=[int(p[2]), int(p[3]), int(p[6]), int(p[7])])
        elif op in _ONNX_SAME:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: (v.decode() if isinstance(v, bytes) else list(v) if isinstance(v, (list, tuple))
                         else v) for k, v in attrs.items()}
            attrs.pop("training_mode", None)
            attrs.pop("momentum", None)
            attrs.pop("stash_type", None)
            if op in ("MaxPool", "AveragePool"):
                if attrs.pop("auto_pad", "NOTSET") != "NOTSET" or attrs.pop("dilations", [1, 1]) != [1, 1]:
                    raise ImportError_(f"{where}: auto_pad/dilations are not supported")
                attrs.pop("storage_order", None)
            if len(node.output) > 1 and any(node.output[1:]):
                if op != "LayerNormalization" and op != "Dropout":
                    raise ImportError_(f"{where}: only its first output is supported")
            try:
                attrs = get_op(op).check_attrs(attrs)
            except Exception as e:
                raise ImportError_(f"{where}: {e}") from None
            if op in ("Add", "Mul") and ins[0] in b.consts and ins[1] not in b.consts:
                ins = ins[::-1]  # the constant goes second (the op's const slot)
            elif op == "Sub" and ins[0] in b.consts and ins[1] not in b.consts:  # c - x = -x + c
                neg = b.add("Mul", [ins[1], b.const(-1.0)], b.name(out + "_neg"))
                ins, op = [neg, ins[0]], "Add"
            b.add(op, ins, out, **attrs)
        else:
            raise ImportError_(f"{where}: op {op!r} is not supported; edgecl's ops: {', '.join(sorted(OPS))}")
    _fuse_erf_gelu(b)
    outs = [o.name for o in g.output]
    return finish(b, b.get(outs[0]), features, name or path.stem)


def _fuse_erf_gelu(b: _Builder) -> None:
    """x * 0.5 * (1 + erf(x / sqrt 2)) (how opset < 20 writes GELU, edgecl's export too) -> Gelu."""
    prod = {n.outputs[0]: n for n in b.nodes}

    def scalar(name: str) -> float | None:
        v = b.consts.get(name)
        return float(v) if v is not None and np.asarray(v).size == 1 else None

    fused: dict[str, Node] = {}
    dead: set[str] = set()
    for n in b.nodes:
        if n.op != "_Erf":
            continue
        div = prod.get(n.inputs[0])
        if div is None or div.op not in ("Div", "Mul"):
            raise ImportError_(f"node {n.name!r}: Erf is supported only inside GELU")
        x = div.inputs[0]
        c = scalar(div.inputs[1])
        ok = c is not None and math.isclose(c if div.op == "Div" else 1 / c, math.sqrt(2), rel_tol=1e-4)
        add = next((m for m in b.nodes if n.outputs[0] in m.inputs and m.op == "Add"), None)
        mul1 = add and next((m for m in b.nodes if add.outputs[0] in m.inputs and m.op == "Mul"), None)
        mul2 = mul1 and next((m for m in b.nodes if mul1.outputs[0] in m.inputs and m.op == "Mul"), None)
        if not (ok and add and mul1 and mul2 and x in mul1.inputs and scalar(add.inputs[1]) == 1.0
                and scalar(mul2.inputs[1]) == 0.5):
            raise ImportError_(f"node {n.name!r}: Erf is supported only inside GELU")
        fused[mul2.outputs[0]] = Node(mul2.name, "Gelu", (x,), mul2.outputs, {"approximate": "none"})
        dead |= {div.outputs[0], n.outputs[0], add.outputs[0], mul1.outputs[0]}
    b.nodes = [fused.get(n.outputs[0], n) for n in b.nodes if n.outputs[0] not in dead]


# -- one entry point ---------------------------------------------------------------------
def load_factory(spec: str) -> Any:
    """``package.module:factory`` -> the object the factory returns."""
    import sys

    mod, _, attr = spec.partition(":")
    if not attr:
        raise ImportError_(f"{spec!r}: use package.module:factory")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module next to the user, as uvicorn does
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError_(f"{spec!r}: {e}") from e
    return fn() if callable(fn) else fn


def zoo_module(name: str, **kwargs: Any) -> tuple[Any, Any]:
    """A zoo model as edgecl imports it (with its pixel preprocessing, if any, in front)
    and an example input (batch 2) for its export."""
    import torch

    from .zoo import ZOO, build

    entry = ZOO[name]
    module = build(name, **kwargs)
    pre = (getattr(module, "zoo_meta", {}) or {}).get("preprocessing") or {}
    if "mean" in pre and "std" in pre:
        module = _Pixels(module, pre["mean"], pre["std"], pre.get("pixel_range", (0, 255))[1])
    size = kwargs.get("input_size")
    shape = entry.input_shape if size is None else (entry.input_shape[0], *_ints(size, 2))
    if "seq_len" in kwargs:
        shape = (int(kwargs["seq_len"]),)
    gen = torch.Generator().manual_seed(0)
    example = (torch.randint(1000, 30000, (2, *shape), generator=gen) if entry.input_dtype == "int64"
               else torch.rand((2, *shape), generator=gen))
    return module, example


def _Pixels(module: Any, mean: Sequence[float], std: Sequence[float], top: float) -> Any:
    """``module`` taking images in [0, 1]: its pixel preprocessing becomes part of the graph
    (``(x * top - mean) / std`` per channel), so every backend and the device see the same."""
    import torch

    class Pixels(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / top)
            self.register_buffer("inv_std", top / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean) * self.inv_std)

    out = Pixels()
    out.zoo_meta = getattr(module, "zoo_meta", None)
    return out.eval()


def import_model(source: str, *, features: str | None = None, input_shape: Sequence[int] | None = None,
                 input_dtype: str = "float32", name: str | None = None,
                 zoo_kwargs: dict | None = None) -> tuple[Graph, dict]:
    """``source``: a zoo name (``zoo_kwargs`` go to its factory, e.g. ``input_size``), an
    ``.onnx`` file, a saved ExportedProgram (``.pt2``), or ``package.module:factory``
    returning an ``nn.Module`` (``input_shape`` needed, batch-less). Zoo models with a
    documented pixel preprocessing take images in [0, 1]: it is part of their graph."""
    if source.endswith(".onnx"):
        return import_onnx(source, features=features, name=name)
    import torch

    if source.endswith(".pt2"):
        try:
            ep = torch.export.load(source)
        except Exception as e:
            raise ImportError_(f"{source}: not a readable ExportedProgram ({e})") from e
        return import_exported(ep, features=features, name=name or Path(source).stem)
    from .zoo import ZOO

    if source in ZOO:
        module, example = zoo_module(source, **(zoo_kwargs or {}))
        return import_torch(module, example, features=features or ZOO_FEATURES.get(source), name=source)
    module = load_factory(source)
    if input_shape is None:
        raise ImportError_(f"{source}: give the input shape (without the batch axis), "
                           "e.g. --input-shape 3,96,96")
    g = torch.Generator().manual_seed(0)
    if input_dtype == "int64":
        example = torch.randint(0, 100, (2, *input_shape), generator=g)
    else:
        example = torch.randn((2, *input_shape), generator=g)
    return import_torch(module, example, features=features, name=name or source.rsplit(":", 1)[-1])


# Where the zoo's backbones end when that is not the input of their last Linear.
ZOO_FEATURES = {"fc-autoencoder": "encoder", "minilm": "output"}


# -- a model directory: what `edgecl import` writes and `edgecl train --model` reads ---------
MODEL_GRAPH, MODEL_WEIGHTS = "graph.json", "weights.safetensors"


def save_model(out: str | Path, graph: Graph, weights: dict[str, np.ndarray], source: str = "") -> Path:
    """``out/graph.json`` (the graph, docs/graph.md) and ``out/weights.safetensors``, atomically."""
    import json

    from safetensors.numpy import save

    from edgecl.runtime.bundle_format import atomic_write_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MODEL_WEIGHTS, save(dict(sorted(weights.items())), metadata={"source": source}))
    doc = {"graph": graph.to_dict(), "source": source}
    atomic_write_bytes(out / MODEL_GRAPH, (json.dumps(doc, indent=1) + "\n").encode())
    return out


def load_model(path: str | Path) -> tuple[Graph, dict[str, np.ndarray]]:
    """A model directory written by :func:`save_model`, validated."""
    import json

    from edgecl.runtime.safetensors_mmap import read_safetensors

    path = Path(path)
    gpath = path / MODEL_GRAPH
    try:
        doc = json.loads(gpath.read_text())
        graph = Graph.from_dict(doc["graph"])
    except FileNotFoundError:
        raise ImportError_(f"{gpath}: missing; is {path} a model directory made by 'edgecl import'?"
                           ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ImportError_(f"{gpath}: {e}") from e
    try:
        weights, _ = read_safetensors(path / MODEL_WEIGHTS, mapped=False)
    except Exception as e:
        raise ImportError_(f"{path / MODEL_WEIGHTS}: {e}") from e
    for p in graph.params.values():
        w = weights.get(p.name)
        if w is None or tuple(w.shape) != p.shape:
            raise ImportError_(f"{path / MODEL_WEIGHTS}: {p.name} is "
                               f"{'missing' if w is None else tuple(w.shape)}, the graph needs {p.shape}")
    return graph, weights


def resolve(model: str, *, features: str | None = None, mask_layers: Sequence[str] | None = None,
            zoo_kwargs: dict | None = None) -> tuple[Graph, dict[str, np.ndarray]]:
    """``--model``: a model directory, or anything :func:`import_model` takes; then the
    choice of masked weights (``--mask-layers``: weight or node names)."""
    if Path(model).is_dir():
        graph, weights = load_model(model)
    else:
        graph, weights = import_model(model, features=features, zoo_kwargs=zoo_kwargs)
    if mask_layers:
        graph = resolve_mask(graph, mask_layers)
    return graph, weights


def resolve_mask(graph: Graph, names: Sequence[str]) -> Graph:
    """The graph with its masked weights chosen by node or weight names."""
    sites = {s.node: s.weight for s in graph.maskable_sites()}
    try:
        return graph.with_mask([sites.get(m, m) for m in names])
    except GraphError as e:
        raise ImportError_(f"--mask-layers: {e}") from None
