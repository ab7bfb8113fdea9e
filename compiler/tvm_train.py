"""A compiled training step (forward + backward of the masked model) per architecture.

Built from the layer table as a Relax function, differentiated by
``relax.transform.Gradient`` and compiled for a target like the forward library; the
device runs it with the TVM runtime only (``runtime/backends/tvm_train.py``).

The compiled function ``train_step`` (one static batch size ``B``, the head padded to
``head_rows`` like the forward library) takes, all float32::

    x        [B, *input_shape]         the batch (rows beyond the real ones: zeros)
    y        [B, head_rows]            label weights: one-hot / n for the n real rows,
                                       zero rows for padding, zero columns past the classes
    for every linear/conv2d layer in table order:
      <name>.weight  W_eff = W ⊙ M     [out, in] / [O, C, kh, kw]  (PyTorch layout)
      <name>.bias    (if the layer has one)
    head.weight [head_rows, F]         the task's head, zero rows past its classes
    head.bias   [head_rows]            its bias, PAD_LOGIT (-1e9) past its classes

and returns ``((loss, logits), (dL/d<every weight input above, same order>))`` where
``loss = -sum(y ⊙ log_softmax(logits))`` — the mean softmax cross-entropy over the real
rows — and ``logits`` ``[B, head_rows]``. The gradients are with respect to the
*effective* weights ``W_eff``: a method turns them into its own update (PackNet:
``dL/dW_eff ⊙ free``; SupSup / Piggyback scores by straight-through:
``dL/dW_eff ⊙ W``; HAT: gate the rows by the cumulative unit mask). Padded head rows get
exactly zero gradient, padded batch rows contribute nothing, so batches of any size are
zero-padded to ``B`` (or cut into chunks of ``B`` whose gradients add up).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from edgecl.compiler import targets as tg

TRAIN_BATCH = 32
PAD_LOGIT = -1e9
FUNCTION = "train_step"
TRAIN_TI = 8  # matmul register tile rows (4 and 8 measure the same on x86; 2 is 1.5x slower)


def param_names(layers: Sequence[Mapping]) -> list[str]:
    """The weight inputs of ``train_step`` (and its gradients), in order."""
    names = []
    for layer in layers:
        if layer["op"] in ("linear", "conv2d"):
            names.append(f"{layer['name']}.weight")
            if layer.get("bias", True):
                names.append(f"{layer['name']}.bias")
    return names + ["head.weight", "head.bias"]


def build_relax(model: Mapping, batch: int, head_rows: int):
    """An IRModule whose ``train_step`` is the loss function (before differentiation)."""
    from tvm import relax
    from tvm.relax.op import add, matmul, maximum, multiply, negative, permute_dims, reshape, sum
    from tvm.relax.op.nn import conv2d, log_softmax, max_pool2d

    def tensor(name, shape):
        return relax.Var(name, relax.TensorType([int(s) for s in shape], "float32"))

    layers = model["layers"]
    in_shape = [int(s) for s in model["input_shape"]]
    x = tensor("x", [batch, *in_shape])
    y = tensor("y", [batch, head_rows])
    bb = relax.BlockBuilder()
    weights = []
    for layer in layers:
        if layer["op"] == "linear":
            weights.append((f"{layer['name']}.weight", [layer["out_features"], layer["in_features"]]))
        elif layer["op"] == "conv2d":
            k = layer["kernel_size"]
            weights.append((f"{layer['name']}.weight", [layer["out_channels"], layer["in_channels"], k, k]))
        else:
            continue
        if layer.get("bias", True):
            weights.append((f"{layer['name']}.bias", [weights[-1][1][0]]))
    feat = int(model["feature_dim"])
    weights += [("head.weight", [head_rows, feat]), ("head.bias", [head_rows])]
    vars_ = {name: tensor(name, s) for name, s in weights}
    params = [x, y, *vars_.values()]
    zero = relax.const(0.0, "float32")
    with bb.function(FUNCTION, params):
        with bb.dataflow():
            h = x
            for layer in layers:
                op = layer["op"]
                if op == "linear":
                    h = bb.emit(matmul(h, permute_dims(vars_[f"{layer['name']}.weight"])))
                    if layer.get("bias", True):
                        h = bb.emit(add(h, vars_[f"{layer['name']}.bias"]))
                elif op == "conv2d":
                    s, p = int(layer.get("stride", 1)), int(layer.get("padding", 0))
                    h = bb.emit(conv2d(h, vars_[f"{layer['name']}.weight"], strides=s, padding=p))
                    if layer.get("bias", True):
                        b = reshape(vars_[f"{layer['name']}.bias"], [1, -1, 1, 1])
                        h = bb.emit(add(h, b))
                elif op == "relu":
                    # maximum(0, h), not relu(h): Relax's relu gradient passes the gradient
                    # at h == 0 (where(h < 0, 0, g)); PyTorch's and this one's do not. A unit
                    # switched off by a mask sits exactly at 0, so this is not a corner case.
                    h = bb.emit(maximum(zero, h))
                elif op == "maxpool2d":
                    k = int(layer["kernel_size"])
                    h = bb.emit(max_pool2d(h, pool_size=k, strides=k))
                elif op == "flatten":
                    h = bb.emit(reshape(h, [batch, -1]))
                else:
                    raise ValueError(f"layer table: unknown op {op!r}")
            logits = bb.emit(add(matmul(h, permute_dims(vars_["head.weight"])), vars_["head.bias"]))
            loss = bb.emit_output(negative(sum(multiply(y, log_softmax(logits)))))
            logits = bb.emit_output(logits)
        # a literal tuple (not a bound one): Gradient picks element 0 as its target
        bb.emit_func_output(relax.Tuple([loss, logits]))
    return bb.get(), list(params[2:])


def build_train_module(model: Mapping, batch: int, head_rows: int):
    """The differentiated module: ``train_step`` returns (loss, logits), gradients."""
    from tvm import relax

    mod, weight_vars = build_relax(model, batch, head_rows)
    mod = relax.transform.Gradient(FUNCTION, require_grads=weight_vars, target_index=0)(mod)
    adj = mod[FUNCTION + "_adjoint"]
    # ship only the adjoint, under the plain name
    out = type(mod)({})
    out[FUNCTION] = adj.with_attr("global_symbol", FUNCTION)
    return out


# -- schedules ------------------------------------------------------------------------
# The differentiated module, legalized and fused, is a few dozen small PrimFuncs. Three
# kinds matter (profiled, MLP 64-256-256 at batch 32, untuned 4.6 ms per step):
#   * matmuls C[i, j] = sum_k A[i, k] B[k, j] (forward, d input = g @ W, dW = g^T @ h,
#     each with its fused epilogue: bias add, relu mask): scheduled like tvm_build's
#     linear layer (ti rows x vec lanes register tile, k innermost-but-two, epilogue
#     inlined into the accumulator write-back);
#   * 2-d transposes (W^T every step, since W_eff changes each step; g^T): a 16x16 tiled
#     copy, vectorized over the output row (the naive one strides through memory:
#     70 us for a 256x256 weight);
#   * direct convolutions O[a, b, h, w] = sum_{r0, r1, r2} ... (forward conv, its input
#     gradient as conv2d_transpose, its weight gradient as a conv over the batch), in
#     TOPI's NCHW layouts: a (CONV_ROWS of a) x (vec of b) register tile per output pixel,
#     vectorized over b (a gathered load, amortized over the CONV_ROWS FMAs);
#   * everything else (softmax, sums, pooling backward) is small and left alone.
TRANSPOSE_TILE = 16
CONV_ROWS = 16  # measured on the CNN at b32: 4 rows 0.65 ms, 8 0.51, 16 0.45 per step


def _is_matmul(sch, blk) -> bool:
    b = sch.get(blk)
    return (b.init is not None and [int(iv.iter_type) for iv in b.iter_vars] == [0, 0, 2]
            and len(sch.get_loops(blk)) == 3)


def _is_conv(sch, blk) -> bool:
    b = sch.get(blk)
    return (b.init is not None and [int(iv.iter_type) for iv in b.iter_vars] == [0, 0, 0, 0, 2, 2, 2]
            and len(sch.get_loops(blk)) == 7)


def _is_transpose(sch, blk) -> bool:
    b = sch.get(blk)
    return ("transpose" in b.name_hint and b.init is None and len(b.iter_vars) == 2
            and all(int(iv.iter_type) == 0 for iv in b.iter_vars) and len(sch.get_loops(blk)) == 2)


def _schedule_func(func, vec: int, ti: int):
    """``func`` with its matmul and transpose blocks scheduled; None if it has neither."""
    import math

    import tvm
    from tvm.s_tir.dlight.analysis import get_root_block

    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    matmuls = [sch.get(b).name_hint for b in blocks if _is_matmul(sch, b)]
    transposes = [sch.get(b).name_hint for b in blocks if _is_transpose(sch, b)]
    convs = [sch.get(b).name_hint for b in blocks if _is_conv(sch, b)]
    if not matmuls and not transposes and not convs:
        return None
    for name in transposes:
        i, j = sch.get_loops(sch.get_sblock(name))
        io, ii = sch.split(i, [None, math.gcd(TRANSPOSE_TILE, int(sch.get(i).extent))])
        jo, ji = sch.split(j, [None, math.gcd(TRANSPOSE_TILE, int(sch.get(j).extent))])
        sch.reorder(io, jo, ii, ji)
        sch.vectorize(ji)
    for name in matmuls + convs:
        blk = sch.get_sblock(name)
        consumers = sch.get_consumers(blk)
        loops = sch.get_loops(blk)
        i, j, reduce = loops[0], loops[1], loops[len(loops) // 2 + 1:]
        pixel = loops[2:len(loops) // 2 + 1]  # conv: the output's h, w
        t = math.gcd(ti if name in matmuls else (CONV_ROWS if vec >= 16 else 8), int(sch.get(i).extent))
        v = math.gcd(vec, int(sch.get(j).extent))
        io, ii = sch.split(i, [None, t])
        jo, ji = sch.split(j, [None, v])
        sch.reorder(io, jo, *pixel, *reduce, ii, ji)
        acc = sch.cache_write(blk, 0, "local")
        sch.reverse_compute_at(acc, pixel[-1] if pixel else jo)
        sch.unroll(ii)
        sch.vectorize(ji)
        init = sch.decompose_reduction(blk, reduce[0])
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(acc)[-1])
        for c in consumers:  # bias, relu mask: into the write-back (else its own loop)
            try:
                sch.reverse_compute_inline(c)
            except Exception:  # noqa: BLE001 - a consumer that cannot be inlined stays as is
                pass
    return sch.mod["main"]


def schedule_module(mod, vec: int, ti: int, log=None):
    """Schedule every PrimFunc of a legalized, fused module that ``_schedule_func`` can;
    a function whose schedule fails is kept unscheduled (correct, only slower)."""
    import tvm
    from tvm import tirx

    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            try:
                func = _schedule_func(func, vec, ti) or func
            except Exception as e:  # noqa: BLE001
                if log:
                    log(f"  {gv.name_hint}: left unscheduled ({type(e).__name__})")
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)


def lower_and_schedule(model: Mapping, target_name: str, head_rows: int, batch: int = TRAIN_BATCH,
                       log=None):
    """The differentiated module, legalized, fused (the CPU pipeline's passes) and scheduled."""
    import tvm
    from tvm import relax

    target = tvm.target.Target(tg.cpu_target(target_name))
    sched = tg.default_schedule(target_name, tg.cpu_target(target_name))
    mod = build_train_module(model, batch, head_rows)
    with target:
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])(mod)
    return schedule_module(mod, int(sched["vec"]), TRAIN_TI, log=log), target


def compile_train_step(model: Mapping, target_name: str, head_rows: int, batch: int = TRAIN_BATCH,
                       log=print) -> tuple[bytes, dict]:
    """The exported library bytes and the manifest entry ``targets.<t>.train_step``."""
    import tvm

    t0 = time.perf_counter()
    mod, target = lower_and_schedule(model, target_name, head_rows, batch, log=log)
    ex = tvm.compile(mod, target=target)
    from .tvm_build import export_bytes

    data = export_bytes(ex, target_name)
    log(f"{target_name}: train step built in {time.perf_counter() - t0:.1f} s ({len(data)} bytes)")
    entry = {
        "function": FUNCTION,
        "kind": "relax-vm",
        "batch": int(batch),
        "head_rows": int(head_rows),
        "pad_logit": PAD_LOGIT,
        "inputs": ["x", "y", *param_names(model["layers"])],
        "outputs": {"loss": "-sum(y * log_softmax(logits)) (y = one-hot / n)",
                    "logits": [int(batch), int(head_rows)],
                    "grads": [f"d_{n}" for n in param_names(model["layers"])]},
        "gradients_of": "effective weights W_eff = W * M, biases and head (PyTorch layouts)",
        "schedule": "matmul/transpose rules (compiler/tvm_train.py)",
    }
    return data, entry
