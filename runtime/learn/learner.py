"""Learning a new task on the device: plan, learn in a budgeted child, verify, commit.

    from edgecl.runtime.learn import learn
    report = learn("bundle/", "digits-8-9", "samples.npz", method="supsup", ram_mb=64)

1. Open the bundle: the one check of every file's sha256 in a learning (the child, the
   probe, the runtimes and the transaction read the files this check covered: they are
   immutable and content-addressed). Read the samples (``x``, ``y`` global labels;
   ``classes`` = sorted unique ``y``) and hold out a seeded split for the report's accuracy.
   What the method (``--method``) differs in is its :class:`.methods.LearnMethod`.
2. Plan the RAM (:mod:`.planner`): pick the largest batch <= ``batch_size`` that fits
   ``ram_mb``, or refuse with the minimum; keep the frozen prefix's output per sample
   (the prefix cache) when that still fits. When the bundle's compiled training step may
   run, a probe child measures its share first.
3. Compute every old task's logits on canary inputs through the runtime (once).
4. Learn in a child process with ``RLIMIT_AS`` = baseline of a bare child + the child's
   part of the budget (:mod:`.child`); it draws on the energy budget and checkpoints when
   it is spent.
5. Verify on the candidate (new backbone + old masks, in memory, through the runtime's
   own activation) that every old task's canary logits are byte-identical (once more,
   the only other pass); refuse otherwise. Then refit the routers on the candidate with
   the new task's data only, and commit the task and the routers as one version.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import heap
from ..bundle import Bundle
from ..bundle_write import Transaction, safe_name
from ..errors import EdgeclError
from ..kinds import get_kind
from ..samples import read_labelled_npz
from ..session import Runtime, owned_union
from . import planner, trainer
from .methods import LEARN_METHODS, LearnMethod, site_trainers

METHODS = tuple(LEARN_METHODS)
WORK_DIR = ".learn"
MiB = 1 << 20
AS_SLACK = 16 * MiB  # allocator arenas and page rounding above the measured baseline
# Canaries run this many rows at a time: the parent's forward then holds one such batch's
# activations (a 64-row batch through MobileNetV2 was more than the child's whole step).
# Before and after run the same batches, so their bytes compare exactly.
CANARY_BATCH = 16


class LearnError(EdgeclError):
    """Learning on the device cannot start, or its result cannot be committed."""


class RamBudgetError(LearnError):
    """The RAM budget is below the plan's minimum, or the child exceeded it."""


class ForgettingError(LearnError):
    """An old task's outputs would change: the commit is refused."""


def child_env() -> dict:
    """The environment the learner child runs in (also the bench's device variant)."""
    env = dict(os.environ)
    # One glibc arena: each extra one reserves 64 MiB of address space, and a thread the
    # probe did not start (a library's helper) would make one past the child's RLIMIT_AS.
    env.setdefault("MALLOC_ARENA_MAX", "1")
    # Freed heap kept for the next step (edgecl.runtime.heap: with glibc's defaults each
    # step's arrays are new mappings whose pages fault in again, about half of a DS-CNN step)
    for var, value in heap.ENV.items():
        env.setdefault(var, value)
    # One BLAS thread: the layers are small (threads cost more than they give, and spin
    # against other work on a busy device); also a smaller, steadier baseline address space.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def probe_child(tvm_step: Bundle | None = None) -> dict:
    """A bare child that imported what the learner imports and ran BLAS: its ``vm_peak``
    (address space) and ``rss_peak``; with ``tvm_step``, also the share of that bundle's
    compiled training step (``step``: ``rss``, ``address_space``, or ``error``)."""
    cmd = [sys.executable, "-m", "edgecl.runtime.learn.child", "--probe"]
    if tvm_step is not None:
        cmd += ["--tvm-step", str(Path(tvm_step.root).resolve()), str(tvm_step.version)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120)
    if r.returncode != 0:
        raise LearnError(f"cannot start the learning child: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def baseline_address_space() -> int:
    """VmPeak of a bare child that imported what the learner imports and ran BLAS."""
    return int(probe_child()["vm_peak"])


def _may_run_tvm_step(bundle: Bundle, step_backend: str) -> bool:
    """Whether the child may take the bundle's compiled step (then the plan counts it)."""
    if step_backend not in ("auto", "tvm"):
        return False
    from ..backends.tvm_train import has_train_step

    try:
        return has_train_step(bundle)
    except Exception:  # noqa: BLE001 - no usable target: the numpy step
        return False


def _trainable(bundle: Bundle, m: LearnMethod, n_classes: int, hp: dict, seed: int,
               train_last: int | None) -> list[str]:
    """The sites the child will train (the method's choice, on the old tasks' union)."""
    owned = owned_union(bundle) if m.needs_owned else {}
    one = np.zeros((1, *bundle.graph.input_shape), np.float32)
    return trainer.Problem(bundle.graph, bundle.backbone, owned, one, np.zeros(1, np.int64), n_classes,
                           m, hp, 1, seed, train_last=train_last).trainable


def load_samples(path: str | Path, input_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    path = Path(path)
    x, y, _ = read_labelled_npz(path, LearnError)
    if int(np.prod(x.shape[1:])) != int(np.prod(input_shape)):
        raise LearnError(f"{path}: samples of shape {x.shape[1:]} do not fit the model's input {input_shape}")
    x = np.ascontiguousarray(x.reshape(len(x), *input_shape))
    classes = sorted(int(c) for c in np.unique(y))
    if len(classes) < 2:
        raise LearnError(f"{path}: a task needs at least 2 classes, y holds {classes}")
    local = np.searchsorted(np.asarray(classes), y).astype(np.int64)
    return x, local, classes


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded: (train indices, held-out indices)."""
    rng = np.random.default_rng([seed, 5])
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) > 1:
            n = min(max(n, 1), len(idx) - 1)
        test[idx[:n]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def canary_inputs(input_shape: tuple[int, ...], x: np.ndarray, n: int = 32) -> np.ndarray:
    """Fixed canaries: seeded uniform inputs plus the first new samples."""
    rnd = np.random.default_rng(20240607).random((n, *input_shape), dtype=np.float32)
    return np.concatenate([rnd, x[:n]]).astype(np.float32)


def _old_logits(rt: Runtime, names: list[str], x: np.ndarray) -> dict[str, bytes]:
    """Every task's logits on the canaries, as bytes, :data:`CANARY_BATCH` rows at a time."""
    return {n: b"".join(rt.logits(x[i:i + CANARY_BATCH], n).tobytes() for i in range(0, len(x), CANARY_BATCH))
            for n in names}


def _bytes_of_dir(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def learn(bundle_dir: str | Path, task: str, samples_npz: str | Path, method: str = "supsup",
          epochs: int | None = None, ram_mb: float | None = 256.0, energy_j: float | None = None,
          resume: bool = False, seed: int = 0, *, batch_size: int = 32, lr: float | None = None,
          holdout: float = 0.1, meter: str | dict = "auto", meter_root: str = "/",
          source_task: str | None = None, step_backend: str = "auto", json_path: str | Path | None = None,
          quiet: bool = False, routers: bool = True, debug_alloc_mb: float = 0.0,
          train_last: int | None = None, key="env", force: bool = False) -> dict:
    """Learn ``task`` from ``samples_npz`` and commit it to the bundle; returns the report
    (``status``: ``committed`` or ``paused``). Raises :class:`LearnError` subclasses.

    ``train_last=K`` (supsup, packnet) trains only the last ``K`` mask sites of the graph
    (and the head); the sites before them are frozen — forward only, no gradients, no
    optimizer state — with the dense backbone weights (supsup: an all-ones mask) or the
    old tasks' union (packnet). Default: every site."""
    t_start = time.monotonic()
    root = Path(bundle_dir)
    m = LEARN_METHODS.get(method)
    if m is None:
        raise LearnError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    bundle = Bundle.open(root)  # the learning's one sha256 check of every file
    if task in bundle.task_names:
        raise LearnError(f"{root}: task {task!r} is already in the bundle (version {bundle.version})")
    graph = bundle.graph
    shape = tuple(graph.input_shape)
    x_all, y_all, classes = load_samples(samples_npz, shape)
    same = [t["name"] for t in bundle.tasks if sorted(t["classes"]) == classes]
    if same and not force:  # most likely the same task under a new name (or a mislabelled file)
        raise LearnError(f"{samples_npz}: the new task {task!r} has the classes {classes} of task "
                         f"{same[0]!r} already in the bundle; pass --force to learn it anyway")
    overlap = {t["name"]: sorted(set(t["classes"]) & set(classes)) for t in bundle.tasks}
    overlap = {n: c for n, c in overlap.items() if c and n not in same}
    tr, te = holdout_split(y_all, holdout, seed)
    n_train = len(tr)
    hp = dict(m.defaults)
    if epochs is not None:
        hp["epochs"] = int(epochs)
    if lr is not None:
        hp["lr"] = float(lr)
    src = None
    if m.needs_source:
        src = bundle.task(source_task if source_task is not None else len(bundle.tasks) - 1)["name"]
    elif source_task is not None:
        by = " or ".join(n for n, o in LEARN_METHODS.items() if o.needs_source)
        raise LearnError(f"--source-task is for --method {by}")
    kind = m.task_kind(None if src is None else bundle.task(src)["kind"])
    if method not in get_kind(kind).learners:
        by = ", ".join(get_kind(kind).learners) or "none"
        raise LearnError(f"{root}: --method {method} cannot make a task of kind {kind!r} "
                         f"(that kind is learned on the device by: {by})")
    n_sites = len(graph.mask_sites())
    if train_last is not None:
        if not m.trains_sites:
            raise LearnError(f"--train-last is for --method {' or '.join(site_trainers())} "
                             f"({method} trains no site)")
        if not 1 <= int(train_last):
            raise LearnError(f"--train-last must be at least 1, got {train_last}")
        train_last = min(int(train_last), n_sites)

    # -- work dir, checkpoint, fingerprint ------------------------------------------
    work = root / WORK_DIR / safe_name(task)
    ckpt = work / trainer.CHECKPOINT
    digest = hashlib.sha256(x_all.tobytes() + y_all.tobytes()).hexdigest()
    fingerprint = {"task": task, "method": method, "seed": int(seed), "hp": hp, "holdout": holdout,
                   "samples_sha256": digest, "bundle_version": bundle.version, "source_task": src,
                   "train_last": train_last}
    if resume:
        if not ckpt.is_file():
            raise LearnError(f"{ckpt}: no checkpoint to resume (learning of {task!r} was not paused)")
        _, meta = trainer.load_checkpoint(ckpt)
        want = dict(fingerprint)
        got = {k: meta.get(k) for k in want}
        if json.loads(json.dumps(want)) != got:
            diff = [k for k in want if json.loads(json.dumps(want[k])) != got[k]]
            raise LearnError(f"{ckpt}: the checkpoint was made with other {', '.join(diff)}; "
                             f"resume with the same settings, or delete {work} to start over")
        batch_size = int(meta["batch_size"])
    elif ckpt.is_file():
        raise LearnError(f"{ckpt}: learning of {task!r} was paused here; pass --resume to continue it "
                         f"(or delete {work} to start over)")

    # -- plan ---------------------------------------------------------------------
    bb_bytes = bundle.manifest["files"][bundle.backbone_file()]["bytes"]
    trainable = _trainable(bundle, m, len(classes), hp, seed, train_last)
    why = None if trainable else m.nothing_to_train(train_last)
    if why:
        raise LearnError(f"{root}: {why}")
    canaries = canary_inputs(shape, x_all)
    old_classes = [len(t["classes"]) for t in bundle.tasks]
    have_routers = sorted(bundle.manifest.get("routers", {})) if routers else []
    # the compiled step's share is measured (a probe child) before the plan that counts it
    probe = probe_child(bundle) if _may_run_tvm_step(bundle, step_backend) else None
    step = (probe or {}).get("step") or {}
    step_rss = int(step.get("rss", 0)) if "error" not in step else 0
    step_as_extra = max(0, int(step.get("address_space", 0)) - step_rss) if "error" not in step else 0
    kw = dict(graph=graph, mode=m, n_tasks=len(bundle.tasks), n_classes=len(classes),
              n_samples=len(x_all), trainable_layers=trainable, backbone_bytes=bb_bytes,
              step_runtime=step_rss,
              parent=planner.parent_bytes(graph, n_samples=len(x_all), n_canaries=len(canaries),
                                          old_classes=old_classes),
              commit=planner.commit_bytes(graph, method=m, n_tasks=len(bundle.tasks), n_classes=len(classes),
                                          old_classes=old_classes, n_canaries=len(canaries),
                                          canary_batch=CANARY_BATCH,
                                          n_holdout=len(te), n_samples=len(x_all), backbone_bytes=bb_bytes,
                                          routers=bool(have_routers)))
    budget = None if ram_mb is None else int(ram_mb * MiB)
    try:
        chosen, minimum = planner.choose(budget, batch_size, prefix_cache=True, **kw)
    except ValueError as e:
        need = int(e.args[0])
        raise RamBudgetError(f"RAM budget {ram_mb:g} MiB is below the minimum this learning needs: "
                             f"{need / MiB:.2f} MiB ({need} bytes, batch size 1); nothing was changed"
                             ) from None
    if resume and chosen.batch_size != batch_size:
        need = planner.plan(batch_size=batch_size, **kw).total
        raise RamBudgetError(f"the checkpoint's batch size {batch_size} needs {need / MiB:.2f} MiB; "
                             f"the budget {ram_mb:g} MiB fits only {chosen.batch_size}")
    fingerprint["batch_size"] = chosen.batch_size
    prefix_cache = chosen.cache > 0  # the frozen prefix once per sample, when the budget has room

    # -- canaries through the runtime, before (one activated task at a time) ----------
    before = _old_logits(Runtime(bundle, cache_bytes=0), bundle.task_names, canaries)

    # -- the child ------------------------------------------------------------------
    if probe is None:
        probe = probe_child()
    base_as = int(probe["vm_peak"])
    # the child's part of the budget (the parent keeps its own), plus the address space
    # the compiled step reserves beyond what it touches (as the baseline's, measured)
    limit = None if budget is None else base_as + budget - chosen.parent + step_as_extra + AS_SLACK
    report: dict = {"bundle": str(root), "task": task, "method": method, "classes": classes,
                    "seed": int(seed), "hparams": hp, "batch_size": chosen.batch_size,
                    "plan_bytes": chosen.total, "plan": chosen.as_dict(), "min_plan_bytes": minimum.total,
                    "ram_budget_bytes": budget, "baseline_address_space": base_as,
                    "baseline_rss_bytes": int(probe["rss_peak"]), "step_probe": probe.get("step"),
                    "address_space_limit": limit, "n_train": n_train, "n_holdout": len(te),
                    "energy_budget_j": energy_j, "resumed": bool(resume), "train_last": train_last,
                    "mask_sites": n_sites, "prefix_cache": prefix_cache,
                    "duplicates": same, "overlaps": overlap}
    with tempfile.TemporaryDirectory(prefix="edgecl-learn-") as tmp:
        job_dir = Path(tmp)
        np.savez(job_dir / "samples.npz", x=x_all[tr], y=y_all[tr])
        job = {"bundle": str(root.resolve()), "version": bundle.version, "method": method, "hp": hp,
               "n_classes": len(classes), "batch_size": chosen.batch_size, "seed": int(seed),
               "source_task": src, "checkpoint": str(ckpt.resolve()), "resume": bool(resume),
               "meter": meter, "meter_root": meter_root, "energy_j": energy_j, "quiet": quiet,
               "step_backend": step_backend, "fingerprint": fingerprint, "debug_alloc_mb": debug_alloc_mb,
               "train_last": train_last, "prefix_cache": prefix_cache}
        (job_dir / "job.json").write_text(json.dumps(job))

        def limit_as() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        proc = subprocess.run([sys.executable, "-m", "edgecl.runtime.learn.child", str(job_dir)],
                              preexec_fn=limit_as, env=child_env(),
                              stdout=subprocess.DEVNULL if quiet else None,
                              stderr=subprocess.PIPE if quiet else None, text=True)
        try:
            stats = json.loads((job_dir / "result.json").read_text())
        except (OSError, ValueError):
            stats = {"status": "killed"}
        report.update({k: v for k, v in stats.items() if k not in ("status", "traceback")})
        report["peak_rss_bytes"] = stats.get("peak_rss")
        report["child_exit"] = proc.returncode
        limit_txt = "no limit" if limit is None else f"{limit / MiB:.1f} MiB address space"
        if stats.get("status") == "memory" or (proc.returncode < 0 and stats["status"] == "killed"):
            why = stats.get("error") or f"killed by signal {-proc.returncode}"
            raise RamBudgetError(f"the learning child exceeded its RAM budget of {ram_mb:g} MiB "
                                 f"({limit_txt} = baseline {base_as / MiB:.1f} MiB + the child's part of "
                                 f"the budget): {why}; nothing was committed")
        if stats.get("status") == "paused":
            report.update(status="paused", checkpoint=str(ckpt), seconds_wall=time.monotonic() - t_start)
            _finish(report, json_path)
            return report
        if proc.returncode != 0 or stats.get("status") != "done":
            err = stats.get("error") or (proc.stderr or "")[-800:] or f"exit code {proc.returncode}"
            raise LearnError(f"learning {task!r} failed in the child: {err}; nothing was committed")
        from safetensors.numpy import load_file

        result = load_file(str(job_dir / "result.safetensors"))
    tensors = {k[5:]: v for k, v in result.items() if k.startswith("task.")}
    new_backbone = {k[9:]: v for k, v in result.items() if k.startswith("backbone.")} or None

    # -- verify on the candidate, then commit it and the routers as one version --------
    entry = {"name": task, "classes": classes, "n_classes": len(classes), "method": method, "kind": kind,
             "metrics": {"host_acc": None, "before_acc": None, "init_acc": None}}
    if src is not None and bundle.task(src).get("depends"):
        entry["depends"] = bundle.task(src)["depends"]
    with Transaction(root, key=key) as tx:
        if tx.previous["version"] != bundle.version:
            raise LearnError(f"{root}: the bundle moved on to version {tx.previous['version']} while "
                             f"learning (from version {bundle.version}); learn again")
        added, crt = stage_task(tx, bundle, new_backbone, entry, tensors, canaries, before)
        cand = crt.bundle
        acc = float((crt.logits(x_all[te], task).argmax(axis=1) == y_all[te]).mean()) if len(te) else None
        added["metrics"].update(device_acc=acc, learned_on="device", joules=report.get("joules"),
                                steps=report.get("steps"))
        if have_routers:
            from ..routers.store import refit, set_routers

            set_routers(tx, refit(cand, [(task, x_all, y_all)], names=have_routers))
    versions = [tx.version]
    shutil.rmtree(work, ignore_errors=True)
    try:
        (root / WORK_DIR).rmdir()
    except OSError:
        pass
    report.update(status="committed", versions=versions, holdout_acc=acc,
                  canaries_checked=len(canaries) * len(bundle.task_names),
                  backbone_changed=new_backbone is not None, seconds_wall=time.monotonic() - t_start)
    _finish(report, json_path)
    return report


def stage_task(tx: Transaction, bundle: Bundle, new_backbone: dict | None, entry: dict, tensors: dict,
               canaries: np.ndarray, before: dict[str, bytes]) -> tuple[dict, Runtime]:
    """Put the new backbone (if the method changed free weights) and the new task into
    ``tx``; return the task's entry and the runtime over the version being committed (in
    memory) once every owned weight is unchanged and every old task's canary logits are
    byte-identical to ``before``; else ``ForgettingError`` (and the transaction writes
    nothing)."""
    if new_backbone is not None:
        _check_owned_unchanged(bundle, new_backbone)
        main = bundle.main
        tx.add_backbone(main, new_backbone, graph=bundle.manifest["backbones"][main]["graph"])
    added = tx.add_task(entry, tensors)
    crt = Runtime(tx.candidate(), cache_bytes=0)  # one activated task at a time (the plan's commit)
    after = _old_logits(crt, bundle.task_names, canaries)
    changed = [n for n in bundle.task_names if after[n] != before[n]]
    if changed:
        raise ForgettingError(f"refusing to commit {entry['name']!r}: old task(s) {changed} would answer "
                              f"differently on the canary inputs (not byte-identical)")
    return added, crt


def _check_owned_unchanged(bundle: Bundle, new: dict) -> None:
    """Every owned weight (any old task's mask bit) byte-identical, and every other tensor
    of the backbone (biases, normalization, ...) entirely."""
    old = bundle.backbone
    if set(old) != set(new):
        raise ForgettingError(f"refusing to commit: the new backbone has tensors {sorted(new)}, "
                              f"the old {sorted(old)}")
    sites = {s.weight: s for s in bundle.graph.mask_sites()}
    owned_by = owned_union(bundle)
    for name in old:
        w_old, w_new = np.asarray(old[name]), np.asarray(new[name])
        site = sites.get(name)
        if site is None or w_old.dtype != np.float32 or w_new.dtype != np.float32:
            if w_old.dtype != w_new.dtype or w_old.shape != w_new.shape or w_old.tobytes() != w_new.tobytes():
                what = next((f"the bias of {s.node}" for s in sites.values() if s.bias == name), name)
                raise ForgettingError(f"refusing to commit: {what} changed")
            continue
        if w_old.shape != w_new.shape:
            raise ForgettingError(f"refusing to commit: {name} has shape {w_new.shape}, was {w_old.shape}")
        owned = owned_by.get(name, np.zeros(w_old.size, dtype=bool))
        if owned is None:
            owned = np.ones(w_old.size, dtype=bool)
        a, b = w_old.reshape(-1).view(np.uint32), np.ascontiguousarray(w_new).reshape(-1).view(np.uint32)
        if not np.array_equal(a[owned], b[owned]):
            raise ForgettingError(f"refusing to commit: owned weights of {site.node} changed")


def _finish(report: dict, json_path: str | Path | None) -> None:
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=1, default=str) + "\n")
