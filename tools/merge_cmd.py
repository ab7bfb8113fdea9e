"""``edgecl merge``: combine tasks of a bundle into one ``merged`` task by task arithmetic.

    edgecl merge BUNDLE --tasks a,b,c --data DATA [--name merged] [--holdout 0.5]
                 [--search per-task|shared] [--grid 0,0.1,...] [--seed S] [--json REPORT]

``DATA`` is one ``.npz`` (``x``, ``y`` global labels; each sample goes to the source task
whose classes hold its label), one ``.npz`` per task (comma-separated, in ``--tasks``
order), or, on the host, a stream name (``split-digits``, ``permuted-digits``, or
``stream``: the one the bundle records): its tasks' test sets. numpy only for ``.npz``
(it runs on the device); see ``runtime/merge.py`` and docs/method-lora.md.
"""

from __future__ import annotations

import argparse
import json
import math


def _grid(value: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of numbers") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise argparse.ArgumentTypeError(f"{value!r}: the grid needs finite numbers")
    return out


def load_data(spec: str, tasks: list[str], bundle) -> list[tuple]:
    """(task, x, y global labels) per source task from ``--data`` (see the module docstring)."""
    import numpy as np

    from edgecl.runtime.merge import MergeError
    from edgecl.runtime.samples import read_labelled_npz

    parts = [s for s in spec.split(",") if s]
    if all(p.endswith(".npz") for p in parts):
        if len(parts) == len(tasks) and len(parts) > 1:
            return [(t, *read_labelled_npz(p, MergeError)[:2]) for t, p in zip(tasks, parts, strict=True)]
        if len(parts) != 1:
            raise MergeError(f"--data: {len(parts)} .npz files for {len(tasks)} tasks; give one per task, "
                             f"or one file")
        x, y, _ = read_labelled_npz(parts[0], MergeError)
        owner = {}
        for t in tasks:
            for c in bundle.task(t)["classes"]:
                if int(c) in owner:
                    raise MergeError(f"--data {parts[0]}: class {c} belongs to tasks {owner[int(c)]!r} and "
                                     f"{t!r}; give one .npz per task")
                owner[int(c)] = t
        stray = sorted(set(int(v) for v in np.unique(y)) - set(owner))
        if stray:
            raise MergeError(f"--data {parts[0]}: labels {stray} belong to none of the tasks {tasks}")
        return [(t, x[np.isin(y, bundle.task(t)["classes"])], y[np.isin(y, bundle.task(t)["classes"])])
                for t in tasks]
    if len(parts) != 1:
        raise MergeError(f"--data {spec!r}: .npz file(s), or one stream name")
    from edgecl.models.data import load_spec, load_stream  # host only (the stream's data set)

    if parts[0] == "stream":
        if "stream" not in bundle.manifest:
            raise MergeError(f"{bundle.root}: the bundle records no stream; give --data")
        stream = load_spec(bundle.manifest["stream"])
    else:
        stream = load_stream(parts[0])
    by_name = {t.name: t for t in stream.tasks}
    missing = [t for t in tasks if t not in by_name]
    if missing:
        raise MergeError(f"--data {parts[0]}: the stream has no task(s) {missing}")
    return [(t, by_name[t].x_test, np.asarray(by_name[t].classes)[by_name[t].y_test]) for t in tasks]


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime.bundle import Bundle
    from edgecl.runtime.merge import merge

    tasks = [t for t in args.tasks.split(",") if t]
    bundle = Bundle.open(args.bundle, verify=False)  # merge() checks every file
    data = load_data(args.data, tasks, bundle)
    grid = {} if args.grid is None else {"grid": args.grid}
    r = merge(args.bundle, tasks, data, name=args.name, holdout=args.holdout, seed=args.seed,
              search=args.search, **grid)
    routed = r["router_acc"] or {}
    router_txt = ", ".join(f"{n} {v['class_il_acc']:.4f}" for n, v in sorted(routed.items())) or "no router"
    print(f"merged {', '.join(tasks)} into {r['task']!r} (version {r['version']}); scales "
          f"{', '.join(f'{s:g}' for s in r['scales'])} ({r['search']}, chosen on {r['n_select']} samples, "
          f"acc {r['select_acc']:.4f})")
    print(f"on {r['n_report']} held-out samples: merged (no task id, {len(r['classes'])} classes) "
          f"{r['merged_acc']:.4f}; isolated with the true task id {r['isolated_acc']:.4f}; "
          f"router-picked (class-IL) {router_txt}; old tasks byte-identical on {r['canaries_checked']} "
          f"canary outputs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
            f.write("\n")
    return 0


def add_parser(sub) -> None:
    """Register ``merge`` on ``edgecl``'s subparsers object."""
    from . import bundle_cmd

    p = sub.add_parser("merge", help="combine tasks into one merged task (task arithmetic, no task id "
                                     "needed); scales chosen on held-out samples")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--tasks", required=True, help="comma-separated source tasks (at least 2)")
    p.add_argument("--data", required=True,
                   help="one .npz (x, y global labels), one .npz per task (comma-separated), or a stream "
                        "name (host: split-digits, permuted-digits, stream = the bundle's): its test sets")
    p.add_argument("--name", default="merged", help="the merged task's name (default: merged)")
    p.add_argument("--holdout", type=float, default=0.5,
                   help="fraction of each task's samples kept for the report; the scales are chosen on "
                        "the rest (default 0.5; 0: both on all)")
    p.add_argument("--search", default="per-task", choices=["per-task", "shared"],
                   help="one shared scale, or then one pass of per-task coordinate ascent (default)")
    p.add_argument("--grid", type=_grid,
                   help="candidate scales, comma-separated (default 0,0.1,...,1.5)")
    p.add_argument("--seed", type=int, default=0, help="the held-out split's seed")
    p.add_argument("--json", help="write the report here")
    bundle_cmd.add_key_argument(p)
    bundle_cmd.add_trust_argument(p)
    p.set_defaults(func=main)
