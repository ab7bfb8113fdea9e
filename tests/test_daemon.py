"""edgecl daemon (edgecl.runtime.daemon): end to end on a temporary Unix socket with a
4-task Split-Digits bundle (task 5 streamed in as samples, learned, committed, hot-swapped,
answered; old tasks' logits byte-identical throughout), the API's answers to bad input
(a hypothesis fuzz: never a 5xx), the store, the policy's sysfs readers, systemd's notify
protocol and unit (``systemd-analyze verify``), and deploy's unit rendering. The faults
(SIGKILLs, the RAM limit, a full disk) are in tests/test_daemon_faults.py."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_format import MANIFEST, VERSIONS_DIR
from edgecl.runtime.bundle_write import gc

from .device_process import _BLOCKER, run_on_device

ROOT = Path(__file__).resolve().parents[1]
NEW_TASK = "digits-8-9"
OLD_TASKS = ["digits-0-1", "digits-2-3", "digits-4-5", "digits-6-7"]


# -- helpers shared with test_daemon_faults.py ----------------------------------------------
def prefix_bundle(src: Path, dst: Path, n: int = 4) -> Path:
    """Version ``n`` of a trained bundle (its first n tasks and routers), made current."""
    shutil.copytree(src, dst)
    raw = (dst / VERSIONS_DIR / f"{n:06d}.json").read_bytes()
    (dst / MANIFEST).write_bytes(raw)
    for p in (dst / VERSIONS_DIR).glob("*.json"):
        if int(p.stem) > n:
            p.unlink()
    gc(dst, keep=n)
    return dst


def task_data(digits, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train [n, 64] float32, y_train global labels, x_test, y_test) of task ``i``."""
    t = digits.tasks[i]
    cls = np.asarray(t.classes)
    return (t.x_train.reshape(len(t.x_train), -1).astype(np.float32), cls[t.y_train],
            t.x_test.reshape(len(t.x_test), -1).astype(np.float32), cls[t.y_test])


def b64(x: np.ndarray) -> dict:
    x = np.ascontiguousarray(x, dtype="<f4")
    return {"b64": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape)}


def write_config(path: Path, **sections: dict) -> Path:
    """A JSON config (the daemon reads TOML or JSON) with the test defaults: numpy
    provider, a fast policy loop, no idle wait."""
    cfg = {"server": {"providers": ["numpy"]},
           "policy": {"check_interval_s": 0.2, "idle_s": 0.0, "min_samples": 200, "retry_after_s": 3600},
           "learn": {"ram_mb": 256.0, "min_holdout_acc": 0.8}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(json.dumps(cfg))
    return path


STARTED: list[DaemonProc] = []


@pytest.fixture(autouse=True)
def reap_daemons():
    """A failed assertion must not leave a daemon running: kill what a test started."""
    yield
    while STARTED:
        d = STARTED.pop()
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


class DaemonProc:
    """``python -m edgecl.runtime.daemon`` in a subprocess on a Unix socket."""

    def __init__(self, bundle: Path, workdir: Path, config: Path, env: dict | None = None) -> None:
        self.bundle, self.workdir, self.config = bundle, workdir, config
        self.socket = workdir / "d.sock"
        self.state = workdir / "state"
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "daemon.log"

    def start(self, wait: bool = True, timeout: float = 60.0) -> DaemonProc:
        from edgecl.runtime.daemon.client import Client

        STARTED.append(self)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgecl.runtime.daemon", str(self.bundle),
                 "--socket", str(self.socket), "--config", str(self.config), "--state-dir", str(self.state)],
                stdout=log, stderr=log, env=self.env, cwd=self.workdir)
        self.client = Client(str(self.socket), timeout=60)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}):\n"
                                     f"{self.log.read_text()[-3000:]}")
            try:
                status, _ = self.client.get("/readyz")
                if status == 200:
                    return
            except OSError:
                self.client.close()
            time.sleep(0.02)
        raise AssertionError(f"the daemon was not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.client.close()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        return self.proc.returncode

    def status(self) -> dict:
        s, body = self.client.get("/status")
        assert s == 200, body
        return body

    def wait_job(self, done=("committed", "rejected", "failed"), timeout: float = 120.0) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = self.status()
            if st["jobs"] and st["jobs"][0]["state"] in done and st["learning"] is None:
                return st
            time.sleep(0.1)
        raise AssertionError(f"no job finished in {timeout} s: {self.status()}\n"
                             f"{self.log.read_text()[-3000:]}")


def worker_alive(state: Path) -> list[int]:
    """pids of the learning worker or learner child of the daemon with this state dir
    (leftovers are a bug: the child's command line names its temp dir under the state dir)."""
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if (b"edgecl.runtime.daemon.worker" in cmd or b"edgecl.runtime.learn.child" in cmd) \
                and str(state.resolve()).encode() in cmd:
            out.append(int(p.name))
    return out


@pytest.fixture
def four(trained, tmp_path):
    return prefix_bundle(trained("supsup")[1], tmp_path / "bundle")


def device_env(tmp_path: Path) -> dict:
    """The environment of a device: torch and TVM's Python package unimportable, in the
    daemon and every process it starts (the worker, the learner's child)."""
    site = tmp_path / "device-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=("torch", "tvm")))
    return {"PYTHONPATH": str(site)}


@pytest.fixture
def daemon(four, tmp_path):
    procs = []

    def start(config: Path | None = None, env: dict | None = None, **sections) -> DaemonProc:
        cfg = config or write_config(tmp_path / "daemon.json", **sections)
        d = DaemonProc(four, tmp_path, cfg, env=env).start()
        procs.append(d)
        return d

    yield start
    for d in procs:
        d.stop()


# -- end to end ----------------------------------------------------------------------------
def _old_logits(c, x: np.ndarray) -> dict[str, bytes]:
    out = {}
    for t in OLD_TASKS:
        s, body = c.post("/infer", {**b64(x), "task": t, "logits": True})
        assert s == 200, body
        out[t] = base64.b64decode(body["logits"]["b64"])
    return out


def test_end_to_end_stream_learn_commit_answer(daemon, four, digits, tmp_path):
    from edgecl.runtime import Session

    d = daemon(env=device_env(tmp_path))  # torch blocked in the daemon, its worker and the learner
    c = d.client
    mode = stat.S_IMODE(os.stat(d.socket).st_mode)
    assert mode == 0o660 and stat.S_ISSOCK(os.stat(d.socket).st_mode)
    x_old = np.concatenate([task_data(digits, i)[2][:60] for i in range(4)])  # <= server.max_batch
    before = _old_logits(c, x_old)
    ref = Session(four, providers=["numpy"])  # in process, on the same bytes
    for t in OLD_TASKS:
        assert before[t] == np.ascontiguousarray(ref.logits(x_old, t), "<f4").tobytes()

    s, body = c.post("/infer", {**b64(x_old[:4]), "task": NEW_TASK})
    assert s == 404 and NEW_TASK in body["detail"]

    x5, y5, x5_test, y5_test = task_data(digits, 4)
    acked = []
    for i in range(0, len(x5), 25):  # stream in small batches, as an application would
        part = {"task": NEW_TASK, "x": x5[i:i + 25].tolist(), "y": y5[i:i + 25].tolist()}
        s, body = c.post("/samples", part)
        assert s == 200, body
        acked.extend(range(body["ids"][0], body["ids"][1] + 1))
        assert body["stored"] == len(x5[i:i + 25]) and not body["learned"]
    assert len(acked) == len(x5) >= 200

    # it triggers by itself (>= 200 new samples), learns in a worker process, commits, swaps;
    # old tasks answer byte-identically the whole time
    t0, seen_running, checks = time.monotonic(), False, 0
    while time.monotonic() - t0 < 120:
        st = d.status()
        seen_running |= st["learning"] is not None
        assert _old_logits(c, x_old) == before
        checks += 1
        if st["version"] == 5 and st["learning"] is None:
            break
        time.sleep(0.05)
    st = d.status()
    job = st["jobs"][0]
    assert job["state"] == "committed", job
    assert job["trigger"] == "policy" and job["version_before"] == 4 and job["version_after"] == 5
    assert job["holdout_acc"] >= 0.8 and job["peak_rss"] > 0 and job["joules"] > 0
    assert seen_running and checks >= 3
    assert [t["name"] for t in st["tasks"]] == OLD_TASKS + [NEW_TASK]
    assert st["policy"]["checks"]["samples"]["ok"] is False  # nothing new left to learn
    assert _old_logits(c, x_old) == before
    assert not worker_alive(d.state)

    # the new task answers, named and routed, without a restart
    s, body = c.post("/infer", {**b64(x5_test), "task": NEW_TASK, "logits": True})
    assert s == 200 and body["version"] == 5
    pred = np.array([r["prediction"] for r in body["results"]])
    assert (pred == y5_test).mean() >= 0.9
    on_disk = Session(four, providers=["numpy"])
    assert base64.b64decode(body["logits"]["b64"]) == np.ascontiguousarray(
        on_disk.logits(x5_test, NEW_TASK), "<f4").tobytes()
    s, body = c.post("/infer", {"x": x5_test.tolist()})
    assert s == 200
    routed = [r for r in body["results"] if r["task"] == NEW_TASK]
    assert len(routed) >= 0.8 * len(x5_test)
    assert np.mean([r["prediction"] == y for r, y in zip(body["results"], y5_test, strict=True)
                    if r["task"] == NEW_TASK]) >= 0.9

    # metrics in Prometheus' text format
    s, text = c.request("GET", "/metrics")
    text = text.decode()
    assert s == 200
    assert f"edgecl_samples_stored {float(len(x5))}" in text
    assert 'edgecl_learning_runs_total{outcome="committed"} 1.0' in text
    assert "edgecl_bundle_version 5.0" in text
    assert 'edgecl_requests_total{method="POST",path="/samples",status="200"}' in text
    assert 'edgecl_request_duration_seconds_bucket{le="0.001",path="/infer"}' in text
    assert "edgecl_learning_peak_rss_bytes" in text and "edgecl_learning_energy_joules_total" in text

    # roll back: the new task goes, old ones unchanged; the store keeps every sample
    s, body = c.post("/rollback", {})
    assert s == 200 and body["version"] == 6 and body["contents_of"] == 4, body
    assert body["tasks"] == OLD_TASKS
    s, body = c.post("/infer", {**b64(x5_test[:2]), "task": NEW_TASK})
    assert s == 404
    assert _old_logits(c, x_old) == before
    assert Bundle.open(four).version == 6

    # a restart keeps every acknowledged sample and does not learn the task again by itself
    assert d.stop() == 0
    assert not d.socket.exists()
    d2 = DaemonProc(four, tmp_path, d.config).start()
    try:
        st = d2.status()
        assert st["samples_total"] == len(x5) and st["version"] == 6
        time.sleep(0.6)  # three policy checks
        assert d2.status()["queue"] == [] and Bundle.open(four).version == 6
    finally:
        d2.stop()
    from edgecl.runtime.daemon.store import Store

    ids, xs, ys = Store(d.state / "samples.sqlite").samples(NEW_TASK)
    assert ids.tolist() == acked and xs.reshape(len(xs), -1).tobytes() == x5.tobytes()
    assert ys.tolist() == y5.tolist()


def test_manual_learn_rejected_by_holdout_is_rolled_back(daemon, four, digits):
    """Labels that carry no signal: the learner commits, the held-out accuracy is below the
    minimum, the daemon rolls the version back and says why."""
    d = daemon(policy={"enabled": False}, learn={"min_holdout_acc": 0.95, "epochs": 3})
    x5, y5, _, _ = task_data(digits, 4)
    rng = np.random.default_rng(0)
    noise = rng.permutation(y5)
    s, body = d.client.post("/samples", {"task": "noise", **b64(x5), "y": noise.tolist()})
    assert s == 200
    time.sleep(0.5)
    assert d.status()["queue"] == []  # policy disabled: nothing by itself
    s, body = d.client.post("/learn", {"task": "noise"})
    assert s == 202 and body["state"] == "queued"
    s, again = d.client.post("/learn", {"task": "noise"})
    assert s == 409 and "one job at a time" in again["detail"]
    st = d.wait_job()
    job = st["jobs"][0]
    assert job["state"] == "rejected", job
    assert "held-out accuracy" in job["error"] and "rolled back" in job["error"]
    assert job["version_after"] == 5 and st["version"] == 6
    assert [t["name"] for t in st["tasks"]] == OLD_TASKS
    assert Bundle.open(four).task_names == OLD_TASKS
    # the policy waits for new samples (and retry_after_s) before trying this task again
    waiting = " ".join(st["samples"]["noise"]["waiting"])
    assert "0 new sample(s)" in waiting and "retry in" in waiting


# -- bad input ------------------------------------------------------------------------------
def test_bad_requests_are_4xx_with_a_reason(daemon):
    d = daemon(server={"max_body_bytes": 64 * 1024, "max_batch": 8})
    c = d.client
    x = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    cases = [
        ({"x": [[0.5] * 63]}, 422, "shape"),
        ({"x": [[0.5] * 64, [0.5] * 63]}, 422, "rectangular"),
        ({"x": [["a"] * 64]}, 422, "strings"),
        ({"x": [[True] * 64]}, 422, "booleans"),
        ({"x": [[1e39] * 64]}, 422, "infinite"),
        ({"x": x.tolist(), "task": "nope"}, 404, "unknown task"),
        ({"x": x.tolist(), "threshold": 2}, 422, "threshold"),
        ({"x": x.tolist(), "extra": 1}, 422, "extra"),
        ({"b64": "!!!", "shape": [1, 64]}, 422, "base64"),
        ({**b64(x), "shape": [3, 64]}, 422, "bytes"),
        ({"b64": b64(x)["b64"]}, 422, "shape"),
        ({"x": x.tolist(), **b64(x)}, 422, "exactly one"),
        ({**b64(np.zeros((9, 64), np.float32))}, 422, "at most 8"),
        ({}, 422, "exactly one"),
    ]
    for payload, code, word in cases:
        s, body = c.post("/infer", payload)
        assert s == code and word in body["detail"], (payload if len(str(payload)) < 200 else word, s, body)
    s, body = c.request("POST", "/infer", b'{"x": [1, 2')
    assert s == 422 and "JSON" in json.loads(body)["detail"]
    s, body = c.request("POST", "/infer", json.dumps({"x": [[float("nan")] * 64]}).encode())
    assert s == 422 and "NaN" in json.loads(body)["detail"]
    s, body = c.request("POST", "/infer", b"[1]" + b" " * (70 * 1024))
    assert s == 413 and "limit" in json.loads(body)["detail"]
    s, body = c.post("/samples", {"task": "../etc", "x": x.tolist(), "y": [0, 1]})
    assert s == 422 and "task name" in body["detail"]
    s, body = c.post("/samples", {"task": "t", "x": x.tolist(), "y": [0]})
    assert s == 422 and "one label per input" in body["detail"]
    s, body = c.post("/samples", {"task": "t", "x": x.tolist(), "y": [0, -1]})
    assert s == 422 and "labels must be" in body["detail"]
    s, body = c.post("/samples", {"task": "digits-0-1", "x": x.tolist(), "y": [0, 7]})
    assert s == 422 and "not classes of task" in body["detail"]
    s, body = c.post("/samples", {"task": "t", "x": x.tolist(), "y": ["0", 1]})
    assert s == 422 and "y" in body["detail"]
    s, body = c.post("/rollback", {"to": 99})
    assert s == 404 and "retained versions" in body["detail"]
    s, body = c.post("/learn", {"task": "absent"})
    assert s == 404 and "no samples" in body["detail"]
    assert d.status()["samples_total"] == 0  # nothing bad was stored
    assert d.proc.poll() is None


def test_fuzz_malformed_requests_never_5xx(daemon):
    """hypothesis: random JSON values, random shapes, dtypes and numbers (NaN, inf, huge),
    random bytes, truncated bodies: every answer is < 500 and says what was wrong."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    d = daemon(server={"max_body_bytes": 32 * 1024, "max_batch": 16})
    c = d.client
    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-2**70, 2**70),
                       st.booleans(), st.none(), st.text(max_size=3))
    arrays = st.recursive(floats, lambda inner: st.lists(inner, max_size=6), max_leaves=80)
    row = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=60, max_size=66)
    rows = st.lists(row, min_size=0, max_size=3)
    tensor = st.fixed_dictionaries({}, optional={
        "x": st.one_of(arrays, rows),
        "b64": st.one_of(st.text(max_size=40),
                         st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode())),
        "shape": st.lists(st.integers(-3, 300), max_size=4),
        "dtype": st.sampled_from(["float32", "int64", "u8"]),
        "task": st.one_of(st.none(), st.text(max_size=8), st.sampled_from(OLD_TASKS)),
        "y": st.one_of(st.integers(-5, 2**40), st.lists(st.integers(-1, 12), max_size=4),
                       st.text(max_size=2)),
        "threshold": st.one_of(st.floats(allow_nan=True), st.integers(-3, 3)), "logits": st.booleans(),
        "to": st.integers(-2, 9), "force": st.booleans()})
    bodies = st.one_of(tensor.map(lambda v: json.dumps(v).encode()),
                       st.recursive(floats, lambda i: st.lists(i) | st.dictionaries(st.text(max_size=4), i),
                                    max_leaves=10).map(lambda v: json.dumps(v).encode()),
                       st.binary(max_size=300),
                       tensor.map(lambda v: json.dumps(v).encode()).flatmap(
                           lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n])))
    paths = st.sampled_from(["/infer", "/samples", "/learn", "/rollback", "/infer", "/samples"])
    seen: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=paths, body=bodies)
    def one(path, body):
        s, raw = c.request("POST", path, body)
        seen[s] = seen.get(s, 0) + 1
        assert s < 500, (path, body[:300], s, raw[:300])
        if s >= 400:
            detail = json.loads(raw)["detail"]
            assert detail and isinstance(detail, str), raw

    one()
    # a body larger than the limit, a body cut short by a client that goes away
    s, raw = c.request("POST", "/samples", b"{" + b" " * (40 * 1024) + b"}")
    assert s == 413
    with socket.socket(socket.AF_UNIX) as raw_sock:
        raw_sock.connect(str(d.socket))
        raw_sock.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 500\r\n\r\n{\"x\": [[1, 2")
    s, body = c.get("/healthz")
    assert s == 200 and d.proc.poll() is None
    assert set(seen) <= {200, 202, 400, 404, 409, 413, 422, 503}, seen
    assert seen.get(422, 0) > 50
    assert d.status()["ready"]


def test_tcp_needs_a_token(four, tmp_path):
    from edgecl.runtime.daemon.client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(tmp_path / "tcp.json")
    r = subprocess.run([sys.executable, "-m", "edgecl.runtime.daemon", str(four), "--port", str(port),
                        "--config", str(cfg), "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "EDGECL_DAEMON_TOKEN": ""})
    assert r.returncode == 2 and "bearer token" in r.stderr
    token = "s3cret-token-0123456789"
    env = {**os.environ, "EDGECL_DAEMON_TOKEN": token}
    p = subprocess.Popen([sys.executable, "-m", "edgecl.runtime.daemon", str(four), "--port", str(port),
                          "--config", str(cfg), "--state-dir", str(tmp_path / "state")], env=env,
                         stderr=subprocess.PIPE)
    try:
        good, bad = Client(port=port, token=token), Client(port=port, token="wrong-token-0123456789")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            try:
                if good.get("/readyz")[0] == 200:
                    break
            except OSError:
                good.close()
                time.sleep(0.05)
        assert bad.get("/healthz")[0] == 200  # the probe is open
        s, body = bad.post("/infer", {"x": [[0.0] * 64]})
        assert s == 401 and "token" in body["detail"]
        s, body = good.post("/infer", {"x": [[0.0] * 64], "task": "digits-0-1"})
        assert s == 200 and body["results"][0]["task"] == "digits-0-1"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


# -- pieces ----------------------------------------------------------------------------------
def test_config_is_strict(tmp_path):
    from edgecl.runtime.daemon.config import ConfigError, load_config

    cfg = load_config(None, bundle="b")
    assert cfg.server.socket_mode == "0660" and cfg.store.max_pending_samples > 0
    assert cfg.state_dir.name == "b.daemon" and cfg.socket_path.name == "daemon.sock"
    (tmp_path / "a.toml").write_text("[server]\nsocket_mod = '0660'\n")
    with pytest.raises(ConfigError, match=r"a.toml: unknown key server.socket_mod"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("[server]\nsocket_mode = '0666'\n")
    with pytest.raises(ConfigError, match="others may not call"):
        load_config(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text("[server]\nport = 8080\nhost = '0.0.0.0'\n")
    with pytest.raises(ConfigError, match="loopback only"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text("[learn]\nram_mb = 'lots'\n")
    with pytest.raises(ConfigError, match=r"learn.ram_mb: expected a number"):
        load_config(tmp_path / "d.toml")
    (tmp_path / "e.toml").write_text("[policy\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "e.toml")
    example = load_config(ROOT / "deploy/daemon.example.toml")
    assert example.server.socket == "/run/edgecl/daemon.sock" and example.store.state_dir == "/var/lib/edgecl"


def test_store_is_wal_full_and_keeps_bytes(tmp_path):
    from edgecl.runtime.daemon.store import Store

    s = Store(tmp_path / "s.sqlite")
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    x = np.random.default_rng(1).random((5, 64), dtype=np.float32)
    first, last = s.add_samples("t", x, np.array([0, 1, 0, 1, 1]))
    assert (first, last) == (1, 5)
    assert s.add_samples("u", x[:2], np.array([3, 4])) == (6, 7)
    ids, xs, ys = s.samples("t")
    assert ids.tolist() == [1, 2, 3, 4, 5] and xs.tobytes() == x.tobytes() and ys.tolist() == [0, 1, 0, 1, 1]
    per = s.task_samples()
    assert per["t"].count == 5 and per["t"].per_class == {0: 2, 1: 3} and per["u"].max_id == 7
    n = s.export_npz("t", 4, tmp_path / "t.npz")
    z = np.load(tmp_path / "t.npz")
    assert n == 4 and z["x"].shape == (4, 64) and z["y"].tolist() == [0, 1, 0, 1]
    job = s.add_job("t", "manual", "supsup", 5, 5)
    s.add_energy(job, 1.5)
    assert s.job(job)["joules"] == 1.5 and s.energy_total() == 1.5 and s.active_jobs()[0]["id"] == job
    s.close()


def _sysfs(root: Path, supplies: dict[str, dict[str, str]], temps: list[int]) -> Path:
    for name, attrs in supplies.items():
        d = root / "sys/class/power_supply" / name
        d.mkdir(parents=True)
        for k, v in attrs.items():
            (d / k).write_text(v + "\n")
    for i, t in enumerate(temps):
        d = root / f"sys/class/thermal/thermal_zone{i}"
        d.mkdir(parents=True)
        (d / "temp").write_text(f"{t}\n")
        (d / "type").write_text(f"zone{i}\n")
    return root


def test_policy_reads_power_and_thermal(tmp_path):
    from edgecl.runtime.daemon.config import PolicyConfig
    from edgecl.runtime.daemon.policy import Policy, max_temperature_c, power_state
    from edgecl.runtime.daemon.store import TaskSamples

    assert power_state(tmp_path / "none") == (None, f"no {tmp_path / 'none'}/sys/class/power_supply")
    laptop = _sysfs(tmp_path / "a", {"AC": {"type": "Mains", "online": "0"},
                                     "BAT0": {"type": "Battery", "status": "Discharging"}}, [45000, 91500])
    assert power_state(laptop)[0] is False
    assert max_temperature_c(laptop) == (91.5, "thermal_zone1 (zone1)")
    plugged = _sysfs(tmp_path / "b", {"AC": {"type": "Mains", "online": "1"},
                                      "BAT0": {"type": "Battery", "status": "Charging"}}, [50000])
    assert power_state(plugged)[0] is True

    samples = {"new": TaskSamples("new", 300, 300, {8: 150, 9: 150}),
               "one-class": TaskSamples("one-class", 300, 600, {3: 300}),
               "old": TaskSamples("old", 500, 900, {0: 250, 1: 250})}
    kw = dict(bundle_tasks=["old"], last_infer=0.0, energy_spent=0.0, busy=False, last_jobs={})
    p = Policy(PolicyConfig(min_samples=200, sysfs_root=str(plugged), max_temp_c=80))
    d = p.decide(samples, **kw)
    assert d.go and d.task == "new", d.as_dict()
    assert "a task needs 2" in " ".join(d.candidates["one-class"]["waiting"])
    assert "in the bundle" in d.candidates["old"]["state"]
    hot = Policy(PolicyConfig(min_samples=200, sysfs_root=str(laptop), max_temp_c=80)).decide(samples, **kw)
    assert not hot.go and not hot.checks["power"].ok and not hot.checks["thermal"].ok
    assert hot.checks["thermal"].value == 91.5
    serving = p.decide(samples, **{**kw, "last_infer": time.time()})  # an /infer just now: not idle
    assert not serving.go and not serving.checks["idle"].ok and serving.checks["samples"].ok
    spent = Policy(PolicyConfig(energy_budget_j=10, sysfs_root=str(plugged))).decide(
        samples, **{**kw, "energy_spent": 12})
    assert not spent.go and "< 10 J" in spent.checks["energy"].need
    few = Policy(PolicyConfig(min_samples=400, sysfs_root=str(plugged))).decide(samples, **kw)
    assert not few.go and "300 new sample(s), need 400" in few.candidates["new"]["waiting"][0]
    assert Policy(PolicyConfig(min_samples=400, sysfs_root=str(plugged))).decide(samples, **kw,
                                                                                 manual=True).task == "new"
    rejected = {"new": {"id": 1, "state": "rejected", "n_samples": 300, "max_sample_id": 300,
                        "finished": time.time(), "error": "low"}}
    again = p.decide(samples, **{**kw, "last_jobs": rejected})
    assert not again.go and "0 new sample(s)" in " ".join(again.candidates["new"]["waiting"])


def test_notify_protocol(tmp_path):
    from edgecl.runtime.daemon.notify import notify, watchdog_interval

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1"
    assert not notify("READY=1", {})
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None


def test_daemon_notifies_systemd_ready_and_watchdog(four, tmp_path):
    """As systemd starts it: $NOTIFY_SOCKET and $WATCHDOG_USEC set; READY=1 comes once the
    bundle is loaded, then WATCHDOG=1 pings."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(30)
        d = DaemonProc(four, tmp_path, write_config(tmp_path / "n.json"),
                       env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}).start(wait=False)
        try:
            msgs = []
            while not any(m.startswith("READY=1") for m in msgs):
                msgs.append(s.recv(4096).decode())
            assert d.client.get("/readyz")[0] == 200
            assert "STATUS=serving version 4" in msgs[-1]
            assert s.recv(100) == b"WATCHDOG=1"
            assert s.recv(100) == b"WATCHDOG=1"
        finally:
            d.stop()
        # pings still queued (or sent while it shut down, every 0.2 s) come before STOPPING=1
        rest = [s.recv(100)]
        while rest[-1] == b"WATCHDOG=1":
            rest.append(s.recv(100))
        assert rest[-1] == b"STOPPING=1", rest


# -- systemd unit, deploy --------------------------------------------------------------------
def test_systemd_unit_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    from edgecl.tools.deploy import render_unit

    text = (ROOT / "deploy/edgecl-daemon.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NotifyAccess=main", "ExecStart="):
        assert key in text
    # the unit as deploy writes it for a device whose install is under this venv
    unit = tmp_path / "edgecl-daemon.service"
    unit.write_text(render_unit(text, remote_dir=str(tmp_path / "edgecl"), user="root", group="root",
                                python=sys.executable))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    # and it catches a broken unit: the check can fail
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "notifyy" in r.stderr


def test_deploy_renders_the_unit_for_the_device():
    from edgecl.tools.deploy import render_unit

    text = (ROOT / "deploy/edgecl-daemon.service").read_text()
    out = render_unit(text, remote_dir="/home/pi/edgecl", user="pi", group="pi")
    assert "ExecStart=/home/pi/edgecl/current/venv/bin/python -m edgecl.runtime.daemon " \
           "/home/pi/edgecl/data/bundle --config /home/pi/edgecl/service/daemon.json" in out
    assert "User=pi" in out and "Group=pi" in out and "ReadWritePaths=/home/pi/edgecl" in out
    assert "/opt/edgecl" not in out


def test_daemon_imports_without_its_web_stack_and_never_torch(tmp_path):
    code = """
import sys
import edgecl.runtime.daemon
from edgecl.runtime.daemon import client, config, core, notify, policy, service, store, worker
from edgecl.runtime.daemon.config import load_config
from edgecl.runtime.errors import EdgeclError
bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', 'uvicorn', 'starlette', 'pydantic',
                                                     'prometheus_client')]
assert not bad, bad
try:
    service.serve(load_config(None, bundle=sys.argv[1]))
except EdgeclError as e:
    print(e)
"""
    r = run_on_device(tmp_path, code, str(tmp_path), blocked=("torch", "tvm", "fastapi", "uvicorn",
                                                                "prometheus_client"))
    assert r.returncode == 0, r.stderr
    assert "pip install 'edgecl[daemon]'" in r.stdout


def test_cli_command_parses():
    import argparse

    from edgecl.tools import bench_daemon, daemon_cmd

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    daemon_cmd.add_parser(sub)
    a = p.parse_args(["daemon", "B", "--socket", "/tmp/x.sock", "--config", "c.toml", "--port", "0"])
    assert (a.bundle, a.socket, a.config, a.func) == ("B", "/tmp/x.sock", "c.toml", daemon_cmd.main)
    b = argparse.ArgumentParser()
    bench_daemon.add_arguments(b)
    assert b.parse_args(["--daemon-seconds", "2"]).daemon_seconds == 2.0


@pytest.mark.slow
def test_deploy_service_on_the_emulated_pi(bundle_copy, tmp_path, monkeypatch):
    """`edgecl deploy --service` on the emulated Pi 4 (no systemd there: the daemon is
    started directly): it answers /infer over its socket and stores samples."""
    if os.geteuid() != 0:
        pytest.skip("the emulator needs root (binfmt_misc, mount namespaces, chroot)")
    import shlex

    from edgecl.tools import deploy as dep
    from edgecl.tools.emulator import Emulator

    real = dep._load_toml

    def with_daemon(path: Path) -> dict:  # until pyproject.toml lists the package (a no-op after)
        cfg = real(path)
        st = cfg.get("tool", {}).get("setuptools", {})
        if path.name == "pyproject.toml" and "edgecl.runtime.daemon" not in st.get("packages", []):
            st["packages"].append("edgecl.runtime.daemon")
            st.setdefault("package-dir", {})["edgecl.runtime.daemon"] = "runtime/daemon"
        return cfg

    monkeypatch.setattr(dep, "_load_toml", with_daemon)
    emu = Emulator("rpi4", small_mb=4, workdir=tmp_path / "emulator")
    emu.start()
    try:
        b = bundle_copy("supsup")
        kw = {"identity": str(emu.identity), "known_hosts": str(tmp_path / "known_hosts"),
              "log": lambda _m: None}
        r = dep.deploy(b, emu.url, "rpi4", service=True, backends="numpy", **kw)
        svc = r["service"]
        assert svc["check"]["ok"] and svc["check"]["infer_status"] == 200, svc
        assert svc["mode"].startswith("direct"), svc["mode"]  # no systemd in the emulator
        assert svc["check"]["readyz"]["tasks"] == Bundle.open(b).task_names
        base = svc["bundle"].rsplit("/data/", 1)[0]
        code = ("import json, sys; from edgecl.runtime.daemon.client import Client; c = Client(sys.argv[1]); "
                "s, a = c.post('/samples', {'task': 'field-task', 'x': [[0.25] * 64] * 3, 'y': [3, 4, 3]}); "
                "print(json.dumps([s, a, c.get('/status')[1]['samples_total']]))")
        out = emu.ssh(f"{base}/current/venv/bin/python -c {shlex.quote(code)} {svc['socket']}", timeout=300)
        status, answer, total = json.loads(out.strip().splitlines()[-1])
        assert status == 200 and answer["stored"] == 3 and total == 3, out
        # a second deploy keeps the daemon's bundle (its own versions) and restarts it
        r2 = dep.deploy(b, emu.url, "rpi4", service=True, backends="numpy", **kw)
        assert any("kept" in ln for ln in r2["service"]["log"]) and r2["service"]["check"]["ok"]
        out = emu.ssh(f"{base}/current/venv/bin/python -c {shlex.quote(code)} {svc['socket']}", timeout=300)
        assert json.loads(out.strip().splitlines()[-1])[2] == 6  # the store survived the restart
    finally:
        emu.ssh("kill $(cat edgecl/run/daemon.pid) 2>/dev/null || true", check=False)
        emu.stop()
