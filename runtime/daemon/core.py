"""The daemon's state, without the web layer: the session (hot-swapped on a new version),
the sample store, the trigger policy, and the learning jobs.

Threads: the API serves inference on the event loop (one request at a time, so the
session's activation cache is never shared between two requests) and sample intake on a
thread pool (the store has its own lock); one *learning thread* checks the policy every
``policy.check_interval_s`` (sooner when samples arrive or POST /learn asks), runs at most
one job at a time in a worker process, validates the result, and swaps the new session
in by one reference assignment, so a request runs wholly on the old version or wholly
on the new one.

A job survives the daemon: its state is in the store before the worker starts, the
worker runs in its own process group (killed with the daemon: ``PR_SET_PDEATHSIG``), and a
restarted daemon (:meth:`Daemon.recover`) kills what is left of that group, reads the
bundle's version log to learn whether the job's commit (or its rollback) happened, and
either finishes the job from there or queues it again (``learn(..., resume=True)`` when
the learner left a checkpoint).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, EdgeclError, InputError, UnknownTaskError
from .config import Config
from .policy import Decision, Policy
from .store import Store, StoreError, StoreFull

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
EXIT_PAUSED = 3


class Busy(EdgeclError):
    """The daemon cannot take this now (a full queue, a full disk, still loading): 503."""


class Conflict(EdgeclError):
    """The request conflicts with the daemon's state (a job running, nothing to roll back): 409."""


class NotFound(EdgeclError):
    """An unknown task or job: 404."""


class Daemon:
    def __init__(self, cfg: Config) -> None:
        if not cfg.bundle:
            raise EdgeclError("no bundle given (the BUNDLE argument, or `bundle` in the config)")
        self.cfg = cfg
        self.root = Path(cfg.bundle).resolve()
        if not (self.root / "manifest.json").is_file():
            raise BundleError(self.root / "manifest.json",
                              "no bundle here (the daemon serves a bundle directory)")
        self.state_dir = cfg.state_dir.resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir = self.state_dir / "jobs"
        self.store = Store(self.state_dir / "samples.sqlite",
                           min_free_bytes=int(cfg.store.min_free_mb * (1 << 20)))
        self.policy = Policy(cfg.policy)
        self.session = None  # set by load(); replaced whole on a hot swap
        self.load_error: str | None = None
        self.recovered = False  # /readyz waits for recover() (after load())
        self.started = time.time()
        self.last_infer = 0.0
        self.job_id: int | None = None  # the job running now
        self.job_started = 0.0
        self.job_proc: subprocess.Popen | None = None
        self.last_decision: Decision | None = None
        self.counters = {"learning_runs": {}, "samples_stored": 0, "swaps": 0, "rollbacks": 0}
        self.peak_rss_bytes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._bundle_lock = threading.Lock()  # one of: validate + swap, rollback
        self._thread: threading.Thread | None = None
        self._canary: np.ndarray | None = None
        self._canary_logits: dict[str, bytes] = {}
        self.counters["samples_stored"] = self.store.count()

    # -- loading, swapping ---------------------------------------------------------------
    def load(self) -> None:
        """Open the session (verifying every file of the current version)."""
        from ..engine import Session

        try:
            s = Session(self.root, providers=self.cfg.server.providers or None,
                        threads=self.cfg.server.threads)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            raise
        self._set_canaries(s)
        self.session = s
        self.load_error = None

    def _set_canaries(self, s) -> None:
        from ..samples import canary

        self._canary = canary(s.bundle, batch=8, seed=20240607)
        self._canary_logits = {t: s.logits(self._canary, t).tobytes() for t in s.tasks}

    @property
    def ready(self) -> bool:
        return self.session is not None

    def _swap(self, check_old: bool) -> list[str]:
        """A new session for the bundle's current version (``Session.reload`` on a copy, so
        requests in flight keep the old one and only the new files are hashed), then one
        assignment. With ``check_old``: old tasks' canary logits must be byte-identical,
        else the names of those that changed are returned and nothing is swapped."""
        old = self.session
        new = copy.copy(old)
        new.reload()
        changed = []
        if check_old:
            changed = [t for t in old.tasks if t in new.tasks
                       and new.logits(self._canary, t).tobytes() != self._canary_logits.get(t)]
            if changed:
                return changed
        self._set_canaries(new)
        self.session = new
        self.counters["swaps"] += 1
        return []

    # -- inference ---------------------------------------------------------------------
    def _session(self):
        s = self.session
        if s is None:
            raise Busy("not ready: the bundle is still loading" if self.load_error is None
                       else f"not ready: the bundle failed to load: {self.load_error}")
        return s

    def infer(self, x: np.ndarray, task: str | None = None, threshold: float | None = None,
              want_logits: bool = False) -> dict:
        s = self._session()
        self.last_infer = time.time()
        if len(x) > self.cfg.server.max_batch:
            raise InputError(f"batch of {len(x)} inputs; the daemon takes at most "
                             f"{self.cfg.server.max_batch} (server.max_batch)")
        x = s.check_input(x)
        results: list[dict] = []
        logits = None
        if task is not None:
            if task not in s.tasks:
                raise UnknownTaskError(f"unknown task {task!r}; the bundle (version {s.bundle.version}) "
                                       f"holds: {', '.join(s.tasks) or 'none'}")
            logits = s.logits(x, task)
            classes = s.bundle.task(task)["classes"]
            z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            pred = logits.argmax(axis=1)
            for i in range(len(x)):
                results.append({"task": task, "confidence": float(p[i, pred[i]]), "reason": "task given",
                                "prediction": int(classes[int(pred[i])])})
        else:
            if want_logits:
                raise InputError("logits are returned for a named task only (give `task`)")
            if not s.tasks:
                raise Conflict("the bundle holds no task yet")
            r = s.run(x, threshold=self.cfg.server.threshold if threshold is None else threshold)
            results = r.as_dicts()  # prediction: the chosen task's class label, as Session.run gives it
        out: dict = {"version": s.bundle.version, "provider": s.provider, "results": results}
        if want_logits and logits is not None:
            import base64

            out["logits"] = {"b64": base64.b64encode(np.ascontiguousarray(logits, "<f4").tobytes()).decode(),
                             "shape": list(logits.shape), "dtype": "float32"}
        return out

    # -- samples -----------------------------------------------------------------------
    def add_samples(self, task: str, x: np.ndarray, y: np.ndarray) -> dict:
        s = self._session()
        if not TASK_NAME.match(task):
            raise InputError(f"task name {task!r}: use 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        x = s.check_input(x)
        if y.ndim != 1 or len(y) != len(x):
            raise InputError(f"y has shape {tuple(y.shape)}; expected one label per input ({len(x)})")
        if len(y) and (y.min() < 0 or y.max() >= 1 << 31):
            raise InputError(f"labels must be in [0, 2^31), got {int(y.min())}..{int(y.max())}")
        if task in s.tasks:
            classes = s.bundle.task(task)["classes"]
            bad = sorted(set(y.tolist()) - set(classes))
            if bad:
                raise InputError(f"label(s) {bad[:10]} are not classes of task {task!r} {classes}")
        n = self.cfg.store.max_pending_samples
        per = self.store.task_samples()
        pending = sum(t.count for name, t in per.items() if name not in s.tasks)
        if task not in s.tasks and pending + len(x) > n:
            raise Busy(f"sample store full: {pending} samples wait for learning, the limit is {n} "
                       f"(store.max_pending_samples); nothing was stored")
        first, last = self.store.add_samples(task, x, y)
        self.counters["samples_stored"] += len(x)
        self._wake.set()
        have = per.get(task)
        return {"task": task, "stored": len(x), "ids": [first, last],
                "task_samples": (have.count if have else 0) + len(x),
                "learned": task in s.tasks}

    # -- the policy, jobs ---------------------------------------------------------------
    def decide(self, manual: bool = False) -> Decision:
        s = self.session
        tasks = s.tasks if s is not None else []
        samples = self.store.task_samples()
        last = {t: j for t in samples if (j := self.store.last_job(t)) is not None}
        spent = self.store.energy_since(time.time() - self.cfg.policy.energy_window_s)
        busy = self.job_id is not None
        return self.policy.decide(samples, bundle_tasks=tasks, last_infer=self.last_infer,
                                  energy_spent=spent, busy=busy, last_jobs=last, manual=manual)

    def request_learning(self, task: str | None, force: bool = False) -> dict:
        """POST /learn: queue a job for ``task`` (default: the task the policy would pick,
        without its sample-count and idle checks). ``force`` also skips the power, thermal
        and energy checks when the job starts."""
        s = self._session()
        d = self.decide(manual=True)
        active = self.store.active_jobs()
        if active:
            raise Conflict(f"job {active[0]['id']} ({active[0]['task']!r}) is {active[0]['state']}; "
                           "one job at a time")
        if task is None:
            task = d.task
            if task is None:
                why = {k: v.get("waiting") for k, v in d.candidates.items() if v.get("waiting")}
                raise Conflict("no task is ready to learn" + (f": {json.dumps(why)}" if why else
                                                               ": no samples of a new task in the store"))
        if task in s.tasks:
            raise Conflict(f"task {task!r} is already in the bundle (version {s.bundle.version})")
        info = d.candidates.get(task)
        if info is None:
            raise NotFound(f"no samples of task {task!r} in the store")
        waiting = [w for w in info.get("waiting", []) if not w.startswith("job ")]
        if waiting:
            raise Conflict(f"task {task!r} cannot be learned yet: {'; '.join(waiting)}")
        job = self._queue(task, "manual-force" if force else "manual")
        return {"job": job, "task": task, "state": "queued", "checks": {k: c.as_dict() for k, c in
                                                                        d.checks.items()}}

    def _queue(self, task: str, trigger: str) -> int:
        ts = self.store.task_samples()[task]
        job = self.store.add_job(task, trigger, self.cfg.learn.method, ts.max_id, ts.count)
        self._wake.set()
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgecl-learning", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        p = self.job_proc
        if p is not None and p.poll() is None:
            _kill_group(p.pid, signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # the loop must outlive any one bad tick; it is reported
                self.last_tick_error = f"{type(e).__name__}: {e}"
                print(f"edgecl daemon: learning loop: {self.last_tick_error}", file=sys.stderr, flush=True)
            self._wake.wait(self.cfg.policy.check_interval_s)
            self._wake.clear()

    def tick(self) -> int | None:
        """One policy check: queue a job when the policy says so, run the next queued job
        when the safety checks pass. Returns the job run, if any."""
        if self.session is None or self._stop.is_set():
            return None
        d = self.decide()
        self.last_decision = d
        active = self.store.active_jobs()
        if not active and d.go and d.task is not None:
            self._queue(d.task, "policy")
            active = self.store.active_jobs()
        if not active:
            return None
        job = active[0]
        if job["trigger"] != "manual-force":
            safety = {k: c for k, c in self.decide(manual=True).checks.items()
                      if k in ("energy", "power", "thermal") and not c.ok}
            if safety:
                return None
        self.run_job(job["id"])
        return job["id"]

    # -- running one job -----------------------------------------------------------------
    def _job_dir(self, job_id: int) -> Path:
        return self.jobs_dir / f"{job_id:06d}"

    def run_job(self, job_id: int) -> dict:
        job = self.store.job(job_id)
        lc = self.cfg.learn
        jd = self._job_dir(job_id)
        samples = jd / "samples.npz"
        if not samples.is_file():  # frozen once: a resumed job learns from the same bytes
            self.store.export_npz(job["task"], job["max_sample_id"], samples)
        result = jd / "result.json"
        result.unlink(missing_ok=True)
        spec = {"bundle": str(self.root), "task": job["task"], "samples": str(samples), "result": str(result),
                "tmp": str(jd / "tmp"), "nice": lc.nice,
                "learn": {"method": lc.method, "epochs": lc.epochs, "ram_mb": lc.ram_mb,
                          "energy_j": lc.energy_j, "seed": lc.seed, "batch_size": lc.batch_size,
                          "holdout": lc.holdout,
                          "meter": lc.meter, "meter_root": self.cfg.policy.sysfs_root,
                          "train_last": lc.train_last, "debug_alloc_mb": lc.debug_alloc_mb}}
        (jd / "job.json").write_text(json.dumps(spec, indent=1))
        attempts = job["attempts"] + 1
        version_before = Bundle.open(self.root, verify=False).version
        self.store.update_job(job_id, state="running", started=time.time(), attempts=attempts,
                              samples_path=str(samples), version_before=version_before, error=None)
        self.job_id, self.job_started = job_id, time.time()
        try:
            with open(jd / "worker.log", "ab") as log:
                env = dict(os.environ, EDGECL_DAEMON_PID=str(os.getpid()))
                cmd = [sys.executable, "-m", "edgecl.runtime.daemon.worker", str(jd / "job.json")]
                proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
                self.job_proc = proc
                self.store.update_job(job_id, pid=proc.pid)
                try:
                    proc.wait(timeout=lc.timeout_s)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid, signal.SIGKILL)
                    proc.wait()
            try:
                res = json.loads(result.read_text())
            except (OSError, ValueError):
                res = {"status": "crashed", "error": f"the worker exited with code {proc.returncode} and no "
                                                     f"result (see {jd / 'worker.log'})"}
            return self._finish(job_id, res, proc.returncode)
        finally:
            self.job_id, self.job_proc = None, None

    def _finish(self, job_id: int, res: dict, code: int | None) -> dict:
        job = self.store.job(job_id)
        report = res.get("report") or {}
        joules = float(report.get("joules_this_run") or report.get("joules") or 0.0)
        if joules:
            self.store.add_energy(job_id, joules)
        if report.get("peak_rss_bytes"):
            self.peak_rss_bytes = max(self.peak_rss_bytes, int(report["peak_rss_bytes"]))
            self.store.update_job(job_id, peak_rss=int(report["peak_rss_bytes"]))
        self.store.update_job(job_id, runs=job["runs"] + 1, report=report or None)
        status = res.get("status")
        if status == "paused":
            self.store.update_job(job_id, state="queued",
                                  error="paused: the energy budget of the run is spent")
            return self._count(self.store.job(job_id), "paused")
        if status == "committed":
            return self._validate(job_id, report.get("versions", [None])[-1], report.get("holdout_acc"))
        # no commit reported: did one happen anyway (killed after the commit)?
        committed = self._commit_of(job["task"])
        if committed is not None:
            return self._validate(job_id, committed[0], committed[1])
        if status == "crashed" and self._stop.is_set():  # a stop, not a crash: resume at the next start
            self.store.update_job(job_id, state="queued", attempts=max(job["attempts"] - 1, 0),
                                  error="stopped with the daemon; resumes at the next start")
            return self._count(self.store.job(job_id), "interrupted")
        if status == "crashed" and job["attempts"] < self.cfg.learn.max_attempts:
            self.store.update_job(job_id, state="queued", error=res.get("error"))
            return self._count(self.store.job(job_id), "interrupted")
        why = res.get("error") or f"exit code {code}"
        kind = res.get("error_type", "")
        if res.get("errno") == errno.ENOSPC:
            why = f"disk full during learning or commit, the bundle stays at its previous version: {why}"
        elif kind == "RamBudgetError":
            why = f"RAM budget: {why}"
        self.store.update_job(job_id, state="failed", finished=time.time(), error=why)
        return self._count(self.store.job(job_id), "failed")

    def _count(self, job: dict, outcome: str) -> dict:
        runs = self.counters["learning_runs"]
        runs[outcome] = runs.get(outcome, 0) + 1
        return job

    def _commit_of(self, task: str) -> tuple[int, float | None] | None:
        """(version, held-out accuracy) of the commit that added ``task``, from the bundle's
        log, when the task is in the current version; None otherwise."""
        b = Bundle.open(self.root, verify=False)
        if task not in b.task_names:
            return None
        version = next((e["version"] for e in reversed(b.log) if f"task:{task}" in e.get("parts", [])),
                       b.version)
        return int(version), b.task(task).get("metrics", {}).get("device_acc")

    def _validate(self, job_id: int, version: int | None, acc: float | None) -> dict:
        """After a commit: held-out accuracy >= the minimum, then the hot swap with old tasks'
        canary outputs byte-identical; else roll back to the version before the commit."""
        job = self.store.job(job_id)
        minimum = self.cfg.learn.min_holdout_acc
        with self._bundle_lock:
            why = None
            if acc is None and minimum > 0:
                why = "no held-out accuracy was reported"
            elif acc is not None and acc < minimum:
                why = f"held-out accuracy {acc:.4f} < learn.min_holdout_acc {minimum:.4f}"
            if why is None:
                if version is not None and self.session.bundle.version >= version:
                    # recovery after a restart: the commit is what this daemon loaded, so compare
                    # the version before it with it, on the numpy reference for both
                    changed = self._changed_between(version - 1, version)
                else:
                    changed = self._swap(check_old=True)
                if changed:
                    why = f"old task(s) {changed} answer differently on the canary inputs after the commit"
            if why is None:
                self.store.update_job(job_id, state="committed", finished=time.time(), version_after=version,
                                      holdout_acc=acc, error=None)
                return self._count(self.store.job(job_id), "committed")
            note = self._undo(job["task"], version)
            self.store.update_job(job_id, state="rejected", finished=time.time(), version_after=version,
                                  holdout_acc=acc, error=f"{why}; {note}")
            return self._count(self.store.job(job_id), "rejected")

    def _changed_between(self, before: int, after: int) -> list[str]:
        """Old tasks whose canary logits differ between two retained versions."""
        from ..session import Runtime

        a, b = Runtime(self.root, version=before), Runtime(self.root, version=after)
        return [t for t in a.tasks if t in b.tasks
                and a.logits(self._canary, t).tobytes() != b.logits(self._canary, t).tobytes()]

    def _undo(self, task: str, version: int | None) -> str:
        from ..bundle_write import rollback

        b = Bundle.open(self.root, verify=False)
        if version is None or task not in b.task_names:
            return "nothing to roll back"
        if b.version != version:
            return f"not rolled back: the bundle moved on to version {b.version} after the commit {version}"
        new = rollback(self.root, version - 1)
        self.counters["rollbacks"] += 1
        self._swap(check_old=False)
        return f"rolled back to version {version - 1}'s contents as version {new}"

    def rollback(self, to: int | None) -> dict:
        """POST /rollback: a new version with version ``to``'s contents (default: the one
        before the current)."""
        from ..bundle_write import rollback

        self._session()
        if self.job_id is not None:
            raise Conflict(f"job {self.job_id} is learning; roll back when it is done")
        with self._bundle_lock:
            b = Bundle.open(self.root, verify=False)
            versions = b.versions()
            if to is None:
                older = [v for v in versions if v < b.version]
                if not older:
                    raise Conflict(f"version {b.version} is the only version retained; nothing to roll "
                                   "back to")
                to = max(older)
            if to >= b.version or (versions and to not in versions):
                raise NotFound(f"cannot roll back to version {to}: retained versions are {versions}, "
                               f"current is {b.version}")
            new = rollback(self.root, to)
            self.counters["rollbacks"] += 1
            self._swap(check_old=False)
        return {"version": new, "contents_of": to, "tasks": self.session.tasks}

    # -- recovery ------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """After a restart (and :meth:`load`): a job left ``running`` was interrupted. Kill
        what is left of its process group, then finish it from the bundle's log (validate,
        roll back if it fails) or queue it again."""
        if self.session is None:
            raise EdgeclError("recover() needs the session: call load() first")
        notes = []
        # what a killed daemon's job left running: its worker and the learner's child (whose
        # command line names the job's temp dir, under jobs_dir), whether or not a pid was recorded
        _kill_matching(str(self.jobs_dir).encode(), signal.SIGKILL)
        for job in self.store.jobs("state = 'running'"):
            if job.get("pid"):
                _kill_group(int(job["pid"]), signal.SIGKILL, only_ours=True)
            res = {"status": "crashed", "error": "interrupted: the daemon stopped while the job ran"}
            self._finish(job["id"], res, None)
            notes.append(f"job {job['id']} ({job['task']}): {self.store.job(job['id'])['state']}")
        self.recovered = True
        return notes

    # -- status --------------------------------------------------------------------------
    def status(self) -> dict:
        s = self.session
        d = self.decide() if s is not None else None
        jobs = self.store.jobs(limit=10)
        running = None
        if self.job_id is not None:
            running = {"job": self.job_id, "seconds": round(time.time() - self.job_started, 1),
                       "progress": _progress(self._job_dir(self.job_id) / "worker.log")}
        lc = self.cfg.learn
        return {
            "bundle": str(self.root), "ready": s is not None, "load_error": self.load_error,
            "version": s.bundle.version if s else None, "provider": s.provider if s else None,
            "input_shape": list(s.input_shape) if s else None,
            "tasks": [{"name": t["name"], "classes": t.get("classes"), "method": t.get("method"),
                       "device_acc": (t.get("metrics") or {}).get("device_acc")} for t in s.bundle.tasks]
            if s else [],
            "versions": s.bundle.versions() if s else [],
            "uptime_s": round(time.time() - self.started, 1),
            "samples": {k: v for k, v in (d.candidates.items() if d else [])},
            "samples_total": self.counters["samples_stored"],
            "policy": d.as_dict() if d else None,
            "learning": running,
            "queue": [{"job": j["id"], "task": j["task"], "state": j["state"], "trigger": j["trigger"]}
                      for j in self.store.active_jobs()],
            "jobs": [{k: j.get(k) for k in ("id", "task", "state", "trigger", "attempts", "runs",
                                            "version_before", "version_after", "holdout_acc", "joules",
                                            "peak_rss", "error")}
                     for j in jobs],
            "budgets": {"ram_mb": lc.ram_mb, "energy_j_per_run": lc.energy_j,
                        "energy_budget_j": self.cfg.policy.energy_budget_j or None,
                        "energy_window_s": self.cfg.policy.energy_window_s,
                        "energy_spent_window_j": round(self.store.energy_since(
                            time.time() - self.cfg.policy.energy_window_s), 3),
                        "energy_spent_total_j": round(self.store.energy_total(), 3),
                        "min_holdout_acc": lc.min_holdout_acc},
            "store": {"path": str(self.store.path), "free_mb": round(self.store.free_bytes() / (1 << 20), 1)},
        }


def _progress(log: Path) -> str | None:
    """The learner's last progress line (it prints one a second when tqdm is absent)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 2048))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", tail) if ln.strip()]
    return lines[-1][-200:] if lines else None


def _kill_matching(needle: bytes, sig: int) -> int:
    """Signal every process (not this one) whose command line contains ``needle``."""
    n = 0
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmd and b"edgecl" in cmd:
            try:
                os.kill(int(proc.name), sig)
                n += 1
            except (ProcessLookupError, PermissionError):
                pass
    return n


def _kill_group(pgid: int, sig: int, only_ours: bool = False) -> None:
    """Signal the worker's process group (the worker and the learner's child). With
    ``only_ours`` (a pid from an earlier run of the daemon: it may have been reused), only
    processes of that group whose command line runs edgecl."""
    if not only_ours:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        return
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            pgrp = int(stat.rsplit(")", 1)[1].split()[2])
            cmd = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if pgrp == pgid and b"edgecl" in cmd:
            try:
                os.kill(int(proc.name), sig)
            except (ProcessLookupError, PermissionError):
                pass


__all__ = ["Busy", "Conflict", "Daemon", "NotFound", "StoreError", "StoreFull"]
