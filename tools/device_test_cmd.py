"""``edgecl device-test``: run ``device_tests/`` on a deployed device and bring the results back.

    edgecl device-test --to ssh://pi@raspberrypi.local [--identity KEY] [--json OUT]
                       [--bench-iters 2000 | --no-bench] [--remote-dir edgecl]

Needs a device that ``edgecl deploy`` installed (``REMOTE/current``). Copies this host's
``device_tests/`` there (rsync), runs ``pytest device_tests --bundle current/bundle
--target T --backends B`` with the release's own virtualenv (T and B as deployed: every
backend that was installed must pass), then ``python -m edgecl.device_tests.report``
(``edgecl bench`` on the device). The JSON that comes back holds the test outcomes, the
device's facts and the bench rows, with ``"emulated": true`` when the device is the
emulator (its timings are a record, not a figure to compare).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from edgecl.runtime.errors import EdgeclError

from .deploy import DEFAULT_REMOTE_DIR, SEP, DeployError, Remote

_RUN = r"""
cd ~
R=%(dir)s; C="$R/current"
if [ ! -f "$C/release.json" ]; then echo "NOT-DEPLOYED"; exit 3; fi
R=$(cd "$R" && pwd); C="$R/current"; PYB="$C/venv/bin/python"
mkdir -p "$R/results"; rm -f "$R/results/junit.xml" "$R/results/report.json"
T=$("$PYB" -c 'import json,sys; print(json.load(open(sys.argv[1]))["target"])' "$C/release.json")
B=$("$PYB" -c 'import json,sys; print(",".join(json.load(open(sys.argv[1]))["backends"]))' "$C/release.json")
set +e
cd "$R"
"$PYB" -m pytest -p no:cacheprovider -q -rA "$R/device_tests" --bundle "$C/bundle" --target "$T" \
    --backends "$B" --junitxml "$R/results/junit.xml" %(pytest_args)s > "$R/results/pytest.txt" 2>&1
echo "$?" > "$R/results/pytest.rc"
if [ %(bench)s = 1 ]; then
  "$PYB" -m edgecl.device_tests.report --bundle "$C/bundle" --backends "$B" --iters %(iters)d \
      --json "$R/results/report.json" > "$R/results/bench.txt" 2>&1
fi
echo %(sep)s; cat "$C/release.json"
echo %(sep)s; cat "$R/results/pytest.rc"
echo %(sep)s; cat "$R/results/pytest.txt"
echo %(sep)s; cat "$R/results/junit.xml" 2>/dev/null
echo %(sep)s; cat "$R/results/report.json" 2>/dev/null || cat "$R/results/bench.txt" 2>/dev/null
exit 0
"""


def _outcomes(junit: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if not junit.strip():
        return out
    for case in ET.fromstring(junit).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        state = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                state = "failed" if child.tag == "failure" else "error"
                out[name + "#message"] = (child.get("message") or "")[:500]
            elif child.tag == "skipped":
                state = "skipped"
                out[name + "#message"] = (child.get("message") or "")[:500]
        out[name] = state
    return out


def device_test(to: str, identity: str | None = None, *, remote_dir: str = DEFAULT_REMOTE_DIR,
                known_hosts: str | None = None, bench: bool = True, bench_iters: int = 2000,
                pytest_args: str = "", log=print) -> dict:
    t0 = time.monotonic()
    remote = Remote(to, identity, known_hosts)
    import edgecl.device_tests as dt

    src = Path(dt.__file__).resolve().parent
    log(f"device-test: copying {src} to {remote.where}:{remote_dir}/device_tests")
    remote.run(f"mkdir -p {shlex.quote(remote_dir)}", what="mkdir")
    remote.rsync(src, f"{remote_dir}/device_tests", excludes=["__pycache__", "*.pyc"])
    log("device-test: running the device tests" + (" and the bench" if bench else ""))
    r = remote.run("bash -s", input=_RUN % {"dir": shlex.quote(remote_dir), "sep": SEP, "bench": int(bench),
                                            "iters": int(bench_iters), "pytest_args": pytest_args},
                   check=False, what="the device tests", timeout=3600)
    if "NOT-DEPLOYED" in r.stdout:
        raise DeployError(f"{remote.where}: nothing is deployed in {remote_dir} (no current release): "
                          "run edgecl deploy first")
    parts = r.stdout.split(SEP + "\n")
    if r.returncode != 0 or len(parts) < 6:
        raise DeployError(f"{remote.where}: the device tests could not run (exit {r.returncode}): "
                          f"{(r.stderr or r.stdout)[-1500:]}")
    release_raw, rc, pytest_out, junit, bench_raw = (p.strip() for p in parts[1:6])
    release = json.loads(release_raw)
    try:
        bench_report = json.loads(bench_raw) if bench_raw else None
    except ValueError:
        bench_report = {"error": bench_raw[-2000:]}
    tests = _outcomes(junit)
    counts = {s: sum(1 for k, v in tests.items() if "#" not in k and v == s)
              for s in ("passed", "failed", "error", "skipped")}
    emulated = bool(release.get("emulated")) or bool(bench_report and bench_report.get("emulated"))
    report = {"url": to, "release": release["id"], "target": release["target"],
              "backends": release["backends"], "emulated": emulated,
              "ok": rc.strip() == "0", "pytest_exit": int(rc or 1), "counts": counts, "tests": tests,
              "pytest_output": pytest_out[-20000:], "bench": bench_report, "seconds": time.monotonic() - t0}
    log(pytest_out.splitlines()[-1] if pytest_out else "no pytest output")
    if bench_report and bench_report.get("log"):
        log("\n".join(bench_report["log"]))
    if report["emulated"]:
        log("device-test: the device is emulated (qemu): correctness counts, timings do not")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, metavar="ssh://USER@HOST[:PORT]", help="the device")
    parser.add_argument("--identity", metavar="KEY", help="ssh private key")
    parser.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR, help="install directory used by deploy")
    parser.add_argument("--known-hosts", help="known_hosts file (default $EDGECL_CACHE/known_hosts)")
    parser.add_argument("--json", metavar="OUT", help="write the results (tests, device, bench) here")
    parser.add_argument("--bench-iters", type=int, default=2000, help="samples per bench measurement")
    parser.add_argument("--no-bench", action="store_true", help="run the tests only")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (one shell-quoted string)")


def main(args: argparse.Namespace) -> int:
    report = device_test(args.to, args.identity, remote_dir=args.remote_dir, known_hosts=args.known_hosts,
                         bench=not args.no_bench, bench_iters=args.bench_iters, pytest_args=args.pytest_args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="edgecl device-test", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        sys.exit(main(p.parse_args()))
    except EdgeclError as e:
        print(f"edgecl device-test: error: {e}", file=sys.stderr)
        sys.exit(2)
