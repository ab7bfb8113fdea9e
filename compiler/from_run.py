"""Turning a host run into a bundle, one version per task (so the accuracy matrix can be
measured later version by version, through the device runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecl.models.data import load_spec
from edgecl.models.training import Run, load_run
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_format import MAIN, MANIFEST
from edgecl.runtime.bundle_write import Transaction
from edgecl.runtime.errors import BundleError
from edgecl.runtime.graph import model_entry as graph_model_entry
from edgecl.runtime.routers.store import refit, set_routers


def model_entry(run: Run) -> dict:
    return graph_model_entry(run.graph, run.config["arch"])


def task_entry(run: Run, t: int) -> dict:
    m = run.method
    info = m.tasks[t]
    return {"name": info["name"], "classes": info["classes"], "n_classes": len(info["classes"]),
            "method": m.name, "kind": m.kind, "hparams": dict(m.hp),
            "metrics": {"host_acc": run.acc_matrix[t][t], "before_acc": m.before_acc[t],
                        "init_acc": m.init_acc[t], **m.task_metrics(t)}}


def bundle_run(run_dir: str | Path, out: str | Path, *, routers: bool = True, key="env") -> list[int]:
    """Write (or extend) the bundle ``out`` with the tasks of the run in ``run_dir``.

    An existing bundle must hold a prefix of the run's tasks, byte for byte; each of the
    run's remaining tasks is committed as one version together with the task-ID routers
    brought up to it (fitted on that version's tasks with the run's training data), so
    version ``k`` holds exactly the first ``k`` tasks and routes among them. Returns the
    versions written."""
    run = load_run(run_dir)
    out = Path(out)
    model, backbone = model_entry(run), run.method.export_backbone()
    start = 0
    revised: list[int] = []  # old tasks a later one took weights from (release modes): new revisions
    if (out / MANIFEST).exists():
        have = Bundle.open(out)
        if have.model != model:
            raise BundleError(out / MANIFEST, f"holds another model than the run {run_dir}")
        names = [t["name"] for t in run.tasks]
        if have.task_names != names[: len(have.task_names)]:
            raise BundleError(out / MANIFEST, f"its tasks {have.task_names} are not the start of "
                                              f"the run's tasks {names}")
        for t, name in enumerate(have.task_names):
            stored = have.task_tensors(name)
            fresh = run.method.export_task(t)
            if stored.keys() == fresh.keys() and all(np.array_equal(stored[k], fresh[k]) for k in fresh):
                continue
            if _released(run, t, stored, fresh):
                revised.append(t)
                continue
            raise BundleError(out / have.task(name)["file"],
                              f"task {name!r} differs from the run's; bundle it anew")
        start = len(have.task_names)
    data = []
    if routers:
        stream = load_spec(run.config["stream"])
        data = [(t.name, t.x_train, t.y_train) for t in stream.tasks[: len(run.tasks)]]
    versions = []
    for t in range(start, len(run.tasks)) if start < len(run.tasks) or not revised else [None]:
        with Transaction(out, key=key) as tx:
            tx.add_graph(MAIN, model)
            tx.add_backbone(MAIN, backbone)
            tx.manifest["stream"] = run.config["stream"]
            for j in revised:  # in the version of the task that caused them, never silently
                tx.add_task(_with_own_parts(tx, run, j), run.method.export_task(j), supersede=True)
            revised = []
            if t is not None:
                tx.add_task(_with_own_parts(tx, run, t), run.method.export_task(t))
                if routers:
                    set_routers(tx, refit(tx.candidate(), data[: t + 1]))
        versions.append(tx.version)
    return versions


def _with_own_parts(tx: Transaction, run: Run, t: int) -> dict:
    """Task ``t``'s entry, with the graph and backbone of its own (if the method gives it
    one) added to the version first."""
    entry = task_entry(run, t)
    deps = run.method.task_depends(t)
    if deps:
        entry["depends"] = [run.method.tasks[d]["name"] for d in deps]
    own_graph = run.method.task_graph(t)
    if own_graph is not None:
        name, graph = own_graph
        tx.add_graph(name, graph_model_entry(graph, run.config["arch"]))
        entry["graph"] = name
    own_backbone = run.method.task_backbone(t)
    if own_backbone is not None:
        name, tensors = own_backbone
        tx.add_backbone(name, tensors, graph=MAIN)
        entry["backbone"] = name
    return entry


def _released(run: Run, t: int, stored: dict, fresh: dict) -> bool:
    """Task ``t`` of the run is a later revision of the stored one that only gave weights
    back (a method's release mode): same head, its mask a subset of the stored mask."""
    if getattr(run.method, "task_revision", lambda _t: 1)(t) <= 1 or stored.keys() != fresh.keys():
        return False
    for k in fresh:
        if k.startswith("mask."):
            if np.any(np.asarray(fresh[k]) & ~np.asarray(stored[k])):
                return False
        elif not np.array_equal(stored[k], fresh[k]):
            return False
    return True
