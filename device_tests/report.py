"""Latency / memory report on the device (``edgecl bench`` there), as JSON for the host.

    python -m edgecl.device_tests.report --bundle B [--backends numpy,tvm] [--iters 2000] --json OUT

The report holds the device's facts and profile and ``"emulated": true`` when the device
is the qemu emulator: its timings are then only a record, never a figure to compare.
"""

from __future__ import annotations

import argparse
import json
import sys


def run(bundle_dir: str, backends: list[str], iters: int, batches=(1, 32)) -> dict:
    from edgecl.runtime import profiles
    from edgecl.tools.bench import run_bench

    facts = profiles.detect()
    lines: list[str] = []
    rows = run_bench(bundle_dir, backends, list(batches), iters=iters, log=lines.append)
    try:
        from edgecl.kernels import status as kernels_status

        kernels = kernels_status()
    except Exception as e:  # the report still comes back
        kernels = f"unknown ({e})"
    out = {"emulated": facts["emulated"], "device": facts, "profile": profiles.identify(facts),
           "kernels": kernels, "iters": iters, "rows": rows, "log": lines}
    if facts["emulated"]:
        out["note"] = "emulated device (qemu user mode): timings are not comparable with real hardware"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgecl.device_tests.report",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--backends", default="numpy,tvm,onnxruntime,tflite")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    report = run(a.bundle, [b for b in a.backends.split(",") if b], a.iters)
    with open(a.json, "w") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    print("\n".join(report["log"]))
    return 0 if report["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
