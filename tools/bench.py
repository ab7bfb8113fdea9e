"""``edgecl bench``: backends side by side on one bundle, in one run.

Per backend and batch size: latency p50/p99 (of ``run_checked``: the backend's own
work, input validation excluded, the same for all), throughput, cold load (open the
bundle + backend + first task, in a fresh process), task-switch time (activate another
task: materialize ``W ⊙ M`` and whatever the backend does with it; also per million
weights) and the peak RSS of a separate process that loads the model and runs it.
``torch`` is PyTorch eager on the same materialized weights (host only).

    edgecl bench BUNDLE_DIR [--backends numpy,tvm,onnxruntime,tflite,torch]
                 [--batch 1,32] [--json OUT] [--plot OUT.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_BACKENDS = "numpy,tvm,onnxruntime,tflite,torch"

# Runs in a fresh process: cold load, then the measurement; prints one JSON line.
_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
bundle_dir, backend, batches, iters = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
from edgecl.tools.bench import _open
be = _open(bundle_dir, backend)
tasks = be.bundle.task_names
be.activate(tasks[0])
import numpy as np
shape = tuple(be.bundle.model["input_shape"])
x1 = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
be.run_checked(x1)
cold = time.perf_counter() - t0
from edgecl.tools.bench import _measure
rows = [_measure(be, b, iters) for b in batches]
from edgecl.tools.bench import _switch
switch = _switch(be)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("BENCH " + json.dumps({"cold_load_s": cold, "rows": rows, "task_switch_s": switch,
                              "peak_rss_bytes": rss}))
"""


class TorchBackend:
    """PyTorch eager on the task's materialized weights (a bench peer, host only)."""

    name = "torch"

    def __init__(self, bundle_dir: str) -> None:
        import torch

        from edgecl.runtime.session import Runtime

        torch.set_num_threads(1)
        self.torch = torch
        self.runtime = Runtime(bundle_dir)
        self.bundle = self.runtime.bundle
        self.task = None

    def activate(self, task) -> None:
        torch = self.torch
        a = self.runtime.activate(task)
        self.task = a.info
        mods = []
        for layer in self.bundle.model["layers"]:
            op = layer["op"]
            if op in ("linear", "conv2d"):
                w, b = a.params[layer["name"]]
                if op == "linear":
                    m = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                else:
                    m = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], int(layer.get("stride", 1)),
                                        int(layer.get("padding", 0)), bias=b is not None)
                with torch.no_grad():
                    m.weight.copy_(torch.from_numpy(np.array(w)))
                    if b is not None:
                        m.bias.copy_(torch.from_numpy(np.array(b)))
                mods.append(m)
            elif op == "relu":
                mods.append(torch.nn.ReLU())
            elif op == "maxpool2d":
                mods.append(torch.nn.MaxPool2d(int(layer["kernel_size"])))
            elif op == "flatten":
                mods.append(torch.nn.Flatten())
        hw, hb = a.head
        head = torch.nn.Linear(hw.shape[1], hw.shape[0])
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(np.array(hw)))
            head.bias.copy_(torch.from_numpy(np.array(hb)))
        self.model = torch.nn.Sequential(*mods, head).eval()

    def run_checked(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(x)).numpy()

    def logits(self, x, task=None):
        if task is not None:
            self.activate(task)
        return self.run_checked(np.ascontiguousarray(x, dtype=np.float32))


def _open(bundle_dir: str, backend: str):
    if backend == "torch":
        return TorchBackend(bundle_dir)
    from edgecl.runtime.backends import open_backend

    return open_backend(bundle_dir, backend)


def _measure(be, batch: int, iters: int) -> dict:
    shape = tuple(be.bundle.model["input_shape"])
    x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
    n = max(20, iters // batch)
    for _ in range(max(5, n // 10)):
        be.run_checked(x)
    times = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        be.run_checked(x)
        times[i] = time.perf_counter() - t
    p50 = float(np.percentile(times, 50))
    return {"batch": batch, "p50_s": p50, "p99_s": float(np.percentile(times, 99)),
            "throughput_per_s": batch / float(times.mean()), "iters": n}


def _switch(be, rounds: int = 10) -> float:
    """Median seconds to activate another task (its W ⊙ M not cached)."""
    tasks = be.bundle.task_names
    if len(tasks) < 2:
        return float("nan")
    rt = be.runtime
    times = []
    for i in range(rounds):
        rt._cache.clear()  # measure the real materialization, not the LRU cache
        t = time.perf_counter()
        be.activate(tasks[(i + 1) % len(tasks)] if i % 2 == 0 else tasks[0])
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench_backend(bundle_dir: str, backend: str, batches: list[int], iters: int = 20000) -> dict:
    """Measure one backend in a fresh process (cold load and peak RSS are its own)."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(bundle_dir), backend, json.dumps(batches),
                        str(iters)], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": err}
    return json.loads(line[6:])


def run_bench(bundle_dir, backends=None, batches=(1, 32), json_path=None, plot_path=None,
              iters: int = 20000, log=print) -> list[dict]:
    from edgecl.runtime.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    n_weights = int(bundle.model["n_weights"])
    backends = list(backends or DEFAULT_BACKENDS.split(","))
    rows, skipped = [], {}
    for name in backends:
        res = bench_backend(str(bundle_dir), name, list(batches), iters)
        if "error" in res:
            skipped[name] = res["error"]
            log(f"{name}: skipped ({res['error']})")
            continue
        for r in res["rows"]:
            rows.append({"backend": name, **r, "cold_load_s": res["cold_load_s"],
                         "task_switch_s": res["task_switch_s"],
                         "task_switch_us_per_mweight": res["task_switch_s"] * 1e6 / (n_weights / 1e6),
                         "peak_rss_bytes": res["peak_rss_bytes"]})
    router = router_times(bundle, list(batches), iters)
    for r in rows:
        if router is not None:
            r["router"], r["router_s"] = router["name"], router["s"][r["batch"]]
            r["router_share"] = r["router_s"] / r["p50_s"]
    log(table(rows))
    if router is not None:
        log(f"router {router['name']}: " + ", ".join(
            f"{router['s'][b] * 1e6:.1f} us at batch {b}" for b in batches)
            + " (numpy; 'router %' = its time as a share of that backend's inference)")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    if plot_path and rows:
        plot(rows, plot_path, title=f"{bundle.model.get('arch')} ({Path(bundle_dir).name})")
    return rows


def router_times(bundle, batches: list[int], iters: int) -> dict | None:
    """Median time of the bundle's default router deciding a batch (None: no router)."""
    from edgecl.runtime.routers.store import load_router
    from edgecl.runtime.session import Runtime

    if not bundle.manifest.get("default_router"):
        return None
    rt = Runtime(bundle)
    router = load_router(bundle)
    shape = tuple(bundle.model["input_shape"])
    out = {}
    for b in batches:
        x = np.random.default_rng(1).random((b, *shape), dtype=np.float32)
        n = max(20, iters // b)
        router.decide(rt, x)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            router.decide(rt, x)
            times.append(time.perf_counter() - t)
        out[b] = float(np.median(times))
    return {"name": router.name, "s": out}


def table(rows: list[dict]) -> str:
    ref = {r["batch"]: r for r in rows if r["backend"] == "onnxruntime"}
    head = (f"{'backend':>12} {'batch':>5} {'p50 us':>9} {'p99 us':>9} {'x ORT p50':>9} "
            f"{'samples/s':>11} {'cold ms':>8} {'switch us':>10} {'us/Mweight':>10} {'RSS MiB':>8} "
            f"{'router %':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        base = ref.get(r["batch"])
        ratio = f"{r['p50_s'] / base['p50_s']:.2f}" if base else "-"
        lines.append(f"{r['backend']:>12} {r['batch']:>5} {r['p50_s'] * 1e6:>9.1f} {r['p99_s'] * 1e6:>9.1f} "
                     f"{ratio:>9} {r['throughput_per_s']:>11,.0f} {r['cold_load_s'] * 1e3:>8.0f} "
                     f"{r['task_switch_s'] * 1e6:>10.0f} {r['task_switch_us_per_mweight']:>10.0f} "
                     f"{r['peak_rss_bytes'] / 2**20:>8.0f} "
                     f"{(str(round(100 * r['router_share'])) if 'router_share' in r else '-'):>8}")
    lines.append("x ORT p50: latency relative to onnxruntime at the same batch (lower is faster)")
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4 * (len(batches) + 1), 3.5))
    for ax, b in zip(axes, batches, strict=False):
        vals = [next((r["p50_s"] * 1e6 for r in rows if r["backend"] == n and r["batch"] == b), 0)
                for n in backends]
        ax.bar(backends, vals)
        ax.set_title(f"p50 latency, batch {b} (us)")
        ax.tick_params(axis="x", rotation=30)
    ax = axes[-1]
    vals = [next(r["task_switch_s"] * 1e6 for r in rows if r["backend"] == n) for n in backends]
    ax.bar(backends, vals)
    ax.set_title("task switch (us)")
    ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE_DIR")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS,
                        help=f"comma-separated (default {DEFAULT_BACKENDS}); unusable ones are skipped")
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--iters", type=int, default=20000, help="samples per measurement (default 20000)")
    parser.add_argument("--json", metavar="OUT", help="write the rows as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="write a comparison plot")


def main(args: argparse.Namespace) -> int:
    batches = [int(b) for b in str(args.batch).split(",") if b]
    backends = [b.strip() for b in str(args.backends).split(",") if b.strip()]
    rows = run_bench(args.bundle, backends, batches, args.json, args.plot, iters=args.iters)
    return 0 if rows else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="edgecl bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
