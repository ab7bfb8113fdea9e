"""``edgecl bench learn``: the device learner against PyTorch eager autograd, one run.

The same masked update on the same model (default MLP 64-256-256, a 10-class head,
batch 32): forward, cross-entropy, backward, then a masked Adam step —

* ``packnet``: Adam on the free weights only (half the weights owned by earlier tasks,
  left byte-identical), plus the head;
* ``supsup``: Adam on every score (straight-through over a top-50 % supermask of a frozen
  backbone), plus the head.

``device`` is :func:`edgecl.runtime.learn.trainer.numpy_step` (numpy forward/backward,
the C kernels' ``masked_adam_`` / ``materialize_bits``; SupSup's exact per-layer top-k
recomputed every step, found incrementally by ``trainer.TopK``), imported without torch.
``torch`` is PyTorch eager: autograd, ``torch.optim.Adam``, frozen gradients zeroed and
owned weights written back after the step (as the host's PackNet does), or the
straight-through supermask with a ``torch.topk`` per layer every step (as the host's
SupSup). Each runs in its own fresh process;
both sides get the same BLAS/OpenMP thread count (default 1, the learner child's); step
time is the median of ``steps`` timed steps after warm-up; peak RSS is the
process's ``VmHWM`` (imports included: what a device would have to hold).

    edgecl bench learn [--json OUT] [--steps N]
    python -m edgecl.tools.bench_learn [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HIDDEN = (256, 256)
BATCH = 32
CLASSES = 10

_DEVICE = r"""
import json, sys, time
import numpy as np
from edgecl.runtime.learn import trainer
from edgecl.runtime.learn.progress import peak_rss_bytes
from edgecl.runtime.masks import pack_bits
method, steps, hidden = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
batch, classes = int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
layers, prev = [{"op": "flatten"}], 64
for i, w in enumerate(hidden, 1):
    layers += [{"op": "linear", "name": f"fc{i}", "in_features": prev, "out_features": w,
                "bias": method == "packnet"}, {"op": "relu"}]
    prev = w
model = {"layers": layers, "input_shape": [64], "feature_dim": prev}
backbone, old = {}, {}
for l in layers:
    if l["op"] == "linear":
        shape = (l["out_features"], l["in_features"])
        w0 = rng.standard_normal(shape) * (2 / shape[1]) ** 0.5
        backbone[l["name"] + ".weight"] = w0.astype(np.float32)
        if l["bias"]:
            backbone[l["name"] + ".bias"] = np.zeros(shape[0], np.float32)
        old["mask." + l["name"]] = pack_bits(rng.random(shape) < 0.5)
x = rng.random((1024, 64), dtype=np.float32)
y = rng.integers(0, classes, 1024)
hp = {"lr": 1e-3, "density": 0.5, "epochs": 1, "retrain_epochs": 1, "prune": 0.5}
olds = [old] if method == "packnet" else []
p = trainer.Problem(model, backbone, olds, x, y, classes, method, hp, batch, 0)
s = p.initial()
idx = [rng.integers(0, 1024, batch) for _ in range(steps + 10)]
for i in range(10):
    trainer.numpy_step(p, s, idx[i])
times = []
for i in range(steps):
    t = time.perf_counter(); trainer.numpy_step(p, s, idx[10 + i]); times.append(time.perf_counter() - t)
assert "torch" not in sys.modules
print("BENCH " + json.dumps({"step_s": float(np.median(times)), "peak_rss_bytes": peak_rss_bytes()}))
"""

_TORCH = r"""
import json, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from edgecl.runtime.learn.progress import peak_rss_bytes
method, steps, hidden = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
batch, classes = int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
dims = [64, *hidden]
ws, bs, frozen = [], [], []
for a, b in zip(dims[:-1], dims[1:]):
    w0 = (rng.standard_normal((b, a)) * (2 / a) ** 0.5).astype(np.float32)
    ws.append(torch.tensor(w0, requires_grad=method == "packnet"))
    bs.append(torch.zeros(b) if method == "packnet" else None)
    frozen.append(torch.from_numpy(rng.random((b, a)) < 0.5))
hw = torch.zeros(classes, dims[-1], requires_grad=True)
hb = torch.zeros(classes, requires_grad=True)
x = torch.from_numpy(rng.random((1024, 64), dtype=np.float32))
y = torch.from_numpy(rng.integers(0, classes, 1024))
idx = [torch.from_numpy(rng.integers(0, 1024, batch)) for _ in range(steps + 10)]

class ST(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, m):
        return m
    @staticmethod
    def backward(ctx, g):
        return g, None

if method == "packnet":
    opt = torch.optim.Adam([*ws, hw, hb], lr=1e-3)
    old = [w.detach().clone() for w in ws]
    def step(i):
        h = x[i]
        for w, b in zip(ws, bs):
            h = F.relu(F.linear(h, w, b))
        loss = F.cross_entropy(F.linear(h, hw, hb), y[i])
        opt.zero_grad(); loss.backward()
        for w, f in zip(ws, frozen):
            w.grad[f] = 0
        opt.step()
        with torch.no_grad():
            for w, f, o in zip(ws, frozen, old):
                w.copy_(torch.where(f, o, w))
else:
    scores = [torch.empty_like(w).uniform_(-0.1, 0.1).requires_grad_(True) for w in ws]
    opt = torch.optim.Adam([*scores, hw, hb], lr=1e-3)
    def step(i):
        h = x[i]
        for w, s in zip(ws, scores):
            k = int(round(s.numel() * 0.5))
            m = torch.zeros(s.numel(), dtype=torch.bool)
            m[torch.topk(s.detach().reshape(-1), k, sorted=False).indices] = True
            h = F.relu(F.linear(h, w * ST.apply(s, m.view(s.shape).float())))
        loss = F.cross_entropy(F.linear(h, hw, hb), y[i])
        opt.zero_grad(); loss.backward(); opt.step()
for i in range(10):
    step(idx[i])
times = []
for i in range(steps):
    t = time.perf_counter(); step(idx[10 + i]); times.append(time.perf_counter() - t)
print("BENCH " + json.dumps({"step_s": float(np.median(times)), "peak_rss_bytes": peak_rss_bytes(),
                             "threads": torch.get_num_threads()}))
"""


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _child(code: str, method: str, steps: int, threads: int) -> dict:
    env = dict(os.environ, **{v: str(threads) for v in THREAD_VARS})  # the same for both sides
    r = subprocess.run([sys.executable, "-c", code, method, str(steps), json.dumps(list(HIDDEN)),
                        str(BATCH), str(CLASSES)], capture_output=True, text=True, env=env,
                       timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"bench child failed ({r.returncode}): {r.stderr.strip()[-800:]}")


def run_learn_bench(json_path: str | Path | None = None, steps: int = 200,
                    methods: tuple[str, ...] = ("packnet", "supsup"), threads: int = 1,
                    echo: bool = True) -> list[dict]:
    """Device learner vs PyTorch eager per method: step time and peak RSS, as ratios."""
    from edgecl import kernels

    rows = []
    for method in methods:
        dev = _child(_DEVICE, method, steps, threads)
        ref = _child(_TORCH, method, steps, threads)
        rows.append({"method": method, "model": f"mlp 64-{'-'.join(map(str, HIDDEN))}", "batch": BATCH,
                     "steps_timed": steps,
                     "device_step_ms": dev["step_s"] * 1e3, "torch_step_ms": ref["step_s"] * 1e3,
                     "speedup": ref["step_s"] / dev["step_s"],
                     "device_peak_rss_mib": dev["peak_rss_bytes"] / 2**20,
                     "torch_peak_rss_mib": ref["peak_rss_bytes"] / 2**20,
                     "rss_ratio": dev["peak_rss_bytes"] / ref["peak_rss_bytes"],
                     "threads": threads, "torch_threads": ref.get("threads")})
    if echo:
        from .tables import render

        print(render(["method", "device step", "torch step", "speedup", "device peak RSS",
                      "torch peak RSS", "RSS ratio"],
                     [[r["method"], f"{r['device_step_ms']:.3f} ms", f"{r['torch_step_ms']:.3f} ms",
                       f"{r['speedup']:.2f}x", f"{r['device_peak_rss_mib']:.1f} MiB",
                       f"{r['torch_peak_rss_mib']:.1f} MiB", f"{r['rss_ratio']:.2f}"] for r in rows]))
        print(f"(MLP 64-{'-'.join(map(str, HIDDEN))}, batch {BATCH}, median of {steps} steps; "
              f"{threads} thread(s) each; kernels: {kernels.status()}; "
              f"targets: >= 2x faster, <= 1/3 of torch's RSS)")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="write the rows as JSON")
    p.add_argument("--steps", type=int, default=200, help="timed steps per side (default 200)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS/OpenMP threads for both sides (default 1, as the learner's child)")


def main(args: argparse.Namespace) -> int:
    run_learn_bench(args.json, steps=args.steps, threads=args.threads)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="edgecl bench learn", description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
