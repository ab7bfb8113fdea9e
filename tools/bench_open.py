"""``edgecl bench open``: opening a bundle cold, directory form against the one-file form.

For a zoo model (default: the largest, MiniLM), a bundle of two weight-bit tasks on its
real weights is written once (cached), then packed. Each form is opened in a fresh
process after its files are evicted from the page cache (``posix_fadvise(DONTNEED)``),
and the process reports: the time to open with every hash checked, the time to open
without (what a trusted reopen costs), the time of the first inference (activate a task,
one input), and its RSS after each step. Masks are random: no accuracy is claimed, this
measures storage and I/O only.

    edgecl bench open [--zoo minilm] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import tables

_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np
from edgecl.runtime import Bundle, Runtime
from edgecl.runtime.learn.progress import peak_rss_bytes

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
imported, rss0 = time.perf_counter(), rss()
b = Bundle.open(sys.argv[1], verify=sys.argv[2] == "verify", trust=None)
opened, rss1 = time.perf_counter(), rss()
rt = Runtime(b)
x = np.load(sys.argv[3])
rt.logits(x, 0)
first, rss2 = time.perf_counter(), rss()
print(json.dumps({"open_s": opened - imported, "first_logits_s": first - opened,
                  "rss_imported": rss0, "rss_open": rss1, "rss_first": rss2, "peak_rss": peak_rss_bytes()}))
"""


def _evict(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_bundle(zoo: str, root: Path) -> Path:
    """The zoo model's graph and real weights, two tasks of random weight bits and heads."""
    import numpy as np

    from edgecl.models.importer import import_model
    from edgecl.runtime.bundle_write import Transaction
    from edgecl.runtime.graph import model_entry
    from edgecl.runtime.kinds import get_kind
    from edgecl.runtime.samples import canary

    bundle = root / "bundle"
    if (bundle / "manifest.json").exists():
        return bundle
    graph, weights = import_model(zoo)
    rng = np.random.default_rng(0)
    with Transaction(bundle, key=None, note="bench open") as tx:
        tx.add_graph("main", model_entry(graph, zoo))
        tx.add_backbone("main", weights)
        for t in range(2):
            parts = {f"mask.{s.node}": rng.random(s.shape) < 0.5 for s in graph.mask_sites()}
            parts |= {"head.weight": rng.standard_normal((4, graph.feature_dim)).astype(np.float32),
                      "head.bias": np.zeros(4, np.float32)}
            tx.add_task({"name": f"task-{t}", "kind": "weight_bits", "classes": [0, 1, 2, 3],
                         "n_classes": 4, "method": "random", "metrics": {}},
                        get_kind("weight_bits").encode(parts, graph))
    from edgecl.runtime import Bundle

    np.save(root / "x.npy", canary(Bundle.open(bundle), 1, 0))
    return bundle


def run(zoo: str, repeat: int, work: Path) -> dict:
    from edgecl.runtime.packfile import pack

    work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(zoo, work)
    packed = work / "bundle.edgecl"
    if not packed.exists():
        pack(bundle, packed)
    rows = {}
    for form, path in (("directory", bundle), ("one file", packed)):
        for verify in ("verify", "no-verify"):
            runs = []
            for _ in range(repeat):
                _evict(path)
                r = subprocess.run([sys.executable, "-c", _CHILD, str(path), verify, str(work / "x.npy")],
                                   capture_output=True, text=True, timeout=600)
                if r.returncode != 0:
                    raise RuntimeError(f"bench open child failed: {r.stderr[-800:]}")
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            best = min(runs, key=lambda d: d["open_s"] + d["first_logits_s"])
            rows[f"{form}, {verify}"] = best
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {"zoo": zoo, "repeat": repeat, "bundle_bytes": size, "packed_bytes": packed.stat().st_size,
            "rows": rows}


def render(result: dict) -> str:
    MiB = 1 << 20
    rows = [[name, f"{r['open_s'] * 1e3:.1f}", f"{r['first_logits_s'] * 1e3:.1f}",
             f"{(r['rss_open'] - r['rss_imported']) / MiB:.1f}",
             f"{(r['rss_first'] - r['rss_imported']) / MiB:.1f}", f"{r['peak_rss'] / MiB:.1f}"]
            for name, r in result["rows"].items()]
    head = (f"bench open: {result['zoo']}, bundle {result['bundle_bytes'] / MiB:.1f} MiB as a directory, "
            f"{result['packed_bytes'] / MiB:.1f} MiB packed; cold page cache, best of {result['repeat']}")
    return head + "\n" + tables.render(
        ["form", "open ms", "first logits ms", "RSS after open MiB", "RSS after first MiB", "peak RSS MiB"],
        rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo-model", default="minilm", help="bench open: the zoo model (default minilm)")
    p.add_argument("--repeat", type=int, default=3, help="bench open: runs per form (best reported)")


def main(args: argparse.Namespace) -> int:
    from edgecl.tools.deploy import cache_root

    t = time.perf_counter()
    result = run(args.zoo_model, args.repeat, cache_root() / "bench-open" / args.zoo_model)
    print(render(result))
    print(f"({time.perf_counter() - t:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
