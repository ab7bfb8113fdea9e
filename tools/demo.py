"""The end-to-end demo: every method on Split-Digits, bundled, evaluated on the runtime."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import tables


def run_demo(out: Path, methods: list[str], seed: int = 0) -> int:
    from edgecl.compiler.from_run import bundle_run
    from edgecl.models.data import split_digits
    from edgecl.models.training import train
    from edgecl.runtime.evaluate import evaluate

    data = [(t.name, t.x_test, t.y_test) for t in split_digits(seed).tasks]
    summary = []
    for method in methods:
        run_dir, bundle_dir = out / "runs" / method, out / "bundles" / method
        for d in (run_dir, bundle_dir):
            shutil.rmtree(d, ignore_errors=True)
        print(f"\n=== {method}: train on the host (PyTorch) ===")
        t0 = time.perf_counter()
        train("split-digits", method, run_dir, seed=seed)
        train_s = time.perf_counter() - t0
        bundle_run(run_dir, bundle_dir)
        print(f"--- {method}: bundled to {bundle_dir}; evaluated through the device runtime ---")
        r = evaluate(bundle_dir, data)
        print(tables.acc_matrix(r["tasks"], r["acc_matrix"]))
        print(f"ACC {r['acc']:.4f}  BWT {r['bwt']:+.4f}  FWT {r['fwt']:+.4f}")
        bpw = r["bits_per_weight_per_task"]
        summary.append([method, f"{r['acc']:.4f}", f"{r['bwt']:+.4f}", f"{r['fwt']:+.4f}",
                        f"{max(bpw):.4f}", f"{sum(p['bytes'] for p in r['per_task']):,}",
                        f"{train_s:.1f}"])
    print("\n=== Split-Digits, default MLP 64-256-256, seed", seed, "(runtime = numpy executor) ===")
    print(tables.render(["method", "ACC", "BWT", "FWT", "mask bits/weight/task (max)",
                         "task files total (bytes)", "train s"], summary))
    return 0
