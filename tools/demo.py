"""The end-to-end demo: every method on Split-Digits, bundled, evaluated on the runtime."""

from __future__ import annotations

from pathlib import Path

from . import tables
from .bench_methods import HEADERS, measure_method, row


def run_demo(out: Path, methods: list[str], seed: int = 0) -> int:
    summary = []
    for method in methods:
        print(f"\n=== {method}: train on the host (PyTorch), bundle, evaluate through the device runtime ===")
        m = measure_method(method, out, seed=seed)
        r = m["eval"]
        print(f"--- {method}: bundled to {m['bundle']} ---")
        print(tables.acc_matrix(r["tasks"], r["acc_matrix"]))
        print(f"ACC {r['acc']:.4f}  BWT {r['bwt']:+.4f}  FWT {r['fwt']:+.4f}")
        summary.append(row(m))
    print("\n=== Split-Digits, default MLP 64-256-256, seed", seed, "(runtime = numpy executor) ===")
    print(tables.render(HEADERS, summary))
    return 0
