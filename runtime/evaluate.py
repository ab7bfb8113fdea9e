"""Evaluating a bundle through the device runtime: the accuracy matrix, version by version.

Row i of R is measured on the newest bundle version whose tasks are exactly the first
i+1 tasks, so R[i][j] is what the device really answered after learning task i. Entries
above the diagonal do not exist on the device (task j has no head yet) and are None;
FWT uses the accuracies the host measured before each task was learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import metrics
from .bundle import Bundle
from .errors import EdgeclError, InputError
from .session import Runtime


def _as_input(x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
        raise InputError(f"task {name}: data of shape {x.shape[1:]} does not fit the model's "
                         f"input {shape}")
    return x.reshape(len(x), *shape)


# what every task records; anything else in a task's metrics is its method's own figures
COMMON_METRICS = ("host_acc", "before_acc", "init_acc", "device_acc", "learned_on", "joules", "steps")


def evaluate(path: str | Path, data: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    """``data``: (task name, x_test, y_test local labels) for every task of the bundle."""
    current = Bundle.open(path)
    # a merged task (task arithmetic over others) is no step of the stream: it is measured
    # apart, on its sources' test data, without a task id (``merged`` below)
    merged = [t for t in current.tasks if t["kind"] == "merged"]
    names = [t["name"] for t in current.tasks if t["kind"] != "merged"]
    by_name = {name: (x, y) for name, x, y in data}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise EdgeclError(f"{path}: the data has no test set for bundle task(s) {missing}")
    shape = tuple(current.model["input_shape"])
    rows: list[list[float | None]] = []
    versions_used = []
    by_tasks = {}
    for v in current.versions():
        b = Bundle.open(path, version=v, verify=False)
        by_tasks[tuple(t["name"] for t in b.tasks if t["kind"] != "merged")] = v
    for i in range(len(names)):
        v = by_tasks.get(tuple(names[: i + 1]))
        row: list[float | None] = [None] * len(names)
        if v is not None:
            rt = Runtime(path, version=v)
            for j in range(i + 1):
                x, y = by_name[names[j]]
                pred = rt.logits(_as_input(x, shape, names[j]), names[j]).argmax(axis=1)
                row[j] = float((pred == y).mean())
        rows.append(row)
        versions_used.append(v)
    final = rows[-1]
    diag_ok = all(rows[j][j] is not None for j in range(len(names)))
    tasks = [t for t in current.tasks if t["kind"] != "merged"]
    return {
        "bundle": str(path),
        "version": current.version,
        "tasks": names,
        "versions_per_row": versions_used,
        "acc_matrix": rows,
        "acc": metrics.acc([final]),
        "bwt": metrics.bwt(rows) if diag_ok else None,
        "fwt": metrics.fwt([t["metrics"].get("before_acc") for t in tasks],
                           [t["metrics"].get("init_acc") for t in tasks]),
        "fwt_source": "host: accuracy before each task was learned vs. at initialization",
        "fwt_missing": [t["name"] for t in tasks[1:] if t["metrics"].get("before_acc") is None
                        or t["metrics"].get("init_acc") is None],
        "bits_per_weight_per_task": [t["storage"]["mask_bits_per_weight"] for t in tasks],
        "per_task": [{"name": t["name"], "method": t["method"], "acc": final[i],
                      "host_acc": t["metrics"].get("host_acc"),
                      "method_metrics": {k: v for k, v in t["metrics"].items() if k not in COMMON_METRICS},
                      "mask_bits_per_weight": t["storage"]["mask_bits_per_weight"],
                      "bits_per_weight": t["storage"]["bits_per_weight"],
                      "bytes": t["storage"]["file_bytes"]} for i, t in enumerate(tasks)],
        "merged": [_merged_accuracy(current, m, by_name, shape) for m in merged],
    }


def _merged_accuracy(bundle: Bundle, m: dict, by_name: dict, shape: tuple[int, ...]) -> dict:
    """A merged task's accuracy on its sources' test sets together, over the union of their
    classes (no task id: one prediction among all of them)."""
    xs, ys = [], []
    for src in m.get("depends", []):
        x, y = by_name[src]
        xs.append(_as_input(x, shape, src))
        ys.append(np.asarray(bundle.task(src)["classes"])[np.asarray(y)])
    lut = {c: i for i, c in enumerate(m["classes"])}
    want = np.array([lut[int(c)] for c in np.concatenate(ys)])
    pred = Runtime(bundle.root).logits(np.concatenate(xs), m["name"]).argmax(axis=1)
    return {"name": m["name"], "sources": list(m.get("depends", [])), "acc": float((pred == want).mean()),
            "samples": int(len(want))}
