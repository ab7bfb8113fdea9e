"""A model graph run in PyTorch, functionally, so each method supplies its own weights.

Each node runs through its op's ``torch`` definition in the registry; no op switch here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from edgecl.runtime.graph import Graph
from edgecl.runtime.ops import get_op

Params = Mapping[str, torch.Tensor]


class Prefix:
    """What a frozen prefix of the graph computes for a whole training set, computed once:
    the values the trained part starts from (``Cut.starts`` of
    ``edgecl.runtime.learn.train_numpy.cut``, the device learner's prefix cache), per input.
    A training loop indexes it like its input batch and :func:`features` runs only the
    trained part (``nodes``) on it, so the frozen part (e.g. the first layers of a
    pretrained transformer under LoRA on its last ones) runs once per input, not once per
    epoch."""

    def __init__(self, values: dict[str, torch.Tensor], nodes: tuple) -> None:
        self.values, self.nodes = values, nodes

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def __getitem__(self, idx) -> Prefix:
        return Prefix({k: v[idx] for k, v in self.values.items()}, self.nodes)


def frozen_prefix(graph: Graph, params: Params, x: torch.Tensor, trainable: Collection[str], *,
                  chunk: int = 256, max_bytes: int = 256 << 20) -> Prefix | None:
    """``x`` through every node that no parameter in ``trainable`` reaches, in chunks, or
    None where that saves nothing (no node before the trained part) or would hold more
    than ``max_bytes``."""
    from edgecl.runtime.learn.train_numpy import cut

    c = cut(graph, trainable)
    if not c.prefix:
        return None
    parts: dict[str, list[torch.Tensor]] = {v: [] for v in c.starts}
    held = 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            values = _run(graph, c.prefix, params, {graph.input.name: x[i:i + chunk]})
            for v in c.starts:
                parts[v].append(values[v])
                held += values[v].numel() * values[v].element_size()
            if held > max_bytes:
                return None
    return Prefix({v: torch.cat(t) for v, t in parts.items()}, c.suffix)


def _run(graph: Graph, nodes, params: Params, values: dict[str, torch.Tensor],
         gates: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    for n in nodes:
        op = get_op(n.op)
        ys = op.torch([values[i] if i in values else params[i] for i in n.inputs], n.attrs)
        if gates is not None and n.name in gates:
            axis = op.mask.out_axis % ys[0].dim()
            shape = [1] * ys[0].dim()
            shape[axis] = -1
            ys = [ys[0] * gates[n.name].view(shape)]
        values.update(zip(n.outputs, ys, strict=True))
    return values


def features(graph: Graph, params: Params, x: torch.Tensor | Prefix,
             gates: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Backbone features. ``params`` maps every parameter name to a tensor;
    ``gates[node]`` (HAT) scales that node's output units. ``x`` is an input batch or a
    batch of a :class:`Prefix` (then only the nodes after the prefix run)."""
    if isinstance(x, Prefix):
        return _run(graph, x.nodes, params, dict(x.values), gates)[graph.features]
    return _run(graph, graph.backbone_nodes, params, {graph.input.name: x}, gates)[graph.features]


def init_backbone(graph: Graph, gen: torch.Generator, *,
                  signed_constant: bool = False) -> dict[str, torch.Tensor]:
    """Initial weights by role: SupSup's signed Kaiming constant for the masked weights;
    else PyTorch's default (uniform, bound 1/sqrt(fan_in)) for the built-in mlp/cnn, and
    He-uniform (bound sqrt(6/fan_in)) for deeper graphs (a zoo model without its
    normalization layers, folded away at import, would lose its signal with PyTorch's)."""
    he = graph.name not in ("mlp", "cnn")
    out: dict[str, torch.Tensor] = {}
    fan_in: dict[str, int] = {}
    for site in graph.mask_sites():
        fan_in[site.weight] = max(1, int(torch.tensor(site.shape[1:]).prod()) if len(site.shape) > 1 else 1)
        if site.bias:
            fan_in[site.bias] = fan_in[site.weight]
    masked = {s.weight for s in graph.mask_sites()}
    for p in graph.params.values():
        shape = p.shape
        if p.role == "weight":
            fi = fan_in.get(p.name) or max(1, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
            if signed_constant and p.name in masked:
                sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
                out[p.name] = sign * (2.0 / fi) ** 0.5
            else:
                bound = (6.0 / fi) ** 0.5 if he else 1.0 / fi**0.5
                out[p.name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        elif p.role == "bias":
            fi = fan_in.get(p.name, shape[0] if shape else 1)
            out[p.name] = torch.zeros(shape) if he else (torch.rand(shape, generator=gen) * 2 - 1) / fi**0.5
        elif p.role in ("scale", "var"):
            out[p.name] = torch.ones(shape)
        elif p.role == "embedding":
            out[p.name] = torch.randn(shape, generator=gen)
        else:  # mean, const, ...
            out[p.name] = torch.zeros(shape)
    return out


def init_head(n_in: int, n_out: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    bound = 1.0 / n_in**0.5
    w = (torch.rand((n_out, n_in), generator=gen) * 2 - 1) * bound
    b = (torch.rand(n_out, generator=gen) * 2 - 1) * bound
    return w, b
