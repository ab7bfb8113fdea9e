"""The learning child process: ``python -m edgecl.runtime.learn.child JOB_DIR``.

The parent (:mod:`.learner`) starts it with a hard address-space limit
(``RLIMIT_AS`` = the measured baseline of a bare child + the RAM budget). It reads
``JOB_DIR/job.json`` and ``JOB_DIR/samples.npz``, opens the bundle read-only, learns, and
writes ``JOB_DIR/result.json`` (+ ``result.safetensors`` when done). Exit codes:
0 done, 3 paused (energy budget spent; a checkpoint was written), 4 out of memory
(the address-space limit was hit), 1 any other error. It imports no torch.

``--probe`` imports everything a real child imports, runs a BLAS call (so OpenBLAS'
threads and buffers exist) and prints the address space in bytes (``VmPeak``, the
baseline the parent adds the budget to) and the peak RSS (``VmHWM``: what the plan does
not count). ``--probe --tvm-step BUNDLE VERSION`` then also loads the bundle's compiled
training step for this machine, as the child would, and runs it twice: the growth of the
peak RSS and of the address space past that baseline (the backbone already paged in, as
the plan's ``weights`` count it) is the step's share — the TVM runtime and the library
mapped, its workspace, its aligned copies of the parameters (``step``, or ``step.error``
when it cannot load or run).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

from ... import kernels
from ..bundle import Bundle
from ..session import activate, owned_union
from . import energy, trainer
from .methods import get_method
from .progress import Progress, peak_rss_bytes

EXIT_DONE, EXIT_ERROR, EXIT_PAUSED, EXIT_MEMORY = 0, 1, 3, 4


def vm_bytes(key: str = "VmPeak") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    """VmHWM back to the current RSS (Linux: ``clear_refs`` 5), so a later peak is the
    probe's own; False where that is not possible (the peak then may include earlier ones:
    a larger, still safe, share)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_tvm_step(path: str, version: int) -> dict:
    """The compiled training step's share of a child (see the module docstring)."""
    from ..backends.tvm_train import load_train_step

    bundle = Bundle.open(path, version=version, verify=False)  # the parent verified it
    graph = bundle.graph
    params = {n: bundle.backbone[n] for n in graph.params}
    for a in params.values():  # paged in: that is the plan's ``weights``, not the step's
        np.add.reduce(a.reshape(-1))
    rss0, size0 = vm_bytes("VmRSS"), vm_bytes("VmSize")
    exact = _reset_peak_rss()
    step = load_train_step(bundle)
    classes = min(2, step.head_rows)
    head = (np.zeros((classes, graph.feature_dim), np.float32), np.zeros(classes, np.float32))
    x = np.zeros((1, *graph.input_shape), np.dtype(graph.input.dtype))
    for _ in range(2):  # the second call on the VM's pooled memory, as every later step
        step(x, np.zeros(1, np.int64), params, head)
    return {"backend": "tvm", "rss": max(0, vm_bytes("VmHWM") - rss0),
            "address_space": max(0, vm_bytes("VmPeak") - size0), "exact_peak": exact}


def probe(tvm_step: tuple[str, int] | None = None) -> int:
    a = np.ones((256, 256), dtype=np.float32)
    (a @ a).sum()
    kernels.popcount(np.ones(8, dtype=np.uint8))
    out = {"vm_peak": vm_bytes("VmPeak"), "vm_size": vm_bytes("VmSize"), "rss_peak": peak_rss_bytes()}
    if tvm_step is not None:
        try:
            out["step"] = probe_tvm_step(*tvm_step)
        except Exception as e:  # noqa: BLE001 - the child falls back (auto) or fails (tvm) alike
            out["step"] = {"backend": "tvm", "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    return 0


def _write(job_dir: Path, doc: dict) -> None:
    (job_dir / "result.json").write_text(json.dumps(doc))


def main(job_dir: Path) -> int:
    job = json.loads((job_dir / "job.json").read_text())
    t0 = time.monotonic()
    stats = {"status": "error"}
    try:
        if job.get("debug_alloc_mb"):  # tests: a learner that needs more than planned
            waste = np.ones(int(job["debug_alloc_mb"] * 2**20 // 8))
            waste[::512] = 2.0
        with np.load(job_dir / "samples.npz") as z:
            x, y = z["x"], z["y"]
        # the parent verified every file's sha256; files are immutable and content-addressed
        bundle = Bundle.open(job["bundle"], version=job["version"], verify=False)
        method = get_method(job["method"])
        old = owned_union(bundle) if method.needs_owned else {}
        source, src_params, graph = None, None, bundle.graph
        if method.needs_source:  # a new head on an existing task's parameters, whatever its kind
            active = activate(bundle, job["source_task"])
            source, src_params, graph = bundle.task_tensors(job["source_task"]), active.params, active.graph
        prob = trainer.Problem(graph, bundle.backbone, old, x, y, job["n_classes"], method,
                               job["hp"], job["batch_size"], job["seed"], source,
                               train_last=job.get("train_last"), prefix_cache=bool(job.get("prefix_cache")),
                               source_params=src_params)
        backend, step = trainer.select_step(bundle, job.get("step_backend", "auto"))
        ckpt = Path(job["checkpoint"])
        if job["resume"]:
            state, meta = trainer.load_checkpoint(ckpt)
        else:
            state = prob.initial()
        meter = energy.make_meter(job["meter"], job.get("meter_root", "/"))
        meter.start()
        j0 = float(state.pos.get("joules", 0.0))
        s0 = float(state.pos.get("seconds", 0.0))
        steps0 = int(state.pos["steps"])
        budget = job.get("energy_j")
        spent = [0.0]
        bar = Progress(prob.total_steps(), steps0, quiet=job.get("quiet", False))
        t_start = time.monotonic()

        def on_step(s: trainer.State, loss: float) -> None:
            spent[0] = meter.joules()
            s.pos["joules"] = j0 + spent[0]
            s.pos["seconds"] = s0 + time.monotonic() - t_start
            s.pos["last_loss"] = float(loss)
            bar.update(loss, prob.bs, s.pos["joules"])

        finished = trainer.run(prob, state, step, on_step=on_step,
                               out_of_energy=lambda: budget is not None and spent[0] >= budget)
        bar.close()
        stats = {"steps": int(state.pos["steps"]), "steps_this_run": int(state.pos["steps"]) - steps0,
                 "total_steps": prob.total_steps(), "joules": float(state.pos["joules"]),
                 "joules_this_run": spent[0], "meter": meter.describe(), "meter_estimate": meter.estimate,
                 "seconds": float(state.pos["seconds"]), "seconds_this_run": time.monotonic() - t_start,
                 "last_loss": state.pos.get("last_loss"),
                 "step_backend": getattr(step, "backend", backend),  # auto: numpy if tvm failed
                 "step_fallback": getattr(step, "fallback_reason", None),
                 "trained_sites": prob.trainable, "kernels": kernels.status()}
        if not finished:
            trainer.save_checkpoint(ckpt, state, job["fingerprint"])
            stats.update(status="paused", checkpoint=str(ckpt), peak_rss=peak_rss_bytes())
            _write(job_dir, stats)
            return EXIT_PAUSED
        tensors, backbone = prob.result(state)
        out = {f"task.{k}": v for k, v in tensors.items()}
        out.update({f"backbone.{k}": np.asarray(v, order="C") for k, v in (backbone or {}).items()})
        (job_dir / "result.safetensors").write_bytes(st_save(out))
        stats.update(status="done", peak_rss=peak_rss_bytes(), wall_s=time.monotonic() - t0)
        _write(job_dir, stats)
        return EXIT_DONE
    except MemoryError:
        waste = None  # noqa: F841 - free what we can, then say why we stop
        _write(job_dir, {"status": "memory", "error": "MemoryError: the address-space limit was hit",
                         "peak_rss": peak_rss_bytes()})
        return EXIT_MEMORY
    except Exception as e:  # reported by the parent
        _write(job_dir, {"status": "error", "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()})
        return EXIT_ERROR


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        sys.exit(probe())
    if sys.argv[1:3] == ["--probe", "--tvm-step"] and len(sys.argv) == 5:
        sys.exit(probe((sys.argv[3], int(sys.argv[4]))))
    sys.exit(main(Path(sys.argv[1])))
