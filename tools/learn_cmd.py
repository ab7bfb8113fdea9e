"""``edgecl learn``: learn a new task on the device and commit it to the bundle.

Wired by the CLI as ``learn``: ``add_arguments(parser)`` then ``main(args) -> int``
(0 committed, 3 paused because the energy budget was spent: run again with
``--resume``). User errors raise :class:`edgecl.runtime.errors.EdgeclError` subclasses.
Device side: no torch.
"""

from __future__ import annotations

import argparse
import sys

EXIT_PAUSED = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgecl.runtime.learn.methods import LEARN_METHODS, site_trainers

    sources = " or ".join(n for n, m in LEARN_METHODS.items() if m.needs_source)
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--task", required=True, help="the new task's name (as its stream names it, "
                                                 "e.g. digits-8-9)")
    p.add_argument("--data", required=True, help=".npz with x [N, ...] and y [N] (global labels)")
    p.add_argument("--method", required=True, choices=list(LEARN_METHODS))
    p.add_argument("--epochs", type=int, help="default: the host method's (30)")
    p.add_argument("--ram-mb", type=float, default=256.0,
                   help="RAM budget in MiB (plan + hard address-space limit above a bare child; "
                        "default 256)")
    p.add_argument("--energy-j", type=float, help="joules this run may draw; checkpoint and pause "
                                                  "when spent (default: no limit)")
    p.add_argument("--resume", action="store_true", help="continue a paused learning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="largest batch to plan for (default 32)")
    p.add_argument("--lr", type=float, help="default: the host method's")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of the samples held out for the report's accuracy (default 0.1)")
    p.add_argument("--meter", default="auto", choices=["auto", "rapl", "ina3221", "pmic", "model"],
                   help="energy meter (auto: the first real one present, else the CPU-time model)")
    p.add_argument("--source-task", help=f"--method {sources}: the task whose mask gives the features "
                                         "(default: the newest)")
    p.add_argument("--step", default="auto", choices=["auto", "numpy", "tvm"],
                   help="training step: the bundle's compiled TVM step for this machine, or numpy "
                        "(auto: tvm when the bundle has one, else numpy)")
    p.add_argument("--train-last", type=int, metavar="K",
                   help=f"{'/'.join(site_trainers())}: train only the last K mask sites and the head; "
                        "earlier sites are frozen and run forward only (default: all)")
    p.add_argument("--force", action="store_true",
                   help="learn the task even if an existing task has exactly its classes")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime.learn import learn

    r = learn(args.bundle, args.task, args.data, method=args.method, epochs=args.epochs,
              ram_mb=args.ram_mb, energy_j=args.energy_j, resume=args.resume, seed=args.seed,
              batch_size=args.batch_size, lr=args.lr, holdout=args.holdout, meter=args.meter,
              source_task=args.source_task, step_backend=args.step, json_path=args.json, quiet=args.quiet,
              train_last=args.train_last, force=args.force)
    mib = 1 << 20
    energy = f"{r.get('joules', 0.0):.2f} J ({r.get('meter')})"
    rss = r.get("peak_rss_bytes") or 0
    common = (f"steps {r.get('steps')}/{r.get('total_steps')}, batch {r['batch_size']}, "
              f"plan {r['plan_bytes'] / mib:.2f} MiB, peak RSS {rss / mib:.1f} MiB, energy {energy}")
    if r["status"] == "paused":
        print(f"paused {r['task']!r}: the energy budget of {r['energy_budget_j']:g} J is spent; "
              f"{common}; checkpoint {r['checkpoint']}; continue with --resume")
        return EXIT_PAUSED
    acc = r.get("holdout_acc")
    acc_txt = "n/a" if acc is None else f"{acc:.4f}"
    print(f"learned {r['task']!r} ({r['method']}) into {r['bundle']} as version(s) "
          f"{', '.join(map(str, r['versions']))}: held-out acc {acc_txt} on {r['n_holdout']} samples; "
          f"{common}; old tasks byte-identical on {r['canaries_checked']} canary outputs")
    for name, shared in r.get("overlaps", {}).items():
        print(f"note: classes {shared} are also task {name!r}'s")
    if r.get("duplicates"):
        print(f"note: learned with --force although task(s) {r['duplicates']} have the same classes")
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from edgecl.runtime.errors import EdgeclError

    ap = argparse.ArgumentParser(prog="edgecl learn")
    add_arguments(ap)
    try:
        sys.exit(main(ap.parse_args()))
    except EdgeclError as e:
        print(f"edgecl learn: error: {e}", file=sys.stderr)
        sys.exit(2)
