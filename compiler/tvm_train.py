"""A compiled training step (forward + backward of the masked model) per architecture.

Built from the model graph like the forward library (``compiler/tvm_build.py``): the
backbone is emitted node by node by the op registry (``Op.tvm``), the task head (a
Linear) and the loss follow, ``relax.transform.Gradient`` differentiates it, and it is
compiled for a target like the forward library; the device runs it with the TVM
runtime only (``runtime/backends/tvm_train.py``).

The compiled function ``train_step`` (one static batch size ``B``, the head padded to
``head_rows`` like the forward library) takes::

    x        [B, *input_shape]         the batch (rows beyond the real ones: zeros)
    y        [B, head_rows]            label weights: one-hot / n for the n real rows,
                                       zero rows for padding, zero columns past the classes
    every parameter the backbone reads, by its graph name, in the graph's order
             (a masked weight is the effective one, W_eff = W ⊙ M; PyTorch layouts)
    head.weight [head_rows, F]         the task's head, zero rows past its classes
    head.bias   [head_rows]            its bias, PAD_LOGIT (-1e9) past its classes

and returns ``((loss, logits), (dL/d<g> for g in gradients))`` where ``gradients`` are
the masked weights (``graph.mask_sites()``) with their biases, then ``head.weight`` and
``head.bias`` (manifest ``targets.<t>.train_step.gradients``); ``loss = -sum(y ⊙
log_softmax(logits))`` — the mean softmax cross-entropy over the real rows — and
``logits`` ``[B, head_rows]``. The gradients are with respect to the *effective* weights
``W_eff``: a method turns them into its own update (PackNet: ``dL/dW_eff ⊙ free``;
SupSup / Piggyback scores by straight-through: ``dL/dW_eff ⊙ W``; HAT: gate the rows by
the cumulative unit mask). Padded head rows get exactly zero gradient, padded batch rows
contribute nothing, so batches of any size are zero-padded to ``B`` (or cut into chunks
of ``B`` whose gradients add up).

Relax has no gradient for a few ops the registry emits (``nn.gelu``, ``nn.gelu_tanh``,
``nn.layer_norm``); :func:`register_gradients` adds them (once per process).
"""

from __future__ import annotations

import time

from edgecl.compiler import targets as tg
from edgecl.compiler.tvm_build import emit_backbone, function_inputs, tensor_var
from edgecl.runtime.graph import Graph

TRAIN_BATCH = 32
PAD_LOGIT = -1e9
FUNCTION = "train_step"
TRAIN_TI = 8  # matmul register tile rows (4 and 8 measure the same on x86; 2 is 1.5x slower)


def grad_params(graph: Graph) -> list[str]:
    """The parameters ``train_step`` differentiates (before the head's): every masked
    weight and its bias, in the graph's order."""
    names = []
    for site in graph.mask_sites():
        names.append(site.weight)
        if site.bias is not None:
            names.append(site.bias)
    return names


# -- gradients Relax lacks ------------------------------------------------------------
def _gelu_grad(orig_var, orig_call, output_grad, ctx):
    """d gelu(x) = Phi(x) + x phi(x)  (the erf form)."""
    import math

    from tvm import relax
    from tvm.relax.op import erf, exp, multiply

    x = orig_call.args[0]

    def c(v):
        return relax.const(v, "float32")

    cdf = c(0.5) * (c(1.0) + erf(x * c(1 / math.sqrt(2))))
    pdf = exp(c(-0.5) * x * x) * c(1 / math.sqrt(2 * math.pi))
    return [multiply(output_grad, cdf + x * pdf)]


def _gelu_tanh_grad(orig_var, orig_call, output_grad, ctx):
    """d [x/2 (1 + tanh u)], u = sqrt(2/pi) (x + 0.044715 x^3)."""
    import math

    from tvm import relax
    from tvm.relax.op import tanh

    x = orig_call.args[0]

    def c(v):
        return relax.const(v, "float32")

    k = math.sqrt(2 / math.pi)
    t = tanh(c(k) * (x + c(0.044715) * x * x * x))
    d = c(0.5) * (c(1.0) + t) + c(0.5) * x * (c(1.0) - t * t) * c(k) * (c(1.0) + c(3 * 0.044715) * x * x)
    return [output_grad * d]


def _layer_norm_grad(orig_var, orig_call, output_grad, ctx):
    """x_hat = (x - mean) * inv, y = x_hat * gamma + beta over ``axes``."""
    import math

    from tvm import relax
    from tvm.relax.op import collapse_sum_to, mean, rsqrt, sum

    x, gamma, beta = orig_call.args
    attrs = orig_call.attrs
    shape = [int(d) for d in x.ty.shape]
    axes = sorted(int(a) % len(shape) for a in attrs.axes)
    n = math.prod(shape[a] for a in axes)
    g = output_grad
    mu = mean(x, axes, keepdims=True)
    d = x - mu
    inv = rsqrt(mean(d * d, axes, keepdims=True) + relax.const(float(attrs.epsilon), "float32"))
    xhat = d * inv
    gh = g * gamma
    gx = inv * relax.const(1.0 / n, "float32") * (
        relax.const(float(n), "float32") * gh - sum(gh, axes, keepdims=True)
        - xhat * sum(gh * xhat, axes, keepdims=True))
    return [gx, collapse_sum_to(g * xhat, gamma.ty.shape), collapse_sum_to(g, beta.ty.shape)]


def _conv2d_grad(orig_var, orig_call, output_grad, ctx):
    """Relax 0.27's conv2d gradient with the input gradient's ``output_padding`` computed
    for a *dilated* kernel (theirs omits the dilation and fails on any dilated conv)."""
    from tvm.relax.op import permute_dims, reshape, strided_slice
    from tvm.relax.op.nn import conv2d, conv2d_transpose

    attrs = orig_call.attrs
    data, weight = orig_call.args
    batch, out_channel, grad_h, grad_w = (int(d) for d in orig_var.ty.shape)
    _, in_channel, in_h, in_w = (int(d) for d in data.ty.shape)
    _, _, filter_h, filter_w = (int(d) for d in weight.ty.shape)
    pad_top, pad_left, pad_bottom, pad_right = (int(p) for p in attrs.padding)
    stride_h, stride_w = (int(s) for s in attrs.strides)
    dilation_h, dilation_w = (int(d) for d in attrs.dilation)
    groups = int(attrs.groups)
    out_h = (grad_h - 1) * stride_h - pad_top - pad_bottom + dilation_h * (filter_h - 1) + 1
    out_w = (grad_w - 1) * stride_w - pad_left - pad_right + dilation_w * (filter_w - 1) + 1
    data_grad = conv2d_transpose(output_grad, weight, attrs.strides, attrs.padding,
                                 (in_h - out_h, in_w - out_w), attrs.dilation, groups, "NCHW", "IOHW",
                                 "NCHW", attrs.out_dtype)
    if groups != 1:
        data = reshape(data, (batch, groups, in_channel // groups, in_h, in_w))
        data = permute_dims(data, [1, 0, 2, 3, 4])
        data = reshape(data, (batch * groups, in_channel // groups, in_h, in_w))
    weight_grad = conv2d(data, output_grad, strides=attrs.dilation, padding=attrs.padding,
                         dilation=attrs.strides, groups=groups, out_dtype=attrs.out_dtype,
                         data_layout="CNHW", kernel_layout="IOHW", out_layout="CNHW")
    wg_h = (in_h - (grad_h - 1) * stride_h - 1 + pad_top + pad_bottom) // dilation_h + 1
    wg_w = (in_w - (grad_w - 1) * stride_w - 1 + pad_left + pad_right) // dilation_w + 1
    if wg_h > filter_h or wg_w > filter_w:
        weight_grad = strided_slice(weight_grad, axes=[0, 1, 2, 3], begin=[0, 0, 0, 0],
                                    end=[out_channel, in_channel // groups, filter_h, filter_w])
    return [data_grad, weight_grad]


_GRADIENTS = {"relax.nn.gelu": _gelu_grad, "relax.nn.gelu_tanh": _gelu_tanh_grad,
              "relax.nn.layer_norm": _layer_norm_grad}
_OVERRIDES = {"relax.nn.conv2d": _conv2d_grad}  # replace Relax's own (level 10)
_REGISTERED: list[str] = []


def register_gradients() -> None:
    """Give Relax the gradients it lacks (or gets wrong) for ops the registry emits
    (once per process)."""
    import tvm
    from tvm.relax.op.base import register_gradient

    if _REGISTERED:
        return
    for name, fn in _GRADIENTS.items():
        if tvm.ir.Op.get(name).get_attr("FPrimalGradient") is None:
            register_gradient(name, fn)
    for name, fn in _OVERRIDES.items():
        register_gradient(name, fn, level=11)
    _REGISTERED.append("done")


# -- the loss function and its gradient -------------------------------------------------
def build_relax(graph: Graph, batch: int, head_rows: int):
    """An IRModule whose ``train_step`` is the loss function (before differentiation),
    and the variables to differentiate, in output order."""
    from tvm import relax
    from tvm.relax.op import linear, multiply, negative, sum
    from tvm.relax.op.nn import log_softmax

    x, params, hw, hb = function_inputs(graph, batch, head_rows)
    y = tensor_var("y", (batch, head_rows))
    bb = relax.BlockBuilder()
    with bb.function(FUNCTION, [x, y, *params.values(), hw, hb]):
        with bb.dataflow():
            feat = emit_backbone(bb, graph, x, params, batch)
            logits = bb.emit(linear(feat, hw, hb))
            loss = bb.emit_output(negative(sum(multiply(y, log_softmax(logits)))))
            logits = bb.emit_output(logits)
        # a literal tuple (not a bound one): Gradient picks element 0 as its target
        bb.emit_func_output(relax.Tuple([loss, logits]))
    return bb.get(), [params[n] for n in grad_params(graph)] + [hw, hb]


def build_train_module(graph: Graph, batch: int, head_rows: int):
    """The differentiated module: ``train_step`` returns (loss, logits), gradients."""
    from tvm import relax

    register_gradients()
    mod, weight_vars = build_relax(graph, batch, head_rows)
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
#     each with its fused epilogue: bias add, relu mask): a ti rows x vec lanes register
#     tile, k innermost-but-two, epilogue inlined into the accumulator write-back;
#   * 2-d transposes (W^T every step, since W_eff changes each step; g^T): a 16x16 tiled
#     copy, vectorized over the output row (the naive one strides through memory:
#     70 us for a 256x256 weight);
#   * direct convolutions O[a, b, h, w] = sum_{r0, r1, r2} ... (forward conv, its input
#     gradient as conv2d_transpose, its weight gradient as a conv over the batch), in
#     TOPI's NCHW layouts: a (CONV_ROWS of a) x (vec of b) register tile per output pixel,
#     vectorized over b (a gathered load, amortized over the CONV_ROWS FMAs);
#   * anything else (batched matmuls of attention, pooling, ...) gets the forward
#     library's pattern rules (tvm_build.schedule_func) or stays as legalized.
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


def schedule_module(mod, vec: int, ti: int, log=None, sched=None):
    """Schedule every PrimFunc of a legalized, fused module: the training rules above
    first, else the forward library's rules (``tvm_build.schedule_func``: batched matmuls,
    pooling, ...); a function whose schedule fails is kept unscheduled (correct, slower)."""
    import tvm
    from tvm import tirx

    from .tvm_build import schedule_func

    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            try:
                new = _schedule_func(func, vec, ti)
                if new is None and sched is not None:
                    new = schedule_func(func, sched)
                func = new or func
            except Exception as e:  # noqa: BLE001
                if log:
                    log(f"  {gv.name_hint}: left unscheduled ({type(e).__name__})")
        funcs[gv] = func
    return tvm.IRModule(funcs, attrs=mod.attrs)


def lower_and_schedule(graph: Graph, target_name: str, head_rows: int, batch: int = TRAIN_BATCH,
                       log=None):
    """The differentiated module, legalized, fused (the CPU pipeline's passes) and scheduled."""
    import tvm

    from .tvm_build import fuse_passes

    target = tvm.target.Target(tg.cpu_target(target_name))
    sched = tg.default_schedule(target_name, tg.cpu_target(target_name))
    mod = build_train_module(graph, batch, head_rows)
    with target:
        mod = tvm.transform.Sequential(fuse_passes())(mod)
    return schedule_module(mod, int(sched["vec"]), TRAIN_TI, log=log, sched=sched), target


def compile_train_step(graph: Graph, target_name: str, head_rows: int, batch: int = TRAIN_BATCH,
                       log=print) -> tuple[bytes, dict]:
    """The exported library bytes and the manifest entry ``targets.<t>.train_step``."""
    import tvm

    from .tvm_build import backbone_params, export_bytes

    t0 = time.perf_counter()
    mod, target = lower_and_schedule(graph, target_name, head_rows, batch, log=log)
    data = export_bytes(tvm.compile(mod, target=target), target_name)
    log(f"{target_name}: train step built in {time.perf_counter() - t0:.1f} s ({len(data)} bytes)")
    grads = [*grad_params(graph), "head.weight", "head.bias"]
    entry = {
        "function": FUNCTION,
        "kind": "relax-vm",
        "batch": int(batch),
        "head_rows": int(head_rows),
        "pad_logit": PAD_LOGIT,
        "inputs": [graph.input.name, "y", *backbone_params(graph), "head.weight", "head.bias"],
        "gradients": grads,
        "outputs": {"loss": "-sum(y * log_softmax(logits)) (y = one-hot / n)",
                    "logits": [int(batch), int(head_rows)],
                    "grads": [f"d_{n}" for n in grads]},
        "gradients_of": "effective weights W_eff = W * M, biases and head (PyTorch layouts)",
        "schedule": "matmul/transpose/conv rules (compiler/tvm_train.py), then tvm_build's",
    }
    return data, entry
