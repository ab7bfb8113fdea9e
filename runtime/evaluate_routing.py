"""Evaluating task-ID routers through the runtime: task-ID accuracy, class-incremental
accuracy, the fallback decisions, and the router's time as a share of one inference."""

from __future__ import annotations

import timeit
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .routers import UNKNOWN
from .routers.store import default_router, load_router, router_names
from .session import Runtime


def _best_time(fn, number: int = 200, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def evaluate_routing(path: str | Path, data: Sequence[tuple[str, np.ndarray, np.ndarray]],
                     unknown: Sequence[tuple[str, np.ndarray]] = (), threshold: float = 0.5,
                     timing: bool = True) -> dict:
    """``data``: (task, x_test, y_test) of the bundle's tasks; ``unknown``: (label, inputs)
    that belong to no task of the bundle (noise, held-out classes)."""
    bundle = Bundle.open(path)
    rt = Runtime(bundle)
    shape = rt.input_shape
    names = bundle.task_names
    known = [(names.index(n), x.reshape(len(x), *shape).astype(np.float32), y)
             for n, x, y in data if n in names]
    out = {}
    for name in router_names(bundle):
        router = load_router(bundle, name)
        tid = cil = total = accepted_ok = rejected_known = 0
        for t, x, y in known:
            d = router.decide(rt, x, threshold)
            tid += int((d.best == t).sum())
            total += len(x)
            rejected_known += int((d.task == UNKNOWN).sum())
            accepted_ok += int((d.task == t).sum())
            for task in np.unique(d.best):  # class-IL: the routed task's prediction
                sel = d.best == task
                pred = rt.logits(x[sel], int(task)).argmax(axis=1)
                cil += int(((task == t) & (pred == y[sel])).sum())
        probes = {}
        correct_unknown = n_unknown = 0
        for label, x in unknown:
            d = router.decide(rt, x.reshape(len(x), *shape).astype(np.float32), threshold)
            probes[label] = float((d.task == UNKNOWN).mean())
            correct_unknown += int((d.task == UNKNOWN).sum())
            n_unknown += len(x)
        row = {
            "task_id_acc": tid / total,
            "class_il_acc": cil / total,
            "fallback": {
                "threshold": threshold,
                "known_rejected_rate": rejected_known / total,
                "known_accepted_correct_rate": accepted_ok / total,
                "unknown_rate": probes,
                "decision_acc": (accepted_ok + correct_unknown) / (total + n_unknown),
            },
            "temperature": router.temperature,
        }
        if timing:
            x1 = known[0][1][:1]
            t_infer = _best_time(lambda x1=x1: rt.logits(x1, 0))
            t_route = _best_time(lambda x1=x1, router=router: router.decide(rt, x1, threshold))
            row["router_s"], row["inference_s"] = t_route, t_infer
            row["router_overhead"] = t_route / t_infer
        out[name] = row
    result = {"routers": out}
    if out:
        d = out[default_router(bundle)]
        result.update(default_router=default_router(bundle), task_id_acc=d["task_id_acc"],
                      class_il_acc=d["class_il_acc"], router_overhead=d.get("router_overhead"))
    return result
