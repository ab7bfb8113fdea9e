"""The learning worker: one process per job run, started by the daemon.

    python -m edgecl.runtime.daemon.worker JOB_DIR/job.json

It calls :func:`edgecl.runtime.learn.learn` (which plans the RAM, learns in its own
budgeted child, checks old tasks on canaries and commits one version) and writes
``result.json`` atomically: ``{"status": "committed" | "paused" | "error", "report",
"error", "error_type", "errno"}``. Its own process: the daemon's event loop never waits
on the learner's checks and commit, and the worker is niced so inference keeps its
latency. It dies with the daemon (``PR_SET_PDEATHSIG``); a restarted daemon kills what is
left of its process group (the learner's child) and decides from the bundle's log.

A paused job (the energy budget of a run spent) left a checkpoint; the next run resumes
it (``resume=True``). A checkpoint made with other settings (the config changed between
runs) is discarded and the job starts over, which the report says.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path


def _die_with_parent() -> None:
    """SIGKILL this process when the daemon dies (Linux; elsewhere a no-op)."""
    want = os.environ.get("EDGECL_DAEMON_PID")
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if want and os.getppid() != int(want):  # the daemon died before prctl: go too
        os._exit(1)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run(spec: dict) -> dict:
    from ..bundle_write import safe_name
    from ..learn import learn, trainer
    from ..learn import learner as L

    root = Path(spec["bundle"])
    task = spec["task"]
    work = root / L.WORK_DIR / safe_name(task)
    kw = dict(spec["learn"])
    notes = []
    resume = (work / trainer.CHECKPOINT).is_file()
    try:
        report = learn(root, task, spec["samples"], resume=resume, quiet=False, **kw)
    except L.LearnError as e:
        if not (resume and "the checkpoint was made with other" in str(e)):
            raise
        notes.append(f"checkpoint discarded: {e}")
        shutil.rmtree(work, ignore_errors=True)
        report = learn(root, task, spec["samples"], resume=False, quiet=False, **kw)
    report["resumed"] = resume
    if notes:
        report["notes"] = notes
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    spec = json.loads(Path(argv[0]).read_text())
    result = Path(spec["result"])
    if spec.get("nice"):
        try:
            os.nice(int(spec["nice"]))
        except OSError:
            pass
    tmp = Path(spec["tmp"])
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left (the learner's temp dir)
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    import tempfile

    tempfile.tempdir = str(tmp)
    try:
        report = run(spec)
        out = {"status": report["status"], "report": report}
        code = 3 if report["status"] == "paused" else 0
    except BaseException as e:  # every failure is reported to the daemon, then the exit code says it too
        out = {"status": "error", "error": str(e) or type(e).__name__, "error_type": type(e).__name__,
               "errno": getattr(e, "errno", None), "traceback": traceback.format_exc()[-4000:]}
        code = 2
    try:
        _write(result, out)
    except OSError as e:  # a full disk may refuse even this: the exit code and stderr remain
        print(f"edgecl worker: cannot write {result}: {e}; result was {out.get('status')}: "
              f"{out.get('error')}", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
