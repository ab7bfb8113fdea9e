"""Smoke inference on the device: the bundle verifies, and every task on every requested
backend reproduces the bundle's golden outputs (numpy reference, made on the host) to 1e-4.

    python -m edgecl.device_tests.smoke --bundle B [--target rpi4] [--backends numpy,tvm,onnxruntime]
                                        [--json OUT]

Exit 0 when all pass, 1 otherwise; the JSON report names each failure. Used by
``edgecl deploy`` before it switches ``current`` to a new release, and by the device tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

TOLERANCE = 1e-4
ALL_BACKENDS = ("numpy", "tvm", "onnxruntime", "tflite")


def check_backend(bundle, name: str, target: str | None, x: np.ndarray, golden: dict) -> dict:
    """Max |logits - golden| per task for one backend; ``error`` when it cannot run."""
    from edgecl.runtime import Session

    t0 = time.perf_counter()
    try:
        opts = {"tvm": {"target": target}} if name == "tvm" and target else {}
        be = Session(bundle, providers=[name], provider_options=opts)
        errs = {}
        for task, ref in golden.items():
            out = np.asarray(be.logits(x, task), dtype=np.float32)
            if out.shape != ref.shape:
                errs[task] = float("inf")
                continue
            errs[task] = float(np.max(np.abs(out - ref))) if ref.size else 0.0
    except Exception as e:  # reported, never raised: the report names the backend and why
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    worst = max(errs.values()) if errs else 0.0
    return {"ok": bool(worst <= TOLERANCE), "max_abs_err": worst, "per_task": errs,
            "seconds": time.perf_counter() - t0}


def run(bundle_dir: str, backends: list[str], target: str | None = None) -> dict:
    from edgecl.compiler.golden import load_golden
    from edgecl.runtime import profiles
    from edgecl.runtime.bundle import Bundle

    facts = profiles.detect()
    report: dict = {"bundle": bundle_dir, "device": facts, "emulated": facts["emulated"],
                    "profile": target or profiles.identify(facts), "tolerance": TOLERANCE}
    try:
        bundle = Bundle.open(bundle_dir)  # every sha256 is checked here
    except Exception as e:
        report.update(ok=False, error=f"the bundle does not verify: {e}")
        return report
    report.update(bundle_version=bundle.version, tasks=bundle.task_names)
    try:
        x, golden = load_golden(bundle)
    except KeyError as e:
        report.update(ok=False, error=str(e.args[0]))
        return report
    missing = [t for t in bundle.task_names if t not in golden]
    if missing:
        report.update(ok=False, error=f"golden outputs lack task(s) {missing}: run ensure_golden on the host")
        return report
    prof_target = None
    if target:
        from edgecl.runtime.profiles import get

        prof_target = get(target).tvm_target
    report["backends"] = {b: check_backend(bundle, b, prof_target, x, golden) for b in backends}
    report["ok"] = all(r["ok"] for r in report["backends"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgecl.device_tests.smoke",
                                description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--target", help="target profile (picks the TVM library)")
    p.add_argument("--backends", default="numpy")
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    report = run(a.bundle, [b for b in a.backends.split(",") if b], a.target)
    text = json.dumps(report, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    for name, r in report.get("backends", {}).items():
        state = f"max |err| {r['max_abs_err']:.2e}" if "max_abs_err" in r else r.get("error")
        print(f"smoke: {name}: {'ok' if r['ok'] else 'FAILED'} ({state})", file=sys.stderr)
    if not report["ok"]:
        print(f"smoke: FAILED: {report.get('error') or 'a backend does not match the golden outputs'}",
              file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
