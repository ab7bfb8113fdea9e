"""Per-target TVM artifacts: the masked model's forward pass, weights as inputs.

``compile_bundle(bundle_dir, target)`` builds one shared library per architecture (not
per task) holding ``forward_b{B}`` for a few static batch sizes, and commits it to the
bundle as a new version under the manifest's ``targets`` key. The runtime
(``edgecl.runtime.backends.tvm``) packs a task's ``W ⊙ M`` into the layout the code
expects once per activation (``runtime/backends/packing.py``) and calls the functions
through the TVM FFI, without TVM's compiler.

The code is one fused TIR PrimFunc per batch size, written with TE and scheduled by
hand: register-tiled, vectorized over output features (linear) / channels (conv, NHWC),
bias and ReLU fused into the accumulator write-back. ``tune_trials > 0`` measures up to
that many schedule configurations (lanes, row tile, column tile) on this machine (for
the host target; cross targets keep their defaults) and stores the winner in a tuning
database (``$EDGECL_CACHE/tune`` or ``~/.cache/edgecl/tune``), reused by the next compile
of the same architecture on the same target.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edgecl.compiler import targets as tg
from edgecl.runtime.backends.packing import aligned_copy, pack_params, vec_for
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_write import commit_files

BATCHES = (1, 8, 32)


def _pad_fn(te, src, nhwc, h, wd, p):
    def f(n, y, x, c):
        inside = te.all(y >= p, y < h + p, x >= p, x < wd + p)
        val = src[n, y - p, x - p, c] if nhwc else src[n, c, y - p, x - p]
        return te.if_then_else(inside, val, 0.0)
    return f


def _conv_fn(te, pad, w, k, s, c_in, v):
    ry, rx = te.reduce_axis((0, k), name="ry"), te.reduce_axis((0, k), name="rx")
    rc = te.reduce_axis((0, c_in), name="rc")

    def f(n, y, x, o):
        return te.sum(pad[n, y * s + ry, x * s + rx, rc] * w[o // v, ry, rx, rc, o % v],
                      axis=[ry, rx, rc])
    return f


def _relu_fn(te, src):
    def f(*i):
        return te.max(src(*i), 0.0)
    return f


def _pool_fn(te, src, kp):
    ry, rx = te.reduce_axis((0, kp), name="py"), te.reduce_axis((0, kp), name="px")

    def f(n, y, x, o):
        return te.max(src[n, y * kp + ry, x * kp + rx, o], axis=[ry, rx])
    return f


def _flat_fn(src, d2, d3):
    # C-order flatten of the 4-d tensor as stored (NHWC after a conv, NCHW for a raw input)
    def f(n, i):
        return src[n, i // (d2 * d3), (i // d3) % d2, i % d3]
    return f


# -- the computation ------------------------------------------------------------------
def _te_forward(layers: Sequence[Mapping], input_shape: Sequence[int], batch: int, head_rows: int,
                vec: int):
    """TE tensors of the forward pass; returns (args, stage names by kind)."""
    from tvm import te

    B = batch
    x = te.placeholder((B, *[int(s) for s in input_shape]), name="x")
    args = [x]
    stages: dict[str, list[str]] = {"linear": [], "conv": []}
    cur, nhwc = x, False  # a 4-d tensor is NCHW until a conv makes it NHWC
    pending = None  # (kind, name, mm, bias, n) of the last linear/conv, awaiting its relu

    def finish(relu: bool):
        nonlocal cur, pending
        kind, name, mm, b = pending
        if kind == "linear":
            f = (lambda i, j: te.max(mm[i, j] + b[j], 0.0)) if relu else (lambda i, j: mm[i, j] + b[j])
        else:
            f = ((lambda n, y, xx, o: te.max(mm[n, y, xx, o] + b[o], 0.0)) if relu
                 else (lambda n, y, xx, o: mm[n, y, xx, o] + b[o]))
        cur = te.compute(mm.shape, f, name=name + "_out")
        pending = None

    def linear(name, h, n_out, k_in):
        v = vec_for(n_out, vec)
        w = te.placeholder((n_out // v, k_in, v), name=name + "_w")
        b = te.placeholder((n_out,), name=name + "_b")
        k = te.reduce_axis((0, k_in), name="k")
        mm = te.compute((B, n_out), lambda i, j: te.sum(h[i, k] * w[j // v, k, j % v], axis=k),
                        name=name)
        args.extend([w, b])
        stages["linear"].append(name)
        return mm, b

    for idx, layer in enumerate(layers):
        op = layer["op"]
        if pending is not None and op != "relu":
            finish(False)
        if op == "linear":
            mm, b = linear(layer["name"], cur, int(layer["out_features"]), int(layer["in_features"]))
            pending = ("linear", layer["name"], mm, b)
        elif op == "conv2d":
            name = layer["name"]
            k, s, p = int(layer["kernel_size"]), int(layer.get("stride", 1)), int(layer.get("padding", 0))
            c_in, c_out = int(layer["in_channels"]), int(layer["out_channels"])
            if nhwc:
                _, h, wd, _ = (int(d) for d in cur.shape)
            else:
                _, _, h, wd = (int(d) for d in cur.shape)
            pad = te.compute((B, h + 2 * p, wd + 2 * p, c_in), _pad_fn(te, cur, nhwc, h, wd, p),
                             name=name + "_pad")
            ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
            v = vec_for(c_out, vec)
            w = te.placeholder((c_out // v, k, k, c_in, v), name=name + "_w")
            b = te.placeholder((c_out,), name=name + "_b")
            mm = te.compute((B, ho, wo, c_out), _conv_fn(te, pad, w, k, s, c_in, v), name=name)
            args.extend([w, b])
            stages["conv"].append(name)
            pending = ("conv", name, mm, b)
            nhwc = True
        elif op == "relu":
            if pending is not None:
                finish(True)
            else:
                cur = te.compute(cur.shape, _relu_fn(te, cur), name=f"relu{idx}")
        elif op == "maxpool2d":
            kp = int(layer["kernel_size"])
            if not nhwc:
                raise ValueError("maxpool2d before any conv2d is not supported by the TVM build")
            _, h, wd, c = (int(d) for d in cur.shape)
            cur = te.compute((B, h // kp, wd // kp, c), _pool_fn(te, cur, kp), name=f"pool{idx}")
        elif op == "flatten":
            if len(cur.shape) == 4:
                _, d1, d2, d3 = (int(d) for d in cur.shape)
                cur = te.compute((B, d1 * d2 * d3), _flat_fn(cur, d2, d3), name=f"flat{idx}")
            nhwc = False
        else:
            raise ValueError(f"layer table: unknown op {op!r}")
    if pending is not None:
        finish(False)
    if len(cur.shape) != 2:
        raise ValueError("the backbone must end in a flat feature vector")
    mm, b = linear("head", cur, head_rows, int(cur.shape[1]))
    out = te.compute(mm.shape, lambda i, j: mm[i, j] + b[j], name="head_out")
    return args + [out], stages


def _schedule(func, stages: Mapping[str, list[str]], batch: int, sched: Mapping):
    import tvm

    sch = tvm.s_tir.Schedule(func)
    ti = math.gcd(int(sched["ti"]), batch)
    for name in stages["linear"]:
        blk = sch.get_sblock(name)
        i, j, k = sch.get_loops(blk)
        v = int(sch.get(j).extent)
        v = vec_for(v, int(sched["vec"]))
        io, ii = sch.split(i, [None, ti])
        jo, ji = sch.split(j, [None, v])
        sch.reorder(io, jo, k, ii, ji)
        acc = sch.cache_write(blk, 0, "local")
        sch.reverse_compute_at(acc, jo)
        sch.unroll(ii)
        sch.vectorize(ji)
        init = sch.decompose_reduction(blk, k)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(acc)[-1])
        sch.reverse_compute_inline(sch.get_sblock(name + "_out"))
    for name in stages["conv"]:
        blk = sch.get_sblock(name)
        n, y, x, o, ry, rx, rc = sch.get_loops(blk)
        v = vec_for(int(sch.get(o).extent), int(sched["vec"]))
        tx = math.gcd(int(sched["tx"]), int(sch.get(x).extent))
        xo, xi = sch.split(x, [None, tx])
        oo, oi = sch.split(o, [None, v])
        sch.reorder(n, y, xo, oo, ry, rx, rc, xi, oi)
        acc = sch.cache_write(blk, 0, "local")
        sch.reverse_compute_at(acc, oo)
        sch.unroll(xi)
        sch.vectorize(oi)
        init = sch.decompose_reduction(blk, ry)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(acc)[-1])
        sch.reverse_compute_inline(sch.get_sblock(name + "_out"))
    return sch.mod["main"]


def build_module(layers, input_shape, head_rows: int, batches: Sequence[int], sched: Mapping):
    """An IRModule with ``forward_b{B}`` for each batch size, scheduled."""
    import tvm
    from tvm import te

    funcs = {}
    for batch in batches:
        tensors, stages = _te_forward(layers, input_shape, batch, head_rows, int(sched["vec"]))
        f = _schedule(te.create_prim_func(tensors), stages, batch, sched)
        name = f"forward_b{batch}"
        funcs[name] = f.with_attr("global_symbol", name)
    return tvm.IRModule(funcs)


def compile_module(mod, target: dict):
    import tvm

    return tvm.compile(mod, target=tvm.target.Target(target))


# -- tuning -------------------------------------------------------------------------
def arch_key(model: Mapping, head_rows: int, batches: Sequence[int]) -> str:
    blob = json.dumps({"layers": model["layers"], "input_shape": model["input_shape"],
                       "head_rows": head_rows, "batches": list(batches)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("EDGECL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "edgecl") / "tune"


def _db_path(target_name: str, target: dict, key: str) -> Path:
    import tvm

    t = hashlib.sha256(json.dumps([target, tvm.__version__], sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / f"{target_name}-{key}-{t}.json"


def _candidates(default: Mapping) -> list[dict]:
    grid = [{"vec": v, "ti": ti, "tx": tx}
            for v, ti, tx in itertools.product((16, 8, 32), (4, 8, 2, 1), (4, 2, 8))]
    grid.sort(key=lambda c: c != dict(default))
    return grid


def measure(lib, layers, input_shape, head_rows: int, batches: Sequence[int], sched: Mapping,
            repeat: int = 300) -> dict[int, float]:
    """Seconds per call (median of runs) of each ``forward_b{B}`` in ``lib``, random weights."""
    rng = np.random.default_rng(0)
    params = {}
    for layer in layers:
        if layer["op"] == "linear":
            params[layer["name"]] = (rng.standard_normal((layer["out_features"], layer["in_features"]),
                                                         dtype=np.float32), np.zeros(layer["out_features"],
                                                                                     np.float32))
        elif layer["op"] == "conv2d":
            k = layer["kernel_size"]
            params[layer["name"]] = (rng.standard_normal(
                (layer["out_channels"], layer["in_channels"], k, k), dtype=np.float32),
                np.zeros(layer["out_channels"], np.float32))
    feat = [layer for layer in layers if layer["op"] in ("linear", "conv2d")][-1]
    f = feat.get("out_features", 0) or 0
    if not f:
        raise ValueError("cannot measure: the backbone must end in a linear layer")
    head = (rng.standard_normal((2, f), dtype=np.float32), np.zeros(2, np.float32))
    packed = pack_params(layers, input_shape, params, head, {"vec": sched["vec"], "head_rows": head_rows})
    out = {}
    for batch in batches:
        fn = lib[f"forward_b{batch}"]
        x = aligned_copy(rng.standard_normal((batch, *input_shape), dtype=np.float32))
        y = aligned_copy(np.zeros((batch, head_rows), np.float32))
        fn(x, *packed, y)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeat // 5 or 1):
                fn(x, *packed, y)
            times.append((time.perf_counter() - t) / (repeat // 5 or 1))
        out[batch] = float(np.median(times))
    return out


def tune(target_name: str, target: dict, model: Mapping, head_rows: int, batches: Sequence[int],
         trials: int, log=print) -> tuple[dict, bool]:
    """The schedule to build with: from the tuning database, or measured now (host only)."""
    default = tg.default_schedule(target_name, target)
    key = arch_key(model, head_rows, batches)
    db = _db_path(target_name, target, key)
    if db.is_file():
        rec = json.loads(db.read_text())
        log(f"tuning database hit: {db}")
        return dict(rec["best"]), True
    if trials <= 0 or not tg.is_native(target_name):
        return dict(default), False
    layers, shape = model["layers"], tuple(model["input_shape"])
    results = []
    for cand in _candidates(default)[:trials]:
        try:
            lib = compile_module(build_module(layers, shape, head_rows, batches, cand), target)
            t = measure(lib, layers, shape, head_rows, batches, cand)
        except Exception as e:  # a configuration that does not build is skipped
            log(f"  {cand}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        cost = sum(t[b] / b for b in batches)
        results.append({"schedule": cand, "seconds": {str(b): t[b] for b in batches}, "cost": cost})
        log(f"  {cand}: " + ", ".join(f"b{b} {t[b] * 1e6:.1f} us" for b in batches))
    if not results:
        return dict(default), False
    best = min(results, key=lambda r: r["cost"])
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_text(json.dumps({"target": target, "arch_key": key, "best": best["schedule"],
                              "trials": results}, indent=1))
    log(f"tuned {len(results)} schedules; best {best['schedule']}; saved {db}")
    return dict(best["schedule"]), True


# -- the bundle -----------------------------------------------------------------------
def export_bytes(lib, target_name: str) -> bytes:
    """A compiled module as shared-library bytes, cross-linked for aarch64 targets."""
    cross = tg.cross_compiler(target_name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lib.so"
        if cross is None:
            lib.export_library(str(path))
        else:
            from tvm.support import cc

            lib.export_library(str(path), fcompile=cc.cross_compiler(cross))
        return path.read_bytes()


def head_rows_for(bundle: Bundle) -> int:
    most = max((len(t["classes"]) for t in bundle.tasks), default=2)
    return max(8, -(-most // 8) * 8)


def build_cuda(bundle: Bundle, target_name: str, sched: Mapping, head_rows: int,
               batches: Sequence[int], log=print) -> tuple[bytes | None, dict | None]:
    """The GPU library of a target that has one (DLight's default GPU rules over the same
    computation and weight layout); (None, reason) when it cannot be built here."""
    import shutil

    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    cuda = tg.TARGETS[target_name].get("cuda")
    if cuda is None:
        return None, None
    if shutil.which("nvcc") is None:
        return None, {"status": "not built: TVM compiles CUDA with nvcc and no CUDA toolkit is "
                                "installed on this build machine; the CPU library is shipped"}
    model = bundle.model
    target = dict(cuda, host=tg.cpu_target(target_name))
    funcs = {}
    for batch in batches:
        tensors, _ = _te_forward(model["layers"], tuple(model["input_shape"]), batch, head_rows,
                                 int(sched["vec"]))
        funcs[f"forward_b{batch}"] = te.create_prim_func(tensors).with_attr(
            "global_symbol", f"forward_b{batch}")
    try:
        tgt = tvm.target.Target(target)
        with tgt:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.Fallback())(tvm.IRModule(funcs))
        lib = tvm.compile(mod, target=tgt)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "forward_cuda.so"
            cross = tg.cross_compiler(target_name)
            if cross is None:
                lib.export_library(str(path))
            else:
                from tvm.support import cc

                lib.export_library(str(path), fcompile=cc.cross_compiler(cross))
            data = path.read_bytes()
    except Exception as e:  # record why, ship the CPU part
        return None, {"status": f"not built: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    log(f"{target_name}: CUDA library built ({len(data)} bytes; not run: no such GPU here)")
    return data, {"status": "built with DLight GPU rules; not verified on a GPU",
                  "target": target, "layout": "same as the CPU library"}


def build_library(bundle: Bundle, target_name: str, tune_trials: int = 0, batches=BATCHES,
                  log=print) -> tuple[bytes, dict]:
    """Compile and export the library for ``target_name``; returns (bytes, manifest entry)."""
    import tvm

    target = tg.cpu_target(target_name)
    model = bundle.model
    head_rows = head_rows_for(bundle)
    sched, tuned = tune(target_name, target, model, head_rows, batches, tune_trials, log=log)
    t0 = time.perf_counter()
    lib = compile_module(build_module(model["layers"], tuple(model["input_shape"]), head_rows,
                                      batches, sched), target)
    data = export_bytes(lib, target_name)
    log(f"{target_name}: built in {time.perf_counter() - t0:.1f} s ({len(data)} bytes)")
    entry = {
        "tvm_version": tvm.__version__,
        "target": target,
        "machine": tg.TARGETS[target_name]["machine"] if target_name != "host" else tg.host_machine(),
        "arch": model.get("arch"),
        "arch_key": arch_key(model, head_rows, batches),
        "layout": {"vec": int(sched["vec"]), "head_rows": head_rows, "batches": list(batches),
                   "functions": {str(b): f"forward_b{b}" for b in batches}},
        "schedule": dict(sched),
        "tuned": bool(tuned),
        "train_step": None,
    }
    return data, entry


def build_train_step(bundle: Bundle, target_name: str, log=print) -> tuple[bytes | None, dict]:
    """The training step library (``compiler/tvm_train.py``), or (None, why it is missing)."""
    from edgecl.compiler.tvm_train import compile_train_step

    try:
        return compile_train_step(bundle.model, target_name, head_rows_for(bundle), log=log)
    except Exception as e:  # an op without a gradient, a toolchain problem: ship the forward
        return None, {"status": f"not built: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def compile_bundle(bundle_dir: str | Path, target: str = "host", tune_trials: int = 0,
                   log=print, train: bool = True) -> int:
    """Add ``target``'s compiled forward pass (and, with ``train``, its training step:
    ``targets.<target>.train_step``) to the bundle as a new version; returns it."""
    root = Path(bundle_dir)
    bundle = Bundle.open(root)
    data, entry = build_library(bundle, target, tune_trials, log=log)
    rel = f"targets/{target}/forward-{hashlib.sha256(data).hexdigest()[:16]}.so"
    entry = dict(entry, file=rel)
    files = {rel: data}
    if train:
        tdata, tentry = build_train_step(bundle, target, log=log)
        if tdata is not None:
            trel = f"targets/{target}/train-{hashlib.sha256(tdata).hexdigest()[:16]}.so"
            files[trel] = tdata
            tentry = dict(tentry, file=trel)
        entry["train_step"] = tentry
    cuda_data, cuda = build_cuda(bundle, target, entry["schedule"], entry["layout"]["head_rows"],
                                 entry["layout"]["batches"], log=log)
    if cuda_data is not None:
        crel = f"targets/{target}/forward-cuda-{hashlib.sha256(cuda_data).hexdigest()[:16]}.so"
        files[crel] = cuda_data
        cuda = dict(cuda, file=crel)
    entry["cuda"] = cuda

    def update(manifest: dict) -> None:
        if manifest["model"] != bundle.model:
            raise ValueError("the bundle's architecture changed while compiling")
        old = manifest.get("targets", {}).get(target)
        for key in ("file",):
            if old and old.get(key) not in files:
                manifest["files"].pop(old[key], None)
        for sub in ("cuda", "train_step"):
            old_sub = (old or {}).get(sub) or {}
            if old_sub.get("file") and old_sub["file"] not in files:
                manifest["files"].pop(old_sub["file"], None)
        manifest.setdefault("targets", {})[target] = entry

    return commit_files(root, files, update)
