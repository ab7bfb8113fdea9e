"""``edgecl bench zoo``: ``edgecl bench`` on every zoo model, edgecl against the peers.

    edgecl bench zoo [--models ds-cnn,resnet8,...] [--batch 1,8] [--out docs/bench/zoo.json] [--quick]

Per model: a 2-task bundle (SupSup, 1 epoch on Split-Digits fitted to the model's input,
the zoo's pretrained weights where it has them, else SupSup's own initialization, as
``edgecl train --arch NAME`` does; only the default router fitted), its ONNX and TFLite
exports and, when TVM can build it, the host library; cached under ``$EDGECL_CACHE/bench-zoo/`` (else
``~/.cache/edgecl/bench-zoo/``), made anew with ``--rebuild``. Masks make no speed
difference (every backend runs dense kernels on ``W ⊙ M``), so one epoch is enough.
Then one ``edgecl bench`` run per model (every row in its own one-thread process; see
``edgecl.tools.bench``), one table per model and a summary table: edgecl's fastest row
and its p50 at each batch, the fastest peer, their ratio, the TVM row's own ratio, and
the router's share of edgecl's fastest batch-1 inference.

``--quick``: a few calls per measurement and two task switches (a plumbing check, not
figures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

FORMAT = "edgecl-bench-zoo-2"
METHOD, N_TASKS, DATA = "supsup", 2, "split-digits"
HPARAMS = {"epochs": 1, "batch_size": 64}

# bench name -> the zoo model and its factory's arguments
MODELS: dict[str, dict] = {
    "ds-cnn": {"zoo": "ds-cnn", "kwargs": {}},
    "resnet8": {"zoo": "resnet8", "kwargs": {}},
    "mobilenet-v1-0.25": {"zoo": "mobilenet-v1-0.25", "kwargs": {}},
    "fc-autoencoder": {"zoo": "fc-autoencoder", "kwargs": {}},
    "mobilenet-v2": {"zoo": "mobilenet-v2", "kwargs": {}},  # width 1.0 at 224x224
    "mobilenet-v2-0.35-96": {"zoo": "mobilenet-v2", "kwargs": {"width": 0.35, "input_size": 96}},
    "efficientnet-lite0": {"zoo": "efficientnet-lite0", "kwargs": {}},
    "minilm": {"zoo": "minilm", "kwargs": {}},
}

QUICK = {"iters": 40, "seconds": 0.2, "min_iters": 3, "switch_rounds": 2}
FULL = {"seconds": 2.0, "min_iters": 10, "switch_rounds": 10}


def cache_root() -> Path:
    root = os.environ.get("EDGECL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "edgecl") / "bench-zoo"


def _key(name: str) -> str:
    m = MODELS[name]
    blob = json.dumps({"format": FORMAT, "zoo": m["zoo"], "kwargs": m["kwargs"], "method": METHOD,
                       "tasks": N_TASKS, "data": DATA, "hparams": HPARAMS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _tvm_fingerprint() -> str:
    """What a TVM build depends on in this checkout: a failed build is retried when it changes."""
    import edgecl.compiler.tvm_build as tb
    import edgecl.runtime.ops as ops

    h = hashlib.sha256()
    for p in [Path(tb.__file__), *sorted(Path(ops.__file__).parent.glob("*.py"))]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def prepare(name: str, *, rebuild: bool = False, want_tvm: bool = True, log=print) -> dict:
    """The model's cached bundle with its exports (made if missing); returns its record
    (``bundle``, ``zoo``, ``tvm``: built or why not, timings of what was made now)."""
    from edgecl.runtime.bundle import Bundle

    m = MODELS[name]
    root = cache_root() / f"{name}-{_key(name)}"
    rec_path = root / "zoo.json"
    if rebuild and root.exists():
        shutil.rmtree(root)
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else None
    bundle = root / "bundle"
    if rec is None or not (bundle / "manifest.json").exists():
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        rec = {"format": FORMAT, "model": name, "zoo": {"name": m["zoo"], "kwargs": m["kwargs"]},
               "method": METHOD, "tasks": N_TASKS, "data": DATA, "hparams": HPARAMS, "made_s": {}}
        _train(name, root, rec, log)
        _save(rec_path, rec)
    exports = Bundle.open(bundle).manifest.get("exports", {})
    if not exports.get("onnx"):
        from edgecl.compiler.onnx_export import export_bundle

        export_bundle(bundle)
    if not exports.get("tflite"):
        from edgecl.compiler.tflite_export import export_bundle

        export_bundle(bundle)
        why = Bundle.open(bundle).manifest["exports"]["tflite"].get("unavailable")
        if why:
            log(f"{name}: no TFLite export ({why})")
    if want_tvm:
        _compile(name, bundle, rec, log)
    _save(rec_path, rec)
    return dict(rec, bundle=str(bundle))


def _save(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, path)


def _train(name: str, root: Path, rec: dict, log) -> None:
    import torch

    from edgecl.compiler.from_run import bundle_run
    from edgecl.models.data import load_spec
    from edgecl.models.importer import import_model
    from edgecl.models.training import train
    from edgecl.models.zoo import ZOO
    from edgecl.runtime.routers import DEFAULT_ROUTER
    from edgecl.runtime.routers.store import update_routers

    torch.set_num_threads(1)
    m = MODELS[name]
    t = time.perf_counter()
    graph, weights = import_model(m["zoo"], zoo_kwargs=m["kwargs"] or None)
    # as `edgecl train --arch NAME`: real weights where the zoo has them, else the method's own init
    backbone = weights if ZOO[m["zoo"]].pretrained else None
    rec["made_s"]["import"] = time.perf_counter() - t
    t = time.perf_counter()
    run = train(DATA, METHOD, root / "run", n_tasks=N_TASKS, arch=m["zoo"], graph=graph, backbone=backbone,
                hparams=HPARAMS, log=lambda s: log(f"{name}: {s}"))
    rec["made_s"]["train"] = time.perf_counter() - t
    rec["host_acc"] = [row[-1] for row in run.acc_matrix]
    t = time.perf_counter()
    # Only the default router (the one the bench times): fitting all of them runs every
    # training sample through every task in numpy, ~30+ min for a 224x224 model here.
    bundle_run(root / "run", root / "bundle", routers=False)
    stream = load_spec(run.config["stream"], n_tasks=N_TASKS)
    update_routers(root / "bundle", [(t.name, t.x_train, t.y_train) for t in stream.tasks],
                   names=[DEFAULT_ROUTER])
    rec["made_s"]["bundle"] = time.perf_counter() - t
    shutil.rmtree(root / "run", ignore_errors=True)  # the bundle is what the bench reads


def _compile(name: str, bundle: Path, rec: dict, log) -> None:
    """The host TVM library, unless the bundle has one or this checkout's TVM build failed
    on it before (retried when the TVM build's sources change)."""
    from edgecl.runtime.bundle import Bundle

    if "host" in Bundle.open(bundle).manifest.get("targets", {}):
        rec["tvm"] = rec.get("tvm") or "built"
        return
    fp = _tvm_fingerprint()
    prev = rec.get("tvm") or ""
    if prev.startswith("failed") and rec.get("tvm_fingerprint") == fp:
        log(f"{name}: TVM: {prev} (cached; retried when compiler/tvm_build.py or runtime/ops change)")
        return
    t = time.perf_counter()
    try:
        from edgecl.compiler.tvm_build import compile_bundle

        compile_bundle(bundle, "host", train=False, log=lambda s: log(f"{name}: {s}"))
        rec["tvm"] = "built"
    except Exception as e:  # TVM is optional: record why and go on
        first = (str(e).strip().splitlines() or [""])[0][:300]
        rec["tvm"] = f"failed: {type(e).__name__}: {first}"
        log(f"{name}: TVM build failed ({rec['tvm']})")
    rec["tvm_fingerprint"] = fp
    rec["made_s"]["tvm"] = time.perf_counter() - t


def _fmt_us(s: float | None) -> str:
    return "-" if s is None or not math.isfinite(s) else f"{s * 1e6:,.1f}"


def _at(s: dict, b: int) -> dict:
    return s.get(b, s.get(str(b), {}))  # int keys in memory, str keys after JSON


def summary_rows(results: dict, batches: list[int]) -> list[list]:
    """One row per model: edgecl's fastest row (provider) and p50 per batch, the fastest
    peer, the ratios, the TVM row's ratios, the router's share at batch 1."""
    out = []
    for name, res in results.items():
        s = res.get("summary", {}).get("batches", {})
        per = [_at(s, b) for b in batches]

        def ours(x: dict) -> str:
            if not x.get("edgecl"):
                return "-"
            prov = x.get("edgecl_provider")
            return x["edgecl"] + (f" ({prov})" if prov and prov != x["edgecl"] else "")

        def ratios(key: str, per: list[dict] = per) -> str:
            return " / ".join("-" if x.get(key) is None else f"{x[key]:.2f}" for x in per)

        share = _at(s, 1).get("router_share")
        out.append([name, " / ".join(dict.fromkeys(ours(x) for x in per)),
                    *[_fmt_us(x.get("edgecl_p50_s")) for x in per],
                    " / ".join(dict.fromkeys(str(x.get("peer", "-")) for x in per)),
                    *[_fmt_us(x.get("peer_p50_s")) for x in per],
                    ratios("ratio"), ratios("tvm_ratio"), "-" if share is None else f"{100 * share:.1f}%"])
    return out


def summary_table(results: dict, batches: list[int]) -> str:
    from .tables import render

    bs = "/".join(f"b{b}" for b in batches)
    heads = ["model", f"edgecl fastest {bs}", *[f"edgecl p50 us b{b}" for b in batches], f"fastest peer {bs}",
             *[f"peer p50 us b{b}" for b in batches], f"ratio {bs}", f"TVM ratio {bs}", "router % b1"]
    return render(heads, summary_rows(results, batches))


def _machine() -> dict:
    out = {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        out["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                          if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        out["loadavg"] = [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        pass
    return out


def run_zoo(models: list[str] | None = None, batches=(1, 8), out: str | Path | None = None, *,
            quick: bool = False, backends: list[str] | None = None, rebuild: bool = False,
            iters: int = 20000, seconds: float | None = None, log=print) -> dict:
    """Bench every model asked; returns (and writes to ``out``) the rows and summaries."""
    from .bench import ROWS, run_bench, summary

    models = list(models or MODELS)
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown zoo bench model {m!r}; choose from {', '.join(MODELS)}")
    backends = list(backends or ROWS)
    opts = dict(QUICK if quick else dict(FULL, iters=iters))
    if seconds is not None:
        opts["seconds"] = float(seconds)
    batches = [int(b) for b in batches]
    doc = {"format": FORMAT, "command": "edgecl bench zoo", "quick": quick, "batches": batches,
           "backends": backends, "method": METHOD, "tasks": N_TASKS, "hparams": HPARAMS,
           "options": opts, "machine_start": _machine(), "models": {}}
    for name in models:
        t = time.perf_counter()
        load = _machine().get("loadavg")
        log(f"== {name} == (load average {load})")
        rec = prepare(name, rebuild=rebuild, want_tvm="tvm" in backends, log=log)
        rows = run_bench(rec["bundle"], backends, batches, iters=opts.get("iters", iters), log=log,
                         seconds=opts["seconds"], min_iters=opts["min_iters"],
                         switch_rounds=opts["switch_rounds"], zoo=rec["zoo"])
        doc["models"][name] = {"zoo": rec["zoo"], "bundle": rec["bundle"], "tvm": rec.get("tvm"),
                               "host_acc": rec.get("host_acc"), "made_s": rec.get("made_s"),
                               "bench_s": time.perf_counter() - t, "loadavg_start": load,
                               "loadavg_end": _machine().get("loadavg"), "rows": rows,
                               "summary": summary(rows)}
        if out:  # after every model: a long run killed half-way keeps what it measured
            _write(out, doc)
    doc["machine_end"] = _machine()
    log("\n== summary (edgecl's fastest row vs the fastest peer; ratio <= 1.00 is the target) ==")
    log(summary_table(doc["models"], batches))
    tvm_notes = {n: r["tvm"] for n, r in doc["models"].items() if r.get("tvm") != "built"}
    for n, why in tvm_notes.items():
        log(f"{n}: TVM {why}")
    # other work on the machine: the 1-minute load average, less the bench's own process once running
    seen = [doc["machine_start"].get("loadavg", [0])[0]]
    seen += [(m.get("loadavg_start") or [1])[0] - 1 for m in list(doc["models"].values())[1:]]
    seen.append(doc["machine_end"].get("loadavg", [1])[0] - 1)
    doc["other_load_max"] = max(seen)
    if doc["other_load_max"] > 0.5 and not quick:
        log(f"note: other work kept up to {doc['other_load_max']:.1f} cores busy (1-minute load average, "
            "less this bench): these timings are not valid figures; re-run on an idle machine")
    if out:
        _write(out, doc)
        log(f"wrote {out}")
    return doc


def _write(path, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> int:
    from edgecl.runtime.errors import EdgeclError

    from .bench import DEFAULT_BACKENDS, _batches

    models = [m.strip() for m in str(args.models or "").split(",") if m.strip()] or None
    backends = [b.strip() for b in str(args.backends or DEFAULT_BACKENDS).split(",") if b.strip()]
    try:
        doc = run_zoo(models, _batches(args.batch, "1,8"), args.out or args.json, quick=args.quick,
                      backends=backends, rebuild=getattr(args, "rebuild", False), iters=args.iters,
                      seconds=args.seconds)
    except ValueError as e:
        raise EdgeclError(str(e)) from e
    return 0 if all(m["rows"] for m in doc["models"].values()) else 1


if __name__ == "__main__":
    import sys

    from edgecl.runtime.errors import EdgeclError

    from .bench import add_arguments

    p = argparse.ArgumentParser(prog="python -m edgecl.tools.bench_zoo", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        sys.exit(main(p.parse_args(["zoo", *sys.argv[1:]])))
    except EdgeclError as e:
        print(f"edgecl bench zoo: error: {e}", file=sys.stderr)
        sys.exit(2)
