"""``edgecl bench daemon``: the daemon's API under load, idle and while learning runs.

    edgecl bench daemon [--daemon-bundle B] [--daemon-seconds 5] [--daemon-batch 1] [--json OUT]

A daemon is started on a temporary Unix socket over a copy of the bundle (default: a
4-task Split-Digits SupSup bundle, trained once into ``$EDGECL_CACHE/bench-daemon``). A
*separate client process* sends ``POST /infer`` (a named task, the batch as base64
float32, one keep-alive connection, one request at a time) for ``--daemon-seconds`` and
reports requests/s and p50/p99 latency:

- ``idle``: nothing else runs;
- ``learning``: a learning job of a new task (Split-Digits task 5, or random labelled
  inputs for another bundle; long enough to outlast the phase) runs in the daemon's
  worker process. Only requests answered while the job was running count.

It also times the same inference in process (``Session.logits``, same provider, same
batch), so the table shows what the API costs on top (HTTP over the socket, JSON,
base64, validation). Target (issue 12): p99 while learning <= 2x p99 idle.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MiB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--daemon-bundle", metavar="B",
                   help="bench daemon: the bundle to serve (default: 4 Split-Digits tasks, made once)")
    p.add_argument("--daemon-seconds", type=float, default=5.0,
                   help="bench daemon: seconds per phase (default 5)")
    p.add_argument("--daemon-batch", type=int, default=1, help="bench daemon: inputs per request (default 1)")
    p.add_argument("--daemon-provider", help="bench daemon: the backend (default: the session's fastest)")


# -- the client process ----------------------------------------------------------------------
def client_main(argv: list[str]) -> int:
    """``python -m edgecl.tools.bench_daemon --client SOCKET BODY_FILE SECONDS``: prints one
    JSON line: per request (start, seconds, status)."""
    from edgecl.runtime.daemon.client import Client

    sock, body_file, seconds = argv[0], argv[1], float(argv[2])
    body = Path(body_file).read_bytes()
    c = Client(sock, timeout=60)
    for _ in range(20):  # warm the connection and the daemon's paths
        c.request("POST", "/infer", body)
    out = []
    t_end = time.time() + seconds
    while True:
        t0 = time.time()
        if t0 >= t_end:
            break
        p0 = time.perf_counter()
        status, _ = c.request("POST", "/infer", body)
        out.append((t0, time.perf_counter() - p0, status))
    print(json.dumps(out))
    return 0


def _run_client(sock: Path, body: Path, seconds: float) -> list[tuple[float, float, int]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "edgecl.tools.bench_daemon", "--client", str(sock), str(body),
                        str(seconds)], capture_output=True, text=True, env=env, timeout=seconds + 120)
    if r.returncode != 0:
        raise RuntimeError(f"the bench client failed: {r.stderr[-2000:]}")
    return [tuple(row) for row in json.loads(r.stdout.strip().splitlines()[-1])]


def _stats(lat: list[float], wall: float) -> dict:
    a = np.asarray(lat) * 1e6
    return {"requests": len(a), "req_per_s": len(a) / wall if wall > 0 else 0.0,
            "p50_us": float(np.percentile(a, 50)) if len(a) else None,
            "p99_us": float(np.percentile(a, 99)) if len(a) else None,
            "max_us": float(a.max()) if len(a) else None}


# -- the bench -------------------------------------------------------------------------------
def default_bundle() -> Path:
    """A 4-task Split-Digits SupSup bundle (host: torch), made once into the cache."""
    from edgecl.tools.deploy import cache_root

    root = cache_root() / "bench-daemon"
    b4 = root / "bundle4"
    if (b4 / "manifest.json").is_file():
        return b4
    from edgecl.compiler.from_run import bundle_run
    from edgecl.models.training import train
    from edgecl.runtime.bundle_format import MANIFEST, VERSIONS_DIR
    from edgecl.runtime.bundle_write import gc

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print("bench daemon: training a Split-Digits SupSup bundle once (host)", flush=True)
    train("split-digits", "supsup", root / "run", seed=0, log=lambda _m: None)
    bundle_run(root / "run", root / "bundle5")
    tmp = root / "bundle4.tmp"
    shutil.copytree(root / "bundle5", tmp)
    (tmp / MANIFEST).write_bytes((tmp / VERSIONS_DIR / "000004.json").read_bytes())
    for p in (tmp / VERSIONS_DIR).glob("*.json"):
        if int(p.stem) > 4:
            p.unlink()
    gc(tmp, keep=4)
    tmp.rename(b4)
    return b4


def _new_task_samples(bundle, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Split-Digits task 5 when the bundle is Split-Digits' first tasks, else random inputs
    with two labels (enough to keep a learning job busy; its accuracy does not matter)."""
    if bundle.task_names[:1] == ["digits-0-1"] and int(np.prod(shape)) == 64:
        from edgecl.models.data import split_digits

        t = split_digits(0).tasks[4]
        return t.x_train.reshape(len(t.x_train), -1).astype(np.float32), np.asarray(t.classes)[t.y_train]
    rng = np.random.default_rng(0)
    x = rng.random((400, int(np.prod(shape))), dtype=np.float32)
    top = max(max(t["classes"]) for t in bundle.tasks) + 1
    return x, np.where(np.arange(400) % 2 == 0, top, top + 1)


def run(bundle_dir: Path, seconds: float, batch: int, provider: str | None) -> dict:
    from edgecl.runtime import Session
    from edgecl.runtime.bundle import Bundle
    from edgecl.runtime.daemon.client import Client

    src = Bundle.open(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="edgecl-bench-daemon-") as tmp:
        tmp = Path(tmp)
        bundle = tmp / "bundle"
        shutil.copytree(bundle_dir, bundle, ignore=shutil.ignore_patterns(".lock", ".learn"))
        ref = Session(bundle, providers=[provider] if provider else None)
        provider = ref.provider
        task = ref.tasks[0]
        x = np.random.default_rng(1).random((batch, *ref.input_shape), dtype=np.float32)
        # in process: the same inference without the API
        for _ in range(50):
            ref.logits(x, task)
        lat, t_end = [], time.perf_counter() + min(seconds, 3.0)
        while time.perf_counter() < t_end:
            p0 = time.perf_counter()
            ref.logits(x, task)
            lat.append(time.perf_counter() - p0)
        inproc = _stats(lat, sum(lat))
        cfg = {"server": {"providers": [provider], "max_batch": max(256, batch)},
               "policy": {"enabled": False, "check_interval_s": 0.2},
               "learn": {"epochs": 100000, "min_holdout_acc": 0.0, "timeout_s": 3600.0}}
        (tmp / "daemon.json").write_text(json.dumps(cfg))
        sock = tmp / "d.sock"
        log = open(tmp / "daemon.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "edgecl.runtime.daemon", str(bundle),
                                 "--socket", str(sock), "--config", str(tmp / "daemon.json"),
                                 "--state-dir", str(tmp / "state")], stdout=log, stderr=log)
        c = Client(str(sock), timeout=60)
        try:
            t0 = time.monotonic()
            while True:
                try:
                    if c.get("/readyz")[0] == 200:
                        break
                except OSError:
                    c.close()
                if proc.poll() is not None or time.monotonic() - t0 > 120:
                    why = (tmp / "daemon.log").read_text()[-2000:]
                    raise RuntimeError(f"the daemon did not start: {why}")
                time.sleep(0.05)
            body = tmp / "body.json"
            body.write_text(json.dumps({"b64": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape),
                                        "task": task}))
            idle_rows = _run_client(sock, body, seconds)
            idle = _stats([r[1] for r in idle_rows if r[2] == 200], seconds)

            xs, ys = _new_task_samples(src, ref.input_shape)
            for i in range(0, len(xs), 200):
                s, ans = c.post("/samples", {"task": "bench-new-task", "y": ys[i:i + 200].tolist(),
                                             "b64": base64.b64encode(xs[i:i + 200].tobytes()).decode(),
                                             "shape": list(xs[i:i + 200].shape)})
                if s != 200:
                    raise RuntimeError(f"storing the new task's samples failed: {s} {ans}")
            s, ans = c.post("/learn", {"task": "bench-new-task"})
            if s != 202:
                raise RuntimeError(f"POST /learn: {s} {ans}")
            t0 = time.monotonic()
            while c.get("/status")[1]["learning"] is None:  # the worker has started
                if time.monotonic() - t0 > 60:
                    raise RuntimeError("the learning job did not start")
                time.sleep(0.02)
            time.sleep(1.0)  # past the learner's start-up (baseline probe, canaries): into the steps
            learning_rows = _run_client(sock, body, seconds)
            st = c.get("/status")[1]
            still = st["learning"] is not None
            job = st["jobs"][0]
            during = [r for r in learning_rows if r[2] == 200]
            if not still:
                raise RuntimeError(f"the learning job ended before the phase did ({job['state']}: "
                                   f"{job.get('error')}); lower --daemon-seconds")
            learning = _stats([r[1] for r in during], seconds)
            progress = st["learning"].get("progress")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return {"bundle": str(bundle_dir), "provider": provider, "batch": batch, "task": task, "seconds": seconds,
            "in_process": inproc, "idle": idle, "learning": learning, "learning_progress": progress,
            "p99_ratio_learning_idle": learning["p99_us"] / idle["p99_us"],
            "api_overhead_p50_us": idle["p50_us"] - inproc["p50_us"],
            "api_overhead_ratio_p50": idle["p50_us"] / inproc["p50_us"],
            "cpus": os.cpu_count(), "load_avg": os.getloadavg()}


def render(r: dict) -> str:
    from .tables import render as table

    rows = []
    for name in ("in_process", "idle", "learning"):
        s = r[name]
        rows.append([name.replace("_", " "), f"{s['requests']:,}", f"{s['req_per_s']:,.0f}",
                     f"{s['p50_us']:.1f}", f"{s['p99_us']:.1f}", f"{s['max_us']:.1f}"])
    head = (f"bench daemon: {r['bundle']}, provider {r['provider']}, batch {r['batch']}, task {r['task']}, "
            f"{r['seconds']:g} s per phase, one client process over the Unix socket; {r['cpus']} CPUs, "
            f"load {r['load_avg'][0]:.2f}")
    tail = (f"p99 while learning / idle: {r['p99_ratio_learning_idle']:.2f}x (target <= 2x); API overhead "
            f"over in-process inference at p50: +{r['api_overhead_p50_us']:.0f} us "
            f"({r['api_overhead_ratio_p50']:.1f}x)")
    cols = ["phase", "requests", "req/s", "p50 us", "p99 us", "max us"]
    return head + "\n" + table(cols, rows) + "\n" + tail


def main(args: argparse.Namespace) -> int:
    bundle = Path(args.daemon_bundle) if getattr(args, "daemon_bundle", None) else default_bundle()
    r = run(bundle, args.daemon_seconds, args.daemon_batch, getattr(args, "daemon_provider", None))
    print(render(r))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        sys.exit(client_main(sys.argv[2:]))
    ap = argparse.ArgumentParser(prog="edgecl bench daemon", description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--json", metavar="OUT")
    sys.exit(main(ap.parse_args()))
