"""The daemon under faults: SIGKILL at random instants during sample intake and during
learning + commit (afterwards the bundle loads at its last committed version, every
acknowledged sample is in the store, and a restarted daemon finishes the interrupted
job exactly once), a learner child killed by the RAM limit, a full disk during a commit
and under the sample store.

Kill counts: the default run SIGKILLs the daemon 16 times during intake and 3 times
during learning; the ``slow`` tests add 40 and 12 more (71 in a full run)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import Session
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.daemon.store import Store

from .test_daemon import (  # noqa: F401  (reap_daemons: the autouse fixture, in this module too)
    NEW_TASK,
    OLD_TASKS,
    DaemonProc,
    b64,
    prefix_bundle,
    reap_daemons,
    task_data,
    worker_alive,
    write_config,
)


@pytest.fixture
def four(trained, tmp_path):
    return prefix_bundle(trained("supsup")[1], tmp_path / "bundle")


def _check_store(state: Path, acked: dict[int, tuple[bytes, int]]) -> None:
    s = Store(state / "samples.sqlite")
    try:
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids, x, y = s.samples(NEW_TASK)
        have = {int(i): (x[k].tobytes(), int(y[k])) for k, i in enumerate(ids)}
        missing = [i for i in acked if i not in have]
        assert not missing, f"{len(missing)} acknowledged samples lost, e.g. {missing[:5]}"
        assert all(have[i] == v for i, v in acked.items())
    finally:
        s.close()


def _intake_kills(four: Path, tmp_path: Path, digits, kills: int, seed: int) -> None:
    """Stream samples from a client thread; SIGKILL the daemon at a random instant; check
    the bundle and every acknowledged sample; start it again on the same store."""
    x5, y5, _, _ = task_data(digits, 4)
    cfg = write_config(tmp_path / "intake.json", policy={"enabled": False})
    rng = random.Random(seed)
    acked: dict[int, tuple[bytes, int]] = {}
    original = Bundle.open(four).manifest["checksum"]
    for k in range(kills):
        d = DaemonProc(four, tmp_path, cfg).start()
        stop = threading.Event()

        def stream(client=d.client, stop=stop, k=k) -> None:
            i = 0
            while not stop.is_set():
                n = 1 + (i % 7)
                sel = [(k * 31 + i * 7 + j) % len(x5) for j in range(n)]
                try:
                    s, body = client.post("/samples", {"task": NEW_TASK, **b64(x5[sel]),
                                                       "y": y5[sel].tolist()})
                except (OSError, http.client.HTTPException):
                    return  # killed mid-request: not acknowledged
                if s != 200:
                    return
                for j, sid in enumerate(range(body["ids"][0], body["ids"][1] + 1)):
                    acked[sid] = (x5[sel[j]].tobytes(), int(y5[sel[j]]))
                i += 1

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(rng.uniform(0.0, 0.25))
        d.kill()
        stop.set()
        t.join(30)
        b = Bundle.open(four)  # verifies every file's hash
        assert b.version == 4 and b.manifest["checksum"] == original
        _check_store(d.state, acked)
    assert len(acked) > kills  # the kills did land during intake


def test_sigkill_during_sample_intake(four, tmp_path, digits):
    _intake_kills(four, tmp_path, digits, kills=16, seed=1)


@pytest.mark.slow
def test_sigkill_during_sample_intake_many(four, tmp_path, digits):
    _intake_kills(four, tmp_path, digits, kills=40, seed=2)


def _prepared_state(four: Path, tmp_path: Path, digits) -> tuple[Path, dict]:
    """A store holding task 5's training samples (put in through the API)."""
    x5, y5, _, _ = task_data(digits, 4)
    d = DaemonProc(four, tmp_path / "prep", write_config(tmp_path / "prep.json", policy={"enabled": False}))
    (tmp_path / "prep").mkdir()
    d.start()
    acked = {}
    try:
        for i in range(0, len(x5), 50):
            part = {"task": NEW_TASK, **b64(x5[i:i + 50]), "y": y5[i:i + 50].tolist()}
            s, body = d.client.post("/samples", part)
            assert s == 200, body
            for j, sid in enumerate(range(body["ids"][0], body["ids"][1] + 1)):
                acked[sid] = (x5[i + j].tobytes(), int(y5[i + j]))
    finally:
        assert d.stop() == 0
    return d.state, acked


def _learning_kills(four: Path, tmp_path: Path, digits, kills: int, seed: int) -> None:
    """The policy triggers at once on a store full of task-5 samples. A first run, unkilled,
    times the job; then each round starts from the 4-task bundle and that store, SIGKILLs
    the daemon at a random instant of the job (biased to its end, where the commit is),
    checks the bundle and the store, restarts the daemon and waits for the job to finish:
    exactly one commit of the task, old tasks byte-identical."""
    state0, acked = _prepared_state(four, tmp_path, digits)
    x_old = np.concatenate([task_data(digits, i)[2][:40] for i in range(4)])
    ref = Session(four, providers=["numpy"])
    before = {t: ref.logits(x_old, t).tobytes() for t in OLD_TASKS}
    cfg = write_config(tmp_path / "learn.json", policy={"min_samples": 200})
    rng = random.Random(seed)
    landed = {4: 0, 5: 0}

    def fresh(k: int) -> tuple[Path, Path]:
        work = tmp_path / f"round{k}"
        work.mkdir()
        shutil.copytree(four, work / "bundle", ignore=shutil.ignore_patterns(".lock"))
        shutil.copytree(state0, work / "state")
        return work, work / "bundle"

    # timing run
    work, bundle = fresh(0)
    d = DaemonProc(bundle, work, cfg).start()
    t0 = time.monotonic()
    st = d.wait_job()
    duration = time.monotonic() - t0
    assert st["jobs"][0]["state"] == "committed" and st["version"] == 5, st["jobs"]
    d.stop()
    for k in range(1, kills + 1):
        work, bundle = fresh(k)
        d = DaemonProc(bundle, work, cfg).start()
        time.sleep(rng.uniform(0.3, 1.1) * duration)
        d.kill()
        b = Bundle.open(bundle)  # every file verified: whole, at its last committed version
        assert b.version in (4, 5)
        assert b.task_names == OLD_TASKS + ([NEW_TASK] if b.version == 5 else [])
        landed[b.version] += 1
        _check_store(d.state, acked)
        # restart: the interrupted job is recovered (finished from the bundle's log, or run again)
        d2 = DaemonProc(bundle, work, cfg).start()
        try:
            st = d2.wait_job()
            job = st["jobs"][0]
            assert job["state"] == "committed" and len(st["jobs"]) == 1, st["jobs"]
            assert st["version"] == 5
            for t in OLD_TASKS:
                s, body = d2.client.post("/infer", {**b64(x_old), "task": t, "logits": True})
                assert base64.b64decode(body["logits"]["b64"]) == before[t]
        finally:
            d2.stop()
        b = Bundle.open(bundle)
        assert b.version == 5 and sum(f"task:{NEW_TASK}" in e["parts"] for e in b.log) == 1
        _check_store(d2.state, acked)
        assert not worker_alive(d2.state)
        shutil.rmtree(work)
    print(f"learning kills: {kills}; the bundle was at version 4 (before the commit) {landed[4]} times, "
          f"5 (after) {landed[5]} times; job duration {duration:.2f} s")


def test_sigkill_during_learning_and_commit(four, tmp_path, digits):
    _learning_kills(four, tmp_path, digits, kills=3, seed=3)


@pytest.mark.slow
def test_sigkill_during_learning_and_commit_many(four, tmp_path, digits):
    _learning_kills(four, tmp_path, digits, kills=12, seed=4)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_learner_killed_by_ram_limit_leaves_the_daemon_serving(four, tmp_path, digits):
    x5, y5, x5_test, _ = task_data(digits, 4)
    before = _all_bytes(four)
    cfg = write_config(tmp_path / "ram.json", policy={"enabled": False},
                       learn={"ram_mb": 32.0, "debug_alloc_mb": 200.0, "epochs": 2})
    d = DaemonProc(four, tmp_path, cfg).start()
    try:
        s, _ = d.client.post("/samples", {"task": NEW_TASK, **b64(x5), "y": y5.tolist()})
        assert s == 200
        s, body = d.client.post("/learn", {})
        assert s == 202 and body["task"] == NEW_TASK
        st = d.wait_job()
        job = st["jobs"][0]
        assert job["state"] == "failed" and "RAM budget" in job["error"] and "exceeded" in job["error"], job
        assert st["version"] == 4 and d.proc.poll() is None
        s, body = d.client.post("/infer", {**b64(x5_test[:3]), "task": OLD_TASKS[0]})
        assert s == 200 and len(body["results"]) == 3
        s, text = d.client.request("GET", "/metrics")
        assert b'edgecl_learning_runs_total{outcome="failed"} 1.0' in text
    finally:
        d.stop()
    assert _all_bytes(four) == before


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root and mount rights): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(fs: Path, leave: int) -> Path:
    """A file that takes all but about ``leave`` bytes of ``fs``."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(free - leave, 0))
    return filler


def test_full_disk_during_commit_and_in_the_store(trained, tmp_path, digits):
    x5, y5, _, _ = task_data(digits, 4)
    with _tmpfs(tmp_path / "fs", "4m") as fs, _tmpfs(tmp_path / "sfs", "2m") as sfs:
        bundle = prefix_bundle(trained("supsup")[1], fs / "bundle")
        before = _all_bytes(bundle)
        cfg = write_config(tmp_path / "disk.json", policy={"enabled": False}, store={"min_free_mb": 0.0})
        d = DaemonProc(bundle, tmp_path, cfg)
        d.state = sfs / "state"
        d.start()
        try:
            s, body = d.client.post("/samples", {"task": NEW_TASK, **b64(x5), "y": y5.tolist()})
            assert s == 200, body
            filler = _fill(fs, leave=4096)  # the commit's first files do not fit
            s, body = d.client.post("/learn", {})
            assert s == 202
            st = d.wait_job()
            job = st["jobs"][0]
            assert job["state"] == "failed" and "disk full" in job["error"], job
            assert st["version"] == 4 and Bundle.open(bundle).version == 4
            after = _all_bytes(bundle)
            assert {k: after.get(k) for k in before} == before  # the previous version intact
            # what the failed commit wrote before the disk filled is unreferenced (edgecl gc removes it)
            referenced = set(Bundle.open(bundle).manifest["files"])
            assert not any(k in referenced or k.endswith(".tmp") for k in set(after) - set(before))
            s, body = d.client.post("/infer", {**b64(x5[:2]), "task": OLD_TASKS[1]})
            assert s == 200
            # room again: a manual retry commits
            filler.unlink()
            s, body = d.client.post("/learn", {})
            assert s == 202, body
            st = d.wait_job()
            assert st["jobs"][0]["state"] == "committed" and st["version"] == 5, st["jobs"][0]

            # the store's disk full: 503 with the reason, nothing half-stored, then it works again
            n = d.status()["samples_total"]
            sfill = _fill(sfs, leave=0)
            for _ in range(3):
                s, body = d.client.post("/samples", {"task": "more", **b64(x5[:40]), "y": y5[:40].tolist()})
                if s != 200:
                    break
            assert s == 503 and "full" in body["detail"], body
            assert d.proc.poll() is None and d.client.get("/healthz")[0] == 200
            sfill.unlink()
            s, body = d.client.post("/samples", {"task": "more", **b64(x5[:4]), "y": y5[:4].tolist()})
            assert s == 200, body
            ids, _, _ = Store(d.state / "samples.sqlite").samples("more")
            assert len(ids) == (d.status()["samples_total"] - n)
        finally:
            d.stop()


def test_full_queue_is_503(four, tmp_path, digits):
    x5, y5, _, _ = task_data(digits, 4)
    cfg = write_config(tmp_path / "q.json", policy={"enabled": False}, store={"max_pending_samples": 50})
    d = DaemonProc(four, tmp_path, cfg).start()
    try:
        s, body = d.client.post("/samples", {"task": NEW_TASK, **b64(x5[:40]), "y": y5[:40].tolist()})
        assert s == 200
        s, body = d.client.post("/samples", {"task": NEW_TASK, **b64(x5[40:60]), "y": y5[40:60].tolist()})
        assert s == 503 and "sample store full" in body["detail"] and "max_pending_samples" in body["detail"]
        assert d.status()["samples_total"] == 40
        # samples of a task already learned are not pending: still taken
        s, body = d.client.post("/samples", {"task": OLD_TASKS[0], **b64(x5[:2]), "y": [0, 1]})
        assert s == 200
    finally:
        d.stop()


def test_energy_pause_and_resume_across_a_restart(four, tmp_path, digits):
    """A run's energy budget spent: the learner checkpoints and pauses, the job goes back to
    the queue and the next run resumes the checkpoint; a daemon killed in between resumes
    it after its restart. The job commits once, with every run's joules accounted."""
    x5, y5, _, _ = task_data(digits, 4)
    cfg = write_config(tmp_path / "energy.json", policy={"enabled": False},
                       learn={"energy_j": 1.0, "meter": "model"})
    d = DaemonProc(four, tmp_path, cfg).start()
    try:
        s, _ = d.client.post("/samples", {"task": NEW_TASK, **b64(x5), "y": y5.tolist()})
        assert s == 200
        s, body = d.client.post("/learn", {})
        assert s == 202
        job_id = body["job"]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            job = d.status()["jobs"][0]
            if job["runs"] >= 1:
                break
            time.sleep(0.05)
        assert job["runs"] >= 1 and job["state"] in ("queued", "running"), job  # paused, not done
    finally:
        d.kill()
    assert Bundle.open(four).version == 4
    assert (four / ".learn" / NEW_TASK / "checkpoint.safetensors").is_file()
    d2 = DaemonProc(four, tmp_path, cfg).start()
    try:
        st = d2.wait_job()
        job = st["jobs"][0]
        assert job["id"] == job_id and job["state"] == "committed" and st["version"] == 5, job
        assert job["runs"] >= 2
    finally:
        d2.stop()
    s = Store(d2.state / "samples.sqlite")
    try:
        row = s.job(job_id)
        assert row["report"]["resumed"] is True  # the last run continued a checkpoint
        runs = s.db.execute("SELECT COUNT(*), SUM(joules) FROM energy WHERE job = ?", (job_id,)).fetchone()
        assert runs[0] >= 2 and abs(runs[1] - row["joules"]) < 1e-9 and row["joules"] >= 1.0
    finally:
        s.close()
    assert not (four / ".learn" / NEW_TASK).exists()
    assert sum(f"task:{NEW_TASK}" in e["parts"] for e in Bundle.open(four).log) == 1
