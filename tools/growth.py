"""Storage per task and RAM to hold N tasks, per method, measured on bundles.

    python -m edgecl.tools.growth BUNDLE [BUNDLE ...] [--json out.json] [--plot growth.png]

For every bundle (one method each) and every task ``i`` (in learning order):

* ``file_bytes``: the task's file as stored (mask bits, or the parameters a ``modules``
  task adds, and its head); ``bits_per_weight``: ``8 * file_bytes`` per weight of the
  main backbone (``n_weights`` of its graph), so methods on the same backbone compare;
* ``cum_bytes``: the backbone file plus the files of tasks ``1..i`` (the flash of the
  version holding tasks ``1..i``, as ``edgecl bench methods`` counts it);
* ``ram_bytes``: what a device holds to serve any of tasks ``1..i`` without reading
  storage: the backbone's tensors, every task file's tensors, and the largest working
  copy one active task needs besides them (``W ⊙ M`` of a mask task; nothing for a
  ``modules`` task, whose added parameters are its file's tensors), measured by
  activating each task through the runtime.

``edgecl bench methods`` measures the resident memory of a process instead (RSS); this
report adds bits per backbone weight and the RAM by parts,
from any bundle already written. ``--plot`` draws cumulative storage per method (PNN's
growth against the flat mask methods).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from edgecl.runtime.bundle import Bundle
from edgecl.runtime.session import activate

from .bench_methods import flash_bytes
from .tables import render


def _working_bytes(bundle: Bundle, name: str) -> int:
    """Bytes the active task holds besides the backbone and its file's tensors: the copies
    its kind materialized (the runtime's own count, ``ActiveTask.nbytes``, less the head,
    which is a tensor of the file)."""
    active = activate(bundle, name)
    return active.nbytes - active.head[0].nbytes - active.head[1].nbytes


def growth_rows(path: str | Path) -> list[dict]:
    """One row per task of the bundle at ``path`` (see the module's docstring)."""
    b = Bundle.open(path)
    main = b.graph
    backbone = sum(a.nbytes for a in b.backbone.values())
    n_weights = max(1, main.n_weights)
    first_with: dict[int, Bundle] = {}  # n tasks -> the first version holding n tasks
    for v in b.versions():
        bv = Bundle.open(path, version=v, verify=False)
        first_with.setdefault(len(bv.task_names), bv)
    rows, held, work = [], backbone, 0
    for i, t in enumerate(b.tasks):
        stored = b.task_tensors(t["name"])
        size = b.store.size(t["file"])
        # flash of the version with tasks 1..i+1, as `edgecl bench methods` counts it
        cum = flash_bytes(first_with.get(i + 1, b))
        held += sum(a.nbytes for a in stored.values())
        work = max(work, _working_bytes(b, t["name"]))
        g = b.task_graph(t["name"])
        rows.append({"method": t["method"], "kind": t["kind"], "task": i + 1, "name": t["name"],
                     "backbone_bytes": backbone, "n_weights": main.n_weights, "file_bytes": size,
                     "bits_per_weight": round(8.0 * size / n_weights, 4), "cum_bytes": cum,
                     "ram_bytes": held + work, "graph_params": g.n_params})
    return rows


def plot(rows: Sequence[dict], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        x = [r["task"] for r in mine]
        ax.plot(x, [r["cum_bytes"] / 1024 for r in mine], marker="o", label=method)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("backbone + task files (KiB)")
    ax.set_title("Storage as tasks accumulate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgecl.tools.growth", description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", help="bundle directories (one method each)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="write the cumulative-storage plot here (PNG)")
    args = p.parse_args(argv)
    rows = [r for path in args.bundles for r in growth_rows(path)]
    print(render(["method", "kind", "task", "file B", "bits/weight", "backbone+files B", "RAM B (N tasks)"],
                 [[r["method"], r["kind"], r["task"], r["file_bytes"], r["bits_per_weight"], r["cum_bytes"],
                   r["ram_bytes"]] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
