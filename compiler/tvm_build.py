"""Per-target TVM artifacts: the model graph's forward pass, weights as inputs.

``compile_bundle(bundle_dir, target)`` builds one shared library per architecture (not
per task) and commits it to the bundle as a new version under the manifest's
``targets`` key. The runtime (``edgecl.runtime.backends.tvm``) loads it with the TVM
runtime only.

How the library is made (no op switch here: every op's Relax form comes from the op
registry, ``Op.tvm``):

1. **Relax from the graph.** One function per static batch size, ``forward_b{B}(x,
   <param>..., head.weight, head.bias)``: the graph's backbone nodes in order, each
   emitted by its op's ``tvm`` method, then the task head (a Linear, padded to
   ``head_rows``). Every parameter is a function input, named by its graph name.
2. **Layout and weight pre-packing, derived.** ``ConvertLayout`` makes convolutions
   NHWC / HWIO (pooling and elementwise ops follow); ``LiftTransformParams`` moves every
   computation that depends on weights only (the Linear transposes, the OIHW -> HWIO
   kernels, a BatchNormalization's scale and shift, ...) into one function,
   ``transform_params``, that the runtime runs once per task activation. The forward
   functions then take the transformed weights.
3. **Legalize and fuse** (TOPI, ``FuseOps``/``FuseTIR``): one PrimFunc per conv/matmul
   with its epilogue (bias, activation, residual add).
4. **Schedule** every PrimFunc by its TIR pattern (:func:`schedule_module`): a
   reduction block whose output's last axis is contiguous in an input (matmul, batched
   matmul, NHWC convolution incl. grouped/depthwise, pooling, global pooling) gets a
   register tile (``rows`` x ``acc`` vectors of ``vec`` lanes), its epilogue inlined
   into the accumulator write-back; 2-d transposes are tiled. Anything else stays as
   legalized (correct, LLVM-vectorized at best).
5. ``tvm.compile`` to a Relax VM executable and ``export_library`` (cross-linked with
   ``aarch64-linux-gnu-g++`` for the boards).

``tune_trials > 0`` measures up to that many configurations of the rule parameters
(``vec``, ``rows``, ``acc``) on this machine (host target only) and stores the winner in
a tuning database (``$EDGECL_CACHE/tune`` or ``~/.cache/edgecl/tune``), reused by the
next compile of the same architecture on the same target.
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
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_write import commit_files
from edgecl.runtime.graph import Graph
from edgecl.runtime.ops import get_op

BATCHES = (1, 8, 32)
TRANSFORM = "transform_params"
# Changes whenever what is built from a graph changes (invalidates tuning records).
BUILDER = "relax-graph-1"


# -- Relax from the graph -----------------------------------------------------------
def backbone_params(graph: Graph) -> list[str]:
    """The parameters the backbone reads, in the graph's order (the functions' inputs)."""
    used = {i for n in graph.backbone_nodes for i in n.inputs}
    return [name for name in graph.params if name in used]


def tensor_var(name: str, shape: Sequence[int], dtype: str = "float32"):
    from tvm import relax

    return relax.Var(name, relax.TensorType([int(s) for s in shape], dtype))


def emit_backbone(bb, graph: Graph, x, params: Mapping, batch: int):
    """Emit the backbone into ``bb`` (inside a dataflow block) through the op registry;
    returns the features expression."""
    shapes = graph.shapes(batch)
    env = {graph.input.name: x, **params}
    for n in graph.backbone_nodes:
        try:
            outs = get_op(n.op).tvm(bb, [env[i] for i in n.inputs], n.attrs, [shapes[i] for i in n.inputs])
        except NotImplementedError as e:
            raise ValueError(f"node {n.name!r}: {e}") from None
        if len(outs) != len(n.outputs):
            raise ValueError(f"node {n.name!r} ({n.op}): its TVM emission made {len(outs)} outputs, "
                             f"the graph names {len(n.outputs)}")
        env.update(zip(n.outputs, outs, strict=True))
    return env[graph.features]


def function_inputs(graph: Graph, batch: int, head_rows: int) -> tuple:
    """(x, {param name: var}, head.weight var, head.bias var) of one static batch size."""
    x = tensor_var(graph.input.name, (batch, *graph.input_shape), graph.input.dtype)
    params = {n: tensor_var(n, graph.params[n].shape) for n in backbone_params(graph)}
    hw = tensor_var("head.weight", (head_rows, graph.feature_dim))
    hb = tensor_var("head.bias", (head_rows,))
    return x, params, hw, hb


def build_relax(graph: Graph, batches: Sequence[int], head_rows: int):
    """An IRModule with ``forward_b{B}(x, *params, head.weight, head.bias) -> logits``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    for batch in batches:
        x, params, hw, hb = function_inputs(graph, batch, head_rows)
        with bb.function(f"forward_b{batch}", [x, *params.values(), hw, hb], attrs={"num_input": 1}):
            with bb.dataflow():
                feat = emit_backbone(bb, graph, x, params, batch)
                out = bb.emit_output(relax.op.linear(feat, hw, hb))
            bb.emit_func_output(out)
    return bb.get()


# -- schedules ----------------------------------------------------------------------
def vec_for(n: int, vec: int) -> int:
    """The widest lane count <= ``vec`` that divides ``n`` (a power of two, else 1)."""
    v = vec
    while v > 1 and n % v:
        v //= 2
    return max(v, 1)


def _is_var(expr, var) -> bool:
    from tvm import tirx

    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _divisors(n: int, most: int) -> list[int]:
    return [d for d in range(1, min(n, most) + 1) if n % d == 0]


def register_tile(n_rows: int, n_vecs: int, rows: int, acc: int, inner: int | None = None) -> tuple[int, int]:
    """(rows, vectors) of a register tile over ``n_rows`` x ``n_vecs`` vectors: at most
    ``rows`` rows and ``acc`` accumulators, the most FMAs per load (rows + vectors loads
    feed rows x vectors FMAs), then the largest. With ``inner`` (rows fused from two axes,
    the inner one of that extent) a tile stays rectangular: within one outer index, or
    whole ones."""
    ok = [d for d in _divisors(n_rows, rows) if inner is None or inner % d == 0 or d % inner == 0]
    tiles = [(ti, jt) for ti in ok for jt in _divisors(n_vecs, acc) if ti * jt <= acc]
    return max(tiles, key=lambda t: (t[0] * t[1] / (t[0] + t[1]), t[0] * t[1], t[0]))


def _tile_reduction(sch, blk, vec: int, rows: int, acc: int) -> bool:
    """Register-tile a reduction block ``O[..., i, j] = red_{r...} f(...)`` whose output's
    last index is its last spatial iterator ``j`` and some input is contiguous in ``j``:
    ``rows`` of ``i`` x up to ``acc / rows`` vectors of ``vec`` lanes of ``j``, reductions
    outside the tile, accumulators in registers, the epilogue inlined into the write-back.
    Returns False (schedule untouched) when the block does not have that form."""
    b = sch.get(blk)
    if b.init is None or len(b.writes) != 1:
        return False
    kinds = [int(iv.iter_type) for iv in b.iter_vars]  # 0: spatial, 2: reduction
    loops = sch.get_loops(blk)
    ns = kinds.count(0)
    if not 0 < ns < len(kinds) or len(loops) != len(kinds) or kinds != [0] * ns + [2] * (len(kinds) - ns):
        return False
    jvar = b.iter_vars[ns - 1].var
    if not _is_var(b.writes[0].region[-1].min, jvar):
        return False
    if not any(_is_var(r.region[-1].min, jvar) for r in b.reads if not r.source.same_as(b.writes[0].source)):
        return False
    ext = [int(sch.get(loop).extent) for loop in loops]
    v = vec_for(ext[ns - 1], vec)
    if v < 2:
        return False
    spatial, red = loops[:ns], loops[ns:]
    # producers computed per outermost item (a conv's padded image stays in L1)
    if ns >= 4:
        for p in sch.get_producers(blk):
            try:
                sch.compute_at(p, spatial[0], preserve_unit_loops=True)
            except Exception:  # noqa: BLE001 - a producer that cannot move stays where it is
                pass
        loops = sch.get_loops(blk)
        spatial, red = loops[len(loops) - len(kinds):][:ns], loops[len(loops) - len(kinds):][ns:]
    n_rows, inner = (ext[ns - 2] if ns >= 2 else 1), None
    if ns >= 3:  # the two axes before j as one (a conv's output pixels): tiles span image rows
        spatial = [*spatial[:-3], sch.fuse(spatial[-3], spatial[-2]), spatial[-1]]
        n_rows, inner = n_rows * ext[ns - 3], n_rows
    ti, jt = register_tile(n_rows, ext[ns - 1] // v, rows, acc, inner)
    jo, jt_loop, ji = sch.split(spatial[-1], [None, jt, v])
    if ns >= 2:
        io, ii = sch.split(spatial[-2], [None, ti])
        sch.reorder(io, jo, *red, ii, jt_loop, ji)
        sch.unroll(ii)
    else:
        sch.reorder(jo, *red, jt_loop, ji)
    wb = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(wb, jo)
    sch.unroll(jt_loop)
    sch.vectorize(ji)
    init = sch.decompose_reduction(blk, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    while True:  # bias, activation, residual add ...: into the write-back
        cons = sch.get_consumers(wb)
        if len(cons) != 1:
            break
        try:
            sch.reverse_compute_inline(cons[0])
        except Exception:  # noqa: BLE001 - a consumer that cannot be inlined keeps its own loop
            break
    sch.vectorize(sch.get_loops(wb)[-1])
    return True


TRANSPOSE_TILE = 16


def _tile_transpose(sch, blk) -> bool:
    """A 2-d transpose ``O[i, j] = A[j, i]``: 16 x 16 tiles, vectorized over the output row
    (the naive loop strides through memory)."""
    b = sch.get(blk)
    loops = sch.get_loops(blk)
    if (b.init is not None or len(b.iter_vars) != 2 or len(loops) != 2 or len(b.reads) != 1
            or any(int(iv.iter_type) != 0 for iv in b.iter_vars)):
        return False
    i, j = (iv.var for iv in b.iter_vars)
    idx = b.reads[0].region
    if len(idx) != 2 or not (_is_var(idx[0].min, j) and _is_var(idx[1].min, i)):
        return False
    io, ii = sch.split(loops[0], [None, math.gcd(TRANSPOSE_TILE, int(sch.get(loops[0]).extent))])
    jo, ji = sch.split(loops[1], [None, math.gcd(TRANSPOSE_TILE, int(sch.get(loops[1]).extent))])
    sch.reorder(io, jo, ii, ji)
    sch.vectorize(ji)
    return True


def schedule_func(func, sched: Mapping):
    """``func`` with the blocks the rules recognize scheduled; None if none was."""
    import tvm
    from tvm.s_tir.dlight.analysis import get_root_block

    sch = tvm.s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(get_root_block(sch))]
    done = False
    for name in names:
        try:
            blk = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - inlined into an earlier block's write-back
            continue
        done |= (_tile_reduction(sch, blk, int(sched["vec"]), int(sched["rows"]), int(sched["acc"]))
                 or _tile_transpose(sch, blk))
    return sch.mod["main"] if done else None


def schedule_module(mod, sched: Mapping, log=None):
    """Every PrimFunc of a legalized, fused module scheduled by the rules; a function a
    rule fails on is kept as legalized (correct, only slower)."""
    import tvm
    from tvm import tirx

    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            try:
                func = schedule_func(func, sched) or func
            except Exception as e:  # noqa: BLE001
                if log:
                    why = str(e).splitlines()[0][:80] if str(e) else ""
                    log(f"  {gv.name_hint}: left unscheduled ({type(e).__name__}: {why})")
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)


def fuse_passes():
    from tvm import relax

    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination()]


def lower_cpu(mod, target: dict, sched: Mapping, log=None):
    """The forward module: NHWC, weight transforms lifted, legalized, fused, scheduled."""
    import tvm
    from tvm import relax

    with tvm.target.Target(target):
        mod = tvm.transform.Sequential([
            relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
            relax.transform.LiftTransformParams(shared_transform=True),
            *fuse_passes(),
        ])(mod)
    return schedule_module(mod, sched, log=log)


def compile_module(mod, target: dict):
    import tvm

    return tvm.compile(mod, target=tvm.target.Target(target))


def build_executable(graph: Graph, target: dict, head_rows: int, batches: Sequence[int], sched: Mapping,
                     log=None):
    mod = lower_cpu(build_relax(graph, batches, head_rows), target, sched, log=log)
    return compile_module(mod, target)


# -- running a built library here (tuning, checks) ------------------------------------
def _vm(ex):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(ex, tvm.cpu())


def random_weights(graph: Graph, head_rows: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(graph.params[n].shape, dtype=np.float32) * np.float32(0.1)
           for n in backbone_params(graph)]
    return out + [rng.standard_normal((head_rows, graph.feature_dim), dtype=np.float32),
                  np.zeros(head_rows, np.float32)]


def measure(ex, graph: Graph, head_rows: int, batches: Sequence[int], repeat: int = 200) -> dict[int, float]:
    """Seconds per call of each ``forward_b{B}`` (random weights): the fastest of single
    calls, which a busy machine distorts far less than the mean of a long run."""
    import tvm

    vm = _vm(ex)
    weights = list(vm[TRANSFORM]([tvm.runtime.tensor(w) for w in random_weights(graph, head_rows)]))
    rng = np.random.default_rng(0)
    out = {}
    for batch in batches:
        fn = vm[f"forward_b{batch}"]
        x = rng.standard_normal((batch, *graph.input_shape)).astype(graph.input.dtype)
        if graph.input.dtype == "int64":
            x = np.abs(x).astype(np.int64)
        xt = tvm.runtime.tensor(x)
        fn(xt, *weights)
        best = math.inf
        for _ in range(max(20, repeat // batch)):
            t = time.perf_counter()
            fn(xt, *weights)
            best = min(best, time.perf_counter() - t)
        out[batch] = best
    return out


# -- tuning -------------------------------------------------------------------------
def arch_key(graph: Graph, head_rows: int, batches: Sequence[int]) -> str:
    blob = json.dumps({"graph": graph.to_dict(), "head_rows": head_rows, "batches": list(batches),
                       "builder": BUILDER}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("EDGECL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "edgecl") / "tune"


def _db_path(target_name: str, target: dict, key: str) -> Path:
    import tvm

    t = hashlib.sha256(json.dumps([target, tvm.__version__], sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir() / f"{target_name}-{key}-{t}.json"


def _candidates(default: Mapping) -> list[dict]:
    grid = [{"vec": v, "rows": r, "acc": a}
            for v, r, a in itertools.product((16, 8, 32), (8, 4, 2, 1), (16, 8, 12, 24))]
    grid.sort(key=lambda c: c != dict(default))
    return grid


def tune(target_name: str, target: dict, graph: Graph, head_rows: int, batches: Sequence[int],
         trials: int, log=print) -> tuple[dict, bool]:
    """The schedule parameters to build with: from the tuning database, or measured now
    (host only; cost = sum over batch sizes of seconds per sample)."""
    default = tg.default_schedule(target_name, target)
    key = arch_key(graph, head_rows, batches)
    db = _db_path(target_name, target, key)
    if db.is_file():
        rec = json.loads(db.read_text())
        log(f"tuning database hit: {db}")
        return dict(rec["best"]), True
    if trials <= 0 or not tg.is_native(target_name):
        return dict(default), False
    results = []
    for cand in _candidates(default)[:trials]:
        try:
            t = measure(build_executable(graph, target, head_rows, batches, cand), graph, head_rows, batches)
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


def layout_entry(graph: Graph, head_rows: int, batches: Sequence[int]) -> dict:
    """How the runtime calls the library (manifest ``targets.<t>.layout``)."""
    return {"kind": "relax-vm", "head_rows": int(head_rows), "batches": [int(b) for b in batches],
            "functions": {str(b): f"forward_b{b}" for b in batches},
            "transform": TRANSFORM, "params": [*backbone_params(graph), "head.weight", "head.bias"],
            "input": {"name": graph.input.name, "dtype": graph.input.dtype}}


def build_cuda(bundle: Bundle, target_name: str, head_rows: int, batches: Sequence[int],
               log=print) -> tuple[bytes | None, dict | None]:
    """The GPU library of a target that has one (the same Relax module, NCHW, DLight's
    default GPU rules); (None, reason) when it cannot be built here."""
    import shutil

    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    cuda = tg.TARGETS[target_name].get("cuda")
    if cuda is None:
        return None, None
    if shutil.which("nvcc") is None:
        return None, {"status": "not built: TVM compiles CUDA with nvcc and no CUDA toolkit is "
                                "installed on this build machine; the CPU library is shipped"}
    graph = bundle.graph
    target = dict(cuda, host=tg.cpu_target(target_name))
    try:
        tgt = tvm.target.Target(target)
        mod = build_relax(graph, batches, head_rows)
        with tgt:
            mod = tvm.transform.Sequential([
                relax.transform.LiftTransformParams(shared_transform=True), *fuse_passes(),
                dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
            ])(mod)
        data = export_bytes(tvm.compile(mod, target=tgt), target_name)
    except Exception as e:  # record why, ship the CPU part
        return None, {"status": f"not built: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    log(f"{target_name}: CUDA library built ({len(data)} bytes; not run: no such GPU here)")
    return data, {"status": "built with DLight GPU rules; not verified on a GPU", "target": target,
                  "layout": dict(layout_entry(graph, head_rows, batches), device="cuda")}


def build_library(bundle: Bundle, target_name: str, tune_trials: int = 0, batches=BATCHES,
                  log=print) -> tuple[bytes, dict]:
    """Compile and export the library for ``target_name``; returns (bytes, manifest entry)."""
    import tvm

    target = tg.cpu_target(target_name)
    graph = bundle.graph
    head_rows = head_rows_for(bundle)
    sched, tuned = tune(target_name, target, graph, head_rows, batches, tune_trials, log=log)
    t0 = time.perf_counter()
    data = export_bytes(build_executable(graph, target, head_rows, batches, sched, log=log), target_name)
    log(f"{target_name}: built in {time.perf_counter() - t0:.1f} s ({len(data)} bytes)")
    entry = {
        "tvm_version": tvm.__version__,
        "target": target,
        "machine": tg.TARGETS[target_name]["machine"] if target_name != "host" else tg.host_machine(),
        "arch": bundle.model.get("arch"),
        "arch_key": arch_key(graph, head_rows, batches),
        "layout": layout_entry(graph, head_rows, batches),
        "schedule": dict(sched),
        "tuned": bool(tuned),
        "train_step": None,
    }
    return data, entry


def build_train_step(bundle: Bundle, target_name: str, log=print) -> tuple[bytes | None, dict]:
    """The training step library (``compiler/tvm_train.py``), or (None, why it is missing)."""
    from edgecl.compiler.tvm_train import compile_train_step

    try:
        return compile_train_step(bundle.graph, target_name, head_rows_for(bundle), log=log)
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
    cuda_data, cuda = build_cuda(bundle, target, entry["layout"]["head_rows"], entry["layout"]["batches"],
                                 log=log)
    if cuda_data is not None:
        crel = f"targets/{target}/forward-cuda-{hashlib.sha256(cuda_data).hexdigest()[:16]}.so"
        files[crel] = cuda_data
        cuda = dict(cuda, file=crel)
    entry["cuda"] = cuda

    def update(manifest: dict) -> None:
        main = manifest["backbones"][bundle.main]["graph"]
        if manifest["graphs"].get(main) != bundle.model:
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
