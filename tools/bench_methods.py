"""``edgecl bench methods``: every method on one stream, one seed, one run.

Per method: train on the host (timed), write the bundle, and measure through the device
runtime: ACC, BWT, FWT, storage (mask bits per backbone weight per task, bytes per task
file), the default router's task-ID accuracy, batch-1 inference latency per task (numpy
provider: what serves an uncompiled bundle on a device) and, for each N, what a device
holds to serve N tasks: the files of version N (flash) and the resident memory of a
process that served each of its N tasks once (RAM, measured in a child). The demo uses
:func:`measure_method` too, so the two print the same figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import tables

MiB = 1 << 20

# A child that opens the bundle at version N, serves each task once and prints its RSS
# growth over the imports (VmRSS: what stays resident, mmap'd backbone pages included).
_RAM_CHILD = r"""
import json, sys
import numpy as np
from edgecl.runtime import Runtime
from edgecl.runtime.bundle import Bundle

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

before = rss()
rt = Runtime(Bundle.open(sys.argv[1], version=int(sys.argv[2])))
x = np.zeros((1, *rt.input_shape), dtype=np.float32)
for t in range(len(rt.bundle.task_names)):
    rt.logits(x, t)
print(json.dumps({"rss_bytes": rss() - before}))
"""


def flash_bytes(bundle) -> int:
    """Bytes of the files one version needs: its backbones and its task files."""
    m = bundle.manifest
    files = [b["file"] for b in m["backbones"].values()] + [t["file"] for t in m["tasks"]]
    return int(sum(bundle.store.size(f) or 0 for f in files))


def ram_bytes(bundle_dir: Path, version: int) -> int:
    r = subprocess.run([sys.executable, "-c", _RAM_CHILD, str(bundle_dir), str(version)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"RAM child for {bundle_dir} v{version} failed: {r.stderr.strip()[-400:]}")
    return int(json.loads(r.stdout.strip().splitlines()[-1])["rss_bytes"])


def latency_us(bundle_dir: Path, x: np.ndarray, runs: int = 200) -> float:
    """Median batch-1 inference over every task, in microseconds (numpy provider)."""
    from edgecl.runtime import Session

    s = Session(bundle_dir, providers=["numpy"])
    xb = np.ascontiguousarray(x[:1], dtype=np.float32).reshape(1, *s.input_shape)
    times = []
    for t in s.tasks:
        s.logits(xb, t)  # activation outside the timing
        for _ in range(runs // len(s.tasks) + 1):
            t0 = time.perf_counter()
            s.logits(xb, t)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def measure_method(method: str, out: Path, *, data: str = "split-digits", seed: int = 0, arch: str = "mlp",
                   log=print) -> dict:
    """Train ``method`` on ``data``, bundle it under ``out`` and measure it (module docstring)."""
    from edgecl.compiler.from_run import bundle_run
    from edgecl.models.data import load_spec
    from edgecl.models.training import load_run, train
    from edgecl.runtime.bundle import Bundle
    from edgecl.runtime.evaluate import evaluate
    from edgecl.runtime.evaluate_routing import evaluate_routing

    run_dir, bundle_dir = out / "runs" / method, out / "bundles" / method
    for d in (run_dir, bundle_dir):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    train(data, method, run_dir, seed=seed, arch=arch, log=log)
    train_s = time.perf_counter() - t0
    bundle_run(run_dir, bundle_dir)
    stream = load_spec(load_run(run_dir).config["stream"])
    test = [(t.name, t.x_test, t.y_test) for t in stream.tasks]
    r = evaluate(bundle_dir, test)
    routing = evaluate_routing(bundle_dir, test, timing=False)
    final = Bundle.open(bundle_dir)
    versions = [v for v in final.versions() if v >= 1]
    per_n = []  # the versions that hold 1, 2, ... tasks (the first version of each count)
    for v in versions:
        b = Bundle.open(bundle_dir, version=v)
        n = len(b.task_names)
        if n and (not per_n or per_n[-1]["tasks"] < n):
            per_n.append({"tasks": n, "version": v, "flash_bytes": flash_bytes(b),
                          "ram_bytes": ram_bytes(bundle_dir, v)})
    bpw = r["bits_per_weight_per_task"]
    return {"method": method, "arch": arch, "data": data, "seed": seed, "eval": r,
            "acc": r["acc"], "bwt": r["bwt"], "fwt": r["fwt"],
            "bits_per_weight_per_task": float(np.mean(bpw)),
            "task_bytes": float(np.mean([p["bytes"] for p in r["per_task"]])),
            "train_s": train_s, "latency_us_b1": latency_us(bundle_dir, stream.tasks[0].x_test),
            "router": routing["default_router"], "task_id_acc": routing["task_id_acc"],
            "per_n_tasks": per_n, "bundle": str(bundle_dir)}


HEADERS = ["method", "ACC", "BWT", "FWT", "mask bits/weight/task", "bytes/task", "train s",
           "infer b1 µs", "task-ID acc", "flash @N", "RAM @N MiB"]


def row(m: dict) -> list:
    def signed(v):
        return None if v is None else f"{v:+.4f}"

    last = m["per_n_tasks"][-1] if m["per_n_tasks"] else {}
    return [m["method"], f"{m['acc']:.4f}", signed(m["bwt"]), signed(m["fwt"]),
            f"{m['bits_per_weight_per_task']:.4f}", f"{m['task_bytes']:,.0f}", f"{m['train_s']:.1f}",
            f"{m['latency_us_b1']:.1f}", f"{m['task_id_acc']:.3f}",
            f"{last.get('flash_bytes', 0):,}", f"{last.get('ram_bytes', 0) / MiB:.1f}"]


def plot_growth(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colors: one per method
    for i, m in enumerate(results):
        n = [p["tasks"] for p in m["per_n_tasks"]]
        ax.plot(n, [p["flash_bytes"] / 1024 for p in m["per_n_tasks"]], marker="osD^v<>"[i % 7],
                color=colors[(2 * i) % 20 + (2 * i) // 20 % 2], label=m["method"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks held")
    ax.set_ylabel("bundle files of that version (KiB)")
    ax.set_title("what a device stores to serve N tasks")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    from edgecl.models.methods import METHODS
    from edgecl.runtime.errors import EdgeclError

    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise EdgeclError(f"edgecl bench methods: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    out = Path(args.workdir)
    results = []
    for name in names:
        print(f"=== {name}: train, bundle, measure ({args.data}, {args.arch}, seed {args.seed}) ===",
              flush=True)
        results.append(measure_method(name, out, data=args.data, seed=args.seed, arch=args.arch,
                                      log=lambda _m: None))
        print(tables.render(HEADERS, [row(results[-1])]), flush=True)
    print(f"\n=== all methods: {args.data}, {args.arch}, seed {args.seed}, one run; "
          "numpy provider, batch 1; N = every task ===")
    print(tables.render(HEADERS, [row(m) for m in results]))
    if args.json:
        slim = [{k: v for k, v in m.items() if k != "eval"} | {"acc_matrix": m["eval"]["acc_matrix"]}
                for m in results]
        Path(args.json).write_text(json.dumps(slim, indent=1))
    if args.plot:
        plot_growth(results, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


def add_arguments(k: argparse.ArgumentParser) -> None:
    """Options of ``edgecl bench methods`` (on the shared ``bench`` parser)."""
    g = k.add_argument_group("edgecl bench methods")
    g.add_argument("--methods", default="all", help="comma-separated method names, or all (default)")
    g.add_argument("--data", default="split-digits",
                   help="the task stream (split-digits, permuted-digits, .npz)")
    g.add_argument("--arch", default="mlp", help="mlp, cnn or a zoo model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workdir", default="bench-methods", help="methods: where runs and bundles go")
