"""Task arithmetic: one ``merged`` task built from chosen tasks of a bundle, which serves
all their classes without a task id (Zeng, Li, Ayesh 2025; Ilharco et al., 2023).

    from edgecl.runtime.merge import merge
    report = merge("bundle/", ["digits-0-1", "digits-2-3"], data, name="merged")

``data``: (task name, x, y global labels) for every source task: the samples whoever
merges holds (the host: the run's stream; the device: what the user gives). A seeded,
stratified ``holdout`` fraction of each task's samples is kept apart for the report; the
scales are chosen on the rest:

- task vectors ``D_i = P_i - W`` (``P_i`` the parameters task ``i`` runs with, ``W`` the
  backbone), formed once; the merged model runs with ``W + sum_i s_i D_i`` (exactly the
  ``merged`` kind's arithmetic, so the bytes chosen on are the bytes committed);
- the head: the sources' heads side by side, one row per class of the union of their
  classes (a class two sources share gets the mean of their rows); prediction = argmax
  over the union, so no task id is needed;
- the scales: one shared ``s`` from ``grid`` (task arithmetic's lambda), then (``search
  = "per-task"``) one pass of coordinate ascent per task over ``grid``, a change kept
  only when it raises the accuracy on the choosing samples.

The report gives, on the held-out samples, the merged task's accuracy (no task id, over
the union's classes), the isolated tasks' accuracy with the true task id, and the
class-incremental accuracy of every task-ID router of the bundle (the router picks the
task, that task answers) measured on the version before the merge. The merged task is
committed through ``bundle_write.Transaction`` like a learned task (``learner.stage_task``:
old tasks' canary outputs byte-identical, signed with ``key``), with the routers
refitted so that they cover it. numpy only: it runs on the device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import executor
from .bundle import Bundle
from .bundle_write import Transaction
from .errors import EdgeclError
from .graph import Graph
from .learn.learner import _old_logits, holdout_split, stage_task
from .samples import canary
from .session import Runtime, activate, task_view

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(0, 16))  # 0.0 .. 1.5
BATCH = 256


class MergeError(EdgeclError):
    """A merge that cannot be built or committed."""


def _check_sources(bundle: Bundle, names: Sequence[str]) -> None:
    if len(names) < 2:
        raise MergeError(f"a merge combines at least 2 tasks, got {list(names)}")
    if len(set(names)) != len(names):
        raise MergeError(f"--tasks lists a task twice: {list(names)}")
    for n in names:
        if n not in bundle.task_names:
            raise MergeError(f"{bundle.root}: no task {n!r} (the bundle has {', '.join(bundle.task_names)})")
        kind, view = task_view(bundle, n)
        info = view.entry
        if not kind.same_graph or info.get("graph", bundle.main) != bundle.main \
                or info.get("backbone", bundle.main) != bundle.main:
            raise MergeError(f"{bundle.root}: task {n!r} (kind {kind.name!r}) does not run on the main "
                             f"graph and backbone; task arithmetic adds deltas of one backbone")


def task_vectors(bundle: Bundle, names: Sequence[str]
                 ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """(``W``: the backbone tensors some source changes, [``D_i = P_i - W`` per source]),
    float32, with ``P_i`` materialized by the runtime (the ``merged`` kind's ``P_i``)."""
    backbone = bundle.backbone
    deltas: list[dict[str, np.ndarray]] = []
    base: dict[str, np.ndarray] = {}
    for n in names:
        params = activate(bundle, n).params
        d = {}
        for p, v in params.items():
            w = backbone.get(p)
            if w is None or v is w:
                continue
            w32, v32 = np.asarray(w, dtype=np.float32), np.asarray(v, dtype=np.float32)
            if w32.tobytes() != v32.tobytes():
                base[p] = w32
                d[p] = v32 - w32
        deltas.append(d)
    return base, deltas


def merged_params(base: dict[str, np.ndarray], deltas: Sequence[dict[str, np.ndarray]],
                  scales: Sequence[float]) -> dict[str, np.ndarray]:
    """``W + sum_i s_i D_i`` for every tensor a source changes, in the order (and float32
    rounding) the ``merged`` kind materializes it."""
    out = {}
    for p, w in base.items():
        acc = w.copy()
        for s, d in zip(scales, deltas, strict=True):
            if p in d:
                acc += np.float32(s) * d[p]
        out[p] = acc
    return out


def merged_head(bundle: Bundle, names: Sequence[str]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(the union's classes, sorted; head weight; head bias): one row per class, the
    mean of the rows of the sources that have it."""
    rows: dict[int, list[tuple[np.ndarray, np.float32]]] = {}
    for n in names:
        info = bundle.task(n)
        t = bundle.task_tensors(n)
        for j, c in enumerate(info["classes"]):
            rows.setdefault(int(c), []).append((np.asarray(t["head.weight"][j], np.float32),
                                                np.float32(t["head.bias"][j])))
    classes = sorted(rows)
    w = np.stack([np.mean([r[0] for r in rows[c]], axis=0) for c in classes]).astype(np.float32)
    b = np.array([np.mean([r[1] for r in rows[c]]) for c in classes], dtype=np.float32)
    return classes, w, b


def _predict(graph: Graph, params: dict[str, np.ndarray], head: tuple[np.ndarray, np.ndarray],
             x: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(x), BATCH):
        out.append(executor.forward(graph, params, head, x[i:i + BATCH]).argmax(axis=1))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def choose_scales(graph: Graph, backbone: dict[str, np.ndarray], base: dict[str, np.ndarray],
                  deltas: Sequence[dict[str, np.ndarray]], head: tuple[np.ndarray, np.ndarray],
                  x: np.ndarray, y_idx: np.ndarray, grid: Sequence[float] = DEFAULT_GRID,
                  search: str = "per-task") -> tuple[list[float], float, int]:
    """(scales, their accuracy on ``x``/``y_idx`` (indices into the union's classes),
    forward passes run). Ties keep the earlier candidate (the smaller shared scale, the
    current per-task one)."""
    if search not in ("shared", "per-task"):
        raise MergeError(f"search must be 'shared' or 'per-task', got {search!r}")
    if not grid:
        raise MergeError("the scale grid is empty")
    runs = 0

    def acc(scales: Sequence[float]) -> float:
        nonlocal runs
        runs += 1
        params = {**backbone, **merged_params(base, deltas, scales)}
        return float((_predict(graph, params, head, x) == y_idx).mean())

    k = len(deltas)
    best, best_acc = None, -1.0
    for s in grid:
        a = acc([s] * k)
        if a > best_acc:
            best, best_acc = [float(s)] * k, a
    if search == "per-task":
        for i in range(k):
            for s in grid:
                if s == best[i]:
                    continue
                cand = list(best)
                cand[i] = float(s)
                a = acc(cand)
                if a > best_acc:
                    best, best_acc = cand, a
    return best, best_acc, runs


def merge(bundle_dir: str | Path, tasks: Sequence[str], data: Sequence[tuple[str, np.ndarray, np.ndarray]], *,
          name: str = "merged", holdout: float = 0.5, seed: int = 0, grid: Sequence[float] = DEFAULT_GRID,
          search: str = "per-task", key="env") -> dict:
    """Build, check and commit the merged task of ``tasks`` (see the module docstring);
    returns the report. Raises :class:`MergeError` (or a ``BundleError`` naming a file)."""
    t0 = time.monotonic()
    root = Path(bundle_dir)
    tasks = list(tasks)
    bundle = Bundle.open(root)  # every file's sha256 checked once
    if name in bundle.task_names:
        raise MergeError(f"{root}: task {name!r} is already in the bundle (version {bundle.version}); "
                         f"choose another --name")
    _check_sources(bundle, tasks)
    if not 0.0 <= holdout < 1.0:
        raise MergeError(f"holdout must lie in [0, 1), got {holdout}")
    by_task = {}
    for t, x, y in data:
        if t not in tasks:
            continue
        if t in by_task:
            raise MergeError(f"the data holds task {t!r} twice")
        by_task[t] = (x, np.asarray(y))
    missing = [t for t in tasks if t not in by_task]
    if missing:
        raise MergeError(f"no samples for task(s) {missing}: the scales are chosen on every source's data")
    rt = Runtime(bundle, cache_bytes=0)
    classes, hw, hb = merged_head(bundle, tasks)
    lut = {c: i for i, c in enumerate(classes)}
    pick_x, pick_y, rep = [], [], []
    for t in tasks:
        x, y = by_task[t]
        x = np.asarray(x)
        if len(x) != len(y) or not len(x) or x[0].size != int(np.prod(rt.input_shape)):
            raise MergeError(f"samples of task {t!r}: x of shape {x.shape} and y of {len(y)} labels do not "
                             f"fit the model's input {tuple(rt.input_shape)} (one label per sample, "
                             f"at least one)")
        try:
            x = rt.check_input(x.reshape(len(x), *rt.input_shape))
        except EdgeclError as e:
            raise MergeError(f"samples of task {t!r}: {e}") from None
        own = bundle.task(t)["classes"]
        bad = sorted(set(int(v) for v in np.unique(y)) - set(int(c) for c in own))
        if bad:
            raise MergeError(f"samples of task {t!r} have labels {bad}, not among its classes {own}")
        tr, te = holdout_split(y, holdout, seed) if holdout > 0 else (np.arange(len(y)), np.arange(len(y)))
        pick_x.append(x[tr])
        pick_y.append(np.array([lut[int(v)] for v in y[tr]], dtype=np.int64))
        rep.append((t, x[te], y[te].astype(np.int64)))
    xs, ys = np.concatenate(pick_x), np.concatenate(pick_y)

    # the isolated tasks with the true task id, and the routers' pick, before the merge
    iso = {}
    for t, x, y in rep:
        local = np.searchsorted(np.asarray(bundle.task(t)["classes"]), y)
        iso[t] = float((rt.logits(x, t).argmax(axis=1) == local).mean())
    n_rep = sum(len(y) for _, _, y in rep)
    isolated = sum(iso[t] * len(y) for t, _, y in rep) / n_rep
    routed = None
    have_routers = sorted(bundle.manifest.get("routers", {}))
    if have_routers:
        from .evaluate_routing import evaluate_routing

        r = evaluate_routing(root, [(t, x, np.searchsorted(np.asarray(bundle.task(t)["classes"]), y))
                                      for t, x, y in rep], timing=False)
        routed = {n: {"class_il_acc": v["class_il_acc"], "task_id_acc": v["task_id_acc"]}
                  for n, v in r["routers"].items()}

    graph = bundle.graph
    base, deltas = task_vectors(bundle, tasks)
    backbone = {p: bundle.backbone[p] for p in graph.params}
    scales, pick_acc, runs = choose_scales(graph, backbone, base, deltas, (hw, hb), xs, ys, grid, search)

    # seeded inputs fit for the model (token ids for a token model) + the first samples
    canaries = np.concatenate([canary(bundle, 32, seed=20240607), xs[:32]])
    before = _old_logits(rt, bundle.task_names, canaries)
    entry = {"name": name, "kind": "merged", "classes": classes, "n_classes": len(classes), "method": "merge",
             "depends": tasks, "hparams": {"search": search, "grid": [float(g) for g in grid],
                                           "holdout": holdout, "seed": int(seed)},
             "metrics": {"host_acc": None, "before_acc": None, "init_acc": None}}
    tensors = {"merge.scale": np.asarray(scales, dtype=np.float32), "head.weight": hw, "head.bias": hb}
    with Transaction(root, key=key, note=f"merge of {', '.join(tasks)}") as tx:
        if tx.previous["version"] != bundle.version:
            raise MergeError(f"{root}: the bundle moved on to version {tx.previous['version']} while merging "
                             f"(from version {bundle.version}); merge again")
        added, crt = stage_task(tx, bundle, None, entry, tensors, canaries, before)
        per_task = {}
        for t, x, y in rep:
            idx = np.array([lut[int(v)] for v in y], dtype=np.int64)
            per_task[t] = float((crt.logits(x, name).argmax(axis=1) == idx).mean())
        merged_acc = sum(per_task[t] * len(y) for t, _, y in rep) / n_rep
        added["metrics"].update(merged_acc=merged_acc, isolated_acc=isolated, router_acc=routed,
                                select_acc=pick_acc, scales=scales, learned_on="merge")
        if have_routers:
            from .routers.store import refit, set_routers

            set_routers(tx, refit(crt.bundle, [(name, xs, ys)], names=have_routers))
    return {"bundle": str(root), "task": name, "tasks": tasks, "version": tx.version, "classes": classes,
            "scales": scales, "search": search, "select_acc": pick_acc, "forward_passes": runs,
            "n_select": int(len(ys)), "n_report": int(n_rep), "holdout": holdout,
            "merged_acc": merged_acc, "merged_acc_per_task": per_task,
            "isolated_acc": isolated, "isolated_acc_per_task": iso, "router_acc": routed,
            "canaries_checked": len(canaries) * len(bundle.task_names),
            "merge_scale_bytes": int(tensors["merge.scale"].nbytes),
            "seconds_wall": time.monotonic() - t0}
