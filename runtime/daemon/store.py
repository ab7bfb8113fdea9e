"""The durable store: labelled samples and learning jobs in one SQLite file.

WAL journal, ``synchronous=FULL``: a sample is on disk (its WAL frame fsynced) when
:meth:`Store.add_samples` returns, and the API answers only after that, so every
acknowledged sample survives a SIGKILL or a power cut. A job's state lives here too, so a
restarted daemon finds an interrupted job and resumes it.

A sample is ``x`` (the model's input, float32 or int64 little-endian bytes, C order) and
``y``, a *global* label id (as in ``edgecl learn``'s ``.npz``). Jobs move through
``queued -> running -> (paused -> queued) -> committed | rejected | failed``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeclError

SCHEMA_VERSION = 1
ACTIVE = ("queued", "running")
DONE = ("committed", "rejected", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task TEXT NOT NULL,
    label INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    x BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_task ON samples (task, id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task TEXT NOT NULL,
    state TEXT NOT NULL,
    trigger TEXT NOT NULL,
    method TEXT NOT NULL,
    max_sample_id INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    samples_path TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    version_before INTEGER,
    version_after INTEGER,
    holdout_acc REAL,
    joules REAL NOT NULL DEFAULT 0,
    peak_rss INTEGER,
    report TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_task ON jobs (task, id);
CREATE TABLE IF NOT EXISTS energy (t REAL NOT NULL, job INTEGER NOT NULL, joules REAL NOT NULL);
"""


class StoreError(EdgeclError):
    """The store cannot be opened or written."""


class StoreFull(StoreError):
    """The store's disk is full (or below the configured free space): nothing was stored."""


@dataclass
class TaskSamples:
    task: str
    count: int
    max_id: int
    per_class: dict[int, int]


def _full(e: BaseException) -> bool:
    text = str(e).lower()
    return "full" in text or "no space" in text or getattr(e, "errno", None) == 28


class Store:
    """One connection, one lock: FastAPI runs sync endpoints on a thread pool, and the
    policy loop and the job runner read and write from their own threads."""

    def __init__(self, path: str | Path, *, min_free_bytes: int = 0) -> None:
        self.path = Path(path)
        self.min_free_bytes = int(min_free_bytes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                      timeout=30.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: store schema {row[0]}, this edgecl reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            if _full(e):
                raise StoreFull(f"{self.path}: the disk is full: {e}") from e
            raise StoreError(f"{self.path}: cannot open the sample store: {e}") from e
        mode = self.db.execute("PRAGMA journal_mode").fetchone()[0]
        sync = self.db.execute("PRAGMA synchronous").fetchone()[0]
        if mode.lower() != "wal" or int(sync) != 2:
            raise StoreError(f"{self.path}: expected WAL with synchronous=FULL, got {mode} / {sync}")

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed (WAL fsynced) on exit, rolled back on any error."""
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                yield self.db
                self.db.execute("COMMIT")
            except BaseException as e:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                if isinstance(e, sqlite3.DatabaseError) and _full(e):
                    raise StoreFull(f"{self.path}: the disk is full, nothing was stored: {e}") from e
                if isinstance(e, sqlite3.DatabaseError):
                    raise StoreError(f"{self.path}: {e}") from e
                raise

    def free_bytes(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    # -- samples -------------------------------------------------------------------------
    def add_samples(self, task: str, x: np.ndarray, y: np.ndarray) -> tuple[int, int]:
        """Store ``len(x)`` samples of ``task`` durably; returns (first id, last id)."""
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x has {len(x)} rows and y {len(y)}; need the same, > 0")
        need = x.nbytes * 2 + (1 << 20)
        if self.min_free_bytes and self.free_bytes() - need < self.min_free_bytes:
            raise StoreFull(f"{self.path.parent}: {self.free_bytes() / (1 << 20):.1f} MiB free, the store "
                            f"keeps at least {self.min_free_bytes / (1 << 20):.1f} MiB free "
                            "(store.min_free_mb); nothing was stored")
        x = np.ascontiguousarray(x)
        dtype, shape, now = x.dtype.newbyteorder("<").str, json.dumps(list(x.shape[1:])), time.time()
        rows = [(task, int(label), dtype, shape, row.astype(dtype, copy=False).tobytes(), now)
                for row, label in zip(x, y, strict=True)]
        with self._tx() as c:
            c.executemany("INSERT INTO samples (task, label, dtype, shape, x, created) "
                          "VALUES (?, ?, ?, ?, ?, ?)", rows)
            last = c.execute("SELECT last_insert_rowid()").fetchone()[0]
        return int(last) - len(rows) + 1, int(last)

    def task_samples(self) -> dict[str, TaskSamples]:
        with self._lock:
            rows = self.db.execute("SELECT task, label, COUNT(*), MAX(id) FROM samples GROUP BY task, label"
                                   ).fetchall()
        out: dict[str, TaskSamples] = {}
        for task, label, n, mx in rows:
            t = out.setdefault(task, TaskSamples(task, 0, 0, {}))
            t.count += n
            t.max_id = max(t.max_id, mx)
            t.per_class[int(label)] = n
        return out

    def count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def samples(self, task: str, up_to_id: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, x, y) of ``task`` (ids <= ``up_to_id``), in id order."""
        q = "SELECT id, label, dtype, shape, x FROM samples WHERE task = ?"
        args: tuple = (task,)
        if up_to_id is not None:
            q += " AND id <= ?"
            args = (task, int(up_to_id))
        with self._lock:
            rows = self.db.execute(q + " ORDER BY id", args).fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0,), np.float32), np.zeros(0, np.int64)
        dtype, shape = rows[0][2], tuple(json.loads(rows[0][3]))
        bad = [r[0] for r in rows if r[2] != dtype or tuple(json.loads(r[3])) != shape]
        if bad:
            raise StoreError(f"{self.path}: samples {bad[:5]} of task {task!r} differ in dtype or shape "
                             f"from sample {rows[0][0]} ({dtype} {shape})")
        x = np.frombuffer(b"".join(r[4] for r in rows), dtype=np.dtype(dtype)).reshape(len(rows), *shape)
        return (np.array([r[0] for r in rows], np.int64), x, np.array([r[1] for r in rows], np.int64))

    def export_npz(self, task: str, up_to_id: int, path: Path) -> int:
        """The task's samples as ``edgecl learn``'s ``.npz`` (``x``, ``y``), written
        atomically; returns how many."""
        _, x, y = self.samples(task, up_to_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, x=x, y=y)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return len(x)

    # -- jobs ----------------------------------------------------------------------------
    def add_job(self, task: str, trigger: str, method: str, max_sample_id: int, n_samples: int) -> int:
        with self._tx() as c:
            c.execute("INSERT INTO jobs (task, state, trigger, method, max_sample_id, n_samples, created) "
                      "VALUES (?, 'queued', ?, ?, ?, ?, ?)", (task, trigger, method, max_sample_id, n_samples,
                                                               time.time()))
            return int(c.execute("SELECT last_insert_rowid()").fetchone()[0])

    def update_job(self, job_id: int, **fields) -> None:
        if not fields:
            return
        if "report" in fields and not isinstance(fields["report"], (str, type(None))):
            fields["report"] = json.dumps(fields["report"], default=str)
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as c:
            c.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def add_energy(self, job_id: int, joules: float) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO energy VALUES (?, ?, ?)", (time.time(), job_id, float(joules)))
            c.execute("UPDATE jobs SET joules = joules + ? WHERE id = ?", (float(joules), job_id))

    def energy_since(self, t: float) -> float:
        with self._lock:
            return float(self.db.execute("SELECT COALESCE(SUM(joules), 0) FROM energy WHERE t >= ?",
                                         (t,)).fetchone()[0])

    def energy_total(self) -> float:
        with self._lock:
            return float(self.db.execute("SELECT COALESCE(SUM(joules), 0) FROM energy").fetchone()[0])

    def job(self, job_id: int) -> dict | None:
        rows = self.jobs(where="id = ?", args=(job_id,))
        return rows[0] if rows else None

    def jobs(self, where: str = "1", args: tuple = (), limit: int = 1000) -> list[dict]:
        with self._lock:
            cur = self.db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY id DESC LIMIT ?",
                                  (*args, limit))
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        out = []
        for r in rows:
            d = dict(zip(names, r, strict=True))
            if d.get("report"):
                d["report"] = json.loads(d["report"])
            out.append(d)
        return out

    def active_jobs(self) -> list[dict]:
        return list(reversed(self.jobs("state IN ('queued', 'running')")))

    def last_job(self, task: str) -> dict | None:
        rows = self.jobs("task = ?", (task,), limit=1)
        return rows[0] if rows else None

    def job_counts(self) -> dict[str, int]:
        with self._lock:
            return {s: n for s, n in self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
