"""Kinds that add parameters of their own on a frozen backbone: low-rank deltas (LoRA),
added modules on a graph of the task's own (adapters, a new column with lateral links,
experts), and a merged task built from other tasks (task arithmetic). These tasks read
the whole backbone, so they own all of it: no later task may change a backbone entry
they use."""

from __future__ import annotations

import numpy as np

from ..graph import MaskSite
from .base import Params, Resolve, TaskKind, TaskView, check_extra


def _whole(view: TaskView) -> dict[str, np.ndarray | None]:
    return {p: None for p in view.graph.params if p in view.backbone}


def _finite(view: TaskView, key: str, t: np.ndarray) -> None:
    if t.size and not np.isfinite(t).all():
        raise view.fail(key, "holds NaN or infinite values")


class LoRA(TaskKind):
    """A low-rank delta per chosen masked weight: ``lora.<node>.a`` float32 ``(r, fan_in)``
    and ``lora.<node>.b`` float32 ``(units, r)``, and one ``lora.scale`` float32 ``(1,)``
    (alpha / r). The task runs with ``W + scale * (b @ a)`` (the weight viewed as
    ``(units, fan_in)`` along its unit axis). Only the nodes present carry a delta."""

    name = "lora"
    prefixes = ("lora.",)
    learners = ("lora", "head")

    @staticmethod
    def _as_matrix(s: MaskSite, w: np.ndarray) -> np.ndarray:
        return np.moveaxis(w, s.rule.unit_axis, 0).reshape(s.units, -1)

    def _chosen(self, view: TaskView) -> list[MaskSite]:
        return [s for s in self.sites(view) if f"lora.{s.node}.a" in view.tensors]

    def validate(self, view: TaskView) -> None:
        chosen = self._chosen(view)
        if not chosen:
            raise view.fail("lora.<node>.a", "a LoRA task holds a delta for at least one masked weight")
        scale = view.expect("lora.scale", np.float32, (1,))
        _finite(view, "lora.scale", scale)
        allowed = {"lora.scale"}
        for s in chosen:
            fan_in = int(np.prod(s.shape)) // s.units
            a = view.get(f"lora.{s.node}.a")
            r = a.shape[0] if a.ndim == 2 else -1
            view.expect(f"lora.{s.node}.a", np.float32, (r, fan_in))
            view.expect(f"lora.{s.node}.b", np.float32, (s.units, r))
            for part in "ab":
                _finite(view, f"lora.{s.node}.{part}", view.tensors[f"lora.{s.node}.{part}"])
            allowed |= {f"lora.{s.node}.a", f"lora.{s.node}.b"}
        check_extra(view, self, allowed)

    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        scale = np.float32(view.tensors["lora.scale"][0])
        out = {}
        for s in self._chosen(view):
            w = view.backbone[s.weight]
            delta = scale * (view.tensors[f"lora.{s.node}.b"] @ view.tensors[f"lora.{s.node}.a"])
            moved = self._as_matrix(s, np.asarray(w, dtype=np.float32)) + delta
            out[s.weight] = np.ascontiguousarray(np.moveaxis(
                moved.reshape((s.units,) + tuple(np.delete(s.shape, s.rule.unit_axis))), 0, s.rule.unit_axis))
        return out

    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        return _whole(view)


class Modules(TaskKind):
    """Parameters the task adds to a graph of its own (an adapter, a new column with lateral
    links, an expert): every parameter of the task's graph that the backbone does not hold
    is stored as ``param.<name>`` (float32, the graph's shape), in this task's file or, for
    parts an earlier task added (PNN's earlier columns, earlier experts), in the file of a
    task this one ``depends`` on (the first that has it), so nothing is stored twice. The
    task's entry names its graph; only backends that run that graph serve it."""

    name = "modules"
    prefixes = ("param.",)
    same_graph = False

    def _added(self, view: TaskView) -> list[str]:
        return [p for p in view.graph.params if p not in view.backbone]

    def validate(self, view: TaskView) -> None:
        added = self._added(view)
        deps = self.depends(view)
        for p in added:
            if f"param.{p}" not in view.tensors and deps:
                continue  # from a task it depends on (checked when it is materialized)
            t = view.expect(f"param.{p}", np.float32, tuple(view.graph.params[p].shape))
            _finite(view, f"param.{p}", t)
        check_extra(view, self, {f"param.{p}" for p in added})

    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        added = self._added(view)
        out = {p: view.tensors[f"param.{p}"] for p in added if f"param.{p}" in view.tensors}
        missing = [p for p in added if p not in out]
        for dep in self.depends(view):
            if not missing:
                break
            theirs = resolve(dep)
            for p in [p for p in missing if p in theirs]:
                got = np.asarray(theirs[p])
                if got.dtype != np.float32 or got.shape != tuple(view.graph.params[p].shape):
                    raise view.fail(f"param.{p}", f"task {dep!r} holds it as {got.dtype} of shape "
                                                  f"{got.shape}; the graph needs float32 of shape "
                                                  f"{tuple(view.graph.params[p].shape)}")
                out[p] = got
                missing.remove(p)
        if missing:
            raise view.fail(f"param.{missing[0]}", f"neither in the task file nor in the tasks it depends on "
                                                   f"({', '.join(self.depends(view)) or 'none'})")
        return out

    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        return _whole(view)


class Merged(TaskKind):
    """Task arithmetic over other tasks of the same graph: ``merge.scale`` float32 of one
    scale per entry of ``depends``; the task runs with ``W + sum_i scale_i * (P_i - W)``,
    ``P_i`` the effective parameters of task ``depends[i]``, and a head of its own."""

    name = "merged"
    prefixes = ("merge.",)

    def validate(self, view: TaskView) -> None:
        deps = self.depends(view)
        if not deps:
            raise view.fail("merge.scale", "a merged task must list the tasks it merges in 'depends'")
        scale = view.expect("merge.scale", np.float32, (len(deps),))
        _finite(view, "merge.scale", scale)
        check_extra(view, self, {"merge.scale"})

    def materialize(self, view: TaskView, resolve: Resolve) -> Params:
        scales = [np.float32(s) for s in view.tensors["merge.scale"]]
        sources = [resolve(d) for d in self.depends(view)]
        names = sorted({n for p in sources for n in p if n in view.backbone})
        out = {}
        for n in names:
            w = np.asarray(view.backbone[n], dtype=np.float32)
            acc = w.copy()
            for s, p in zip(scales, sources, strict=True):
                if n in p:
                    acc += s * (np.asarray(p[n], dtype=np.float32) - w)
            out[n] = acc
        return out

    def owned(self, view: TaskView) -> dict[str, np.ndarray | None]:
        return _whole(view)
