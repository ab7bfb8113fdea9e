"""The compiled kernels (``edgecl.kernels._native``, cffi API mode) behind the same
signatures and checks as their numpy twins in :mod:`edgecl.kernels.reference`.

Importing this module raises ImportError when the extension is missing or was built
for another ABI version; :mod:`edgecl.kernels` catches that and falls back to numpy.
"""

from __future__ import annotations

import threading

import numpy as np

from . import _checks as C
from . import _native as _ext  # ImportError here means "no native kernels"
from . import reference as R
from ._native import ffi, lib

NAME = "native"
ABI_VERSION = 5

if lib.ek_abi_version() != ABI_VERSION:
    raise ImportError(f"edgecl.kernels._native has ABI version {lib.ek_abi_version()}, "
                      f"this package needs {ABI_VERSION}: rebuild it (pip install .)")

BUILD_INFO = ffi.string(lib.ek_build_info()).decode()
PATH = getattr(_ext, "__file__", "?")


def _p(a: np.ndarray, ctype: str):
    """A C pointer into ``a`` (which the checks made C-contiguous and large enough)."""
    return ffi.from_buffer(ctype, a)


# ---------------------------------------------------------------- materialize

def materialize_bits(w: np.ndarray, bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    C.f32("w", w)
    C.bits("bits", bits, w.size)
    out = C.out_array("out", out, w.shape, np.float32)
    C.no_overlap(w=w, out=out)
    if w.size:
        lib.ek_materialize_bits(_p(w, "uint32_t[]"), _p(bits, "uint8_t[]"),
                                _p(out, "uint32_t[]"), w.size)
    return out


def materialize_units(w: np.ndarray, gates: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    C.f32("w", w)
    if w.ndim < 1:
        raise ValueError("w must have at least one dimension (its units along axis 0)")
    C.bools("gates", gates)
    if gates.shape != (w.shape[0],):
        raise ValueError(f"gates has shape {gates.shape}, need ({w.shape[0]},) (one per unit of w)")
    out = C.out_array("out", out, w.shape, np.float32)
    C.no_overlap(w=w, out=out)
    if w.size:
        lib.ek_materialize_units(_p(w, "uint32_t[]"), _p(gates.view(np.uint8), "uint8_t[]"),
                                 _p(out, "uint32_t[]"), w.shape[0], w.size // w.shape[0])
    return out


# ---------------------------------------------------------------- pack / unpack

def pack(mask: np.ndarray) -> np.ndarray:
    C.bools("mask", mask)
    out = np.empty(C.nbytes_for(mask.size), np.uint8)
    if mask.size:
        lib.ek_pack(_p(mask.view(np.uint8), "uint8_t[]"), _p(out, "uint8_t[]"), mask.size)
    return out


def unpack(bits: np.ndarray, shape, out: np.ndarray | None = None) -> np.ndarray:
    shape = C.shape_of("shape", shape)
    n = int(np.prod(shape, dtype=np.int64))
    C.bits("bits", bits, n)
    out = C.out_array("out", out, shape, np.bool_)
    if n:
        lib.ek_unpack(_p(bits, "uint8_t[]"), _p(out.view(np.uint8), "uint8_t[]"), n)
    return out


# ---------------------------------------------------------------- nested masks

def owner_mask(owner: np.ndarray, t: int) -> np.ndarray:
    C.int16("owner", owner)
    t = C.count("t", t)
    if t > np.iinfo(np.int16).max:
        raise ValueError(f"t must be <= {np.iinfo(np.int16).max}, got {t}")
    out = np.empty(C.nbytes_for(owner.size), np.uint8)
    if owner.size:
        lib.ek_owner_mask(_p(owner, "int16_t[]"), t, _p(out, "uint8_t[]"), owner.size)
    return out


def free_mask(owner: np.ndarray) -> np.ndarray:
    C.int16("owner", owner)
    out = np.empty(C.nbytes_for(owner.size), np.uint8)
    if owner.size:
        lib.ek_free_mask(_p(owner, "int16_t[]"), _p(out, "uint8_t[]"), owner.size)
    return out


def threshold_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    C.f32("scores", scores)
    out = np.empty(C.nbytes_for(scores.size), np.uint8)
    if scores.size:
        lib.ek_threshold_mask(_p(scores, "float[]"), float(np.float32(threshold)),
                              _p(out, "uint8_t[]"), scores.size)
    return out


# ---------------------------------------------------------------- mask algebra

def popcount(bits: np.ndarray, n: int | None = None) -> int:
    bits, n = C.bits_arg("bits", bits, n)
    return int(lib.ek_popcount(_p(bits, "uint8_t[]"), n)) if n else 0


def _pair(a, b, n):
    a, n = C.bits_arg("a", a, n)
    C.bits("b", b, n)
    return a, b, n


def overlap(a: np.ndarray, b: np.ndarray, n: int | None = None) -> int:
    a, b, n = _pair(a, b, n)
    return int(lib.ek_overlap(_p(a, "uint8_t[]"), _p(b, "uint8_t[]"), n)) if n else 0


def hamming(a: np.ndarray, b: np.ndarray, n: int | None = None) -> int:
    a, b, n = _pair(a, b, n)
    return int(lib.ek_hamming(_p(a, "uint8_t[]"), _p(b, "uint8_t[]"), n)) if n else 0


def _binop(fn, a, b, n, out):
    a, b, n = _pair(a, b, n)
    out = C.out_array("out", out, (C.nbytes_for(n),), np.uint8)
    C.no_overlap(a=a, out=out)
    C.no_overlap(b=b, out=out)
    if n:
        fn(_p(a, "uint8_t[]"), _p(b, "uint8_t[]"), _p(out, "uint8_t[]"), n)
    return out


def and_(a: np.ndarray, b: np.ndarray, n: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    return _binop(lib.ek_and, a, b, n, out)


def or_(a: np.ndarray, b: np.ndarray, n: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    return _binop(lib.ek_or, a, b, n, out)


def andnot(a: np.ndarray, b: np.ndarray, n: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    return _binop(lib.ek_andnot, a, b, n, out)


# ---------------------------------------------------------------- masked optimizer steps

def masked_sgd_momentum_(w: np.ndarray, grad: np.ndarray, momentum_buf: np.ndarray,
                         free_bits: np.ndarray, lr: float, momentum: float,
                         weight_decay: float = 0.0) -> None:
    lr, mom, wd = R.sgd_args(w, grad, momentum_buf, free_bits, lr, momentum, weight_decay)
    if w.size:
        lib.ek_masked_sgd(_p(w, "float[]"), _p(grad, "float[]"), _p(momentum_buf, "float[]"),
                          _p(free_bits, "uint8_t[]"), w.size, float(lr), float(mom), float(wd))


def masked_adam_(w: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                 free_bits: np.ndarray, lr: float, step: int, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    scalars = R.adam_args(w, grad, exp_avg, exp_avg_sq, free_bits, lr, step, beta1, beta2, eps,
                          weight_decay)
    if w.size:
        lib.ek_masked_adam(_p(w, "float[]"), _p(grad, "float[]"), _p(exp_avg, "float[]"),
                           _p(exp_avg_sq, "float[]"), _p(free_bits, "uint8_t[]"), w.size,
                           *(float(s) for s in scalars))


def score_step_(scores: np.ndarray, grad: np.ndarray, lr: float, momentum: float = 0.0,
                momentum_buf: np.ndarray | None = None, weight_decay: float = 0.0) -> None:
    lr, mom, wd = R.score_args(scores, grad, lr, momentum, momentum_buf, weight_decay)
    if scores.size:
        buf = ffi.NULL if momentum_buf is None else _p(momentum_buf, "float[]")
        lib.ek_score_sgd(_p(scores, "float[]"), _p(grad, "float[]"), buf, scores.size,
                         float(lr), float(mom), float(wd))


# ---------------------------------------------------------------- routing

def _route_tables(fused, const, starts, pool, n_in, m):
    """The kernel's ek_route_tables over the arrays, and what keeps them alive."""
    ptrs = (_p(fused, "float[]"), _p(const, "float[]"), _p(starts, "int64_t[]"),
            ffi.NULL if pool is None else _p(pool, "int32_t[]"))
    tab = ffi.new("ek_route_tables *", {"fused": ptrs[0], "cnst": ptrs[1], "starts": ptrs[2],
                                        "pool": ptrs[3], "n_in": n_in, "m": m, "d": fused.shape[0],
                                        "K": const.shape[0], "T": starts.shape[0]})
    return tab, ptrs


def route_prototype(x: np.ndarray, fused: np.ndarray, const: np.ndarray, starts: np.ndarray,
                    temperature: float, novelty_floor: float, threshold: float,
                    out_best: np.ndarray | None = None, out_conf: np.ndarray | None = None,
                    out_unknown: np.ndarray | None = None, out_scores: np.ndarray | None = None):
    d, k, t = R.route_tables(fused, const, starts)
    scal = R.route_scalars(temperature, novelty_floor, threshold)
    b = R.route_x(x, d)
    best, conf, unknown, scores = outs = R.route_outs(b, t, out_best, out_conf, out_unknown, out_scores)
    tab, _keep = _route_tables(fused, const, starts, None, d, 0)
    if b and lib.ek_route_prototype(tab, _p(x, "float[]"), b, *scal, 0, ffi.NULL, _p(best, "int64_t[]"),
                                    _p(conf, "float[]"), _p(unknown.view(np.uint8), "uint8_t[]"),
                                    _p(scores, "float[]")):
        raise MemoryError(f"route_prototype: no scratch row of {d + k} floats")
    return outs


def prepare_route_prototype(fused: np.ndarray, const: np.ndarray, starts: np.ndarray,
                            pool: np.ndarray | None = None, n_in: int | None = None):
    d, k, t = R.route_tables(fused, const, starts)
    width, m = R.route_pool(pool, d, n_in)
    tables = [None if a is None else np.array(a, copy=True) for a in (fused, const, starts, pool)]
    for a in tables:
        if a is not None:
            a.setflags(write=False)
    tab, ptrs = _route_tables(*tables, width, m)
    empty, i64, f32, bool_ = np.empty, np.int64, np.float32, np.bool_
    ndarray, from_buffer, call, null = np.ndarray, ffi.from_buffer, lib.ek_route_prototype, ffi.NULL
    inf = float("inf")
    unknown_dtypes = (np.dtype(np.bool_), np.dtype(np.uint8))
    no_scratch = f"route_prototype: no scratch row of {d + k + (d if m else 0)} floats"

    def route(x, temperature, novelty_floor, threshold, out_unknown=None):
        # the light check of x (route_x's conditions, inlined) and of the scalars
        if (type(x) is not ndarray or x.dtype != f32 or x.ndim != 2 or x.shape[1] != width
                or not x.flags.c_contiguous):
            R.route_x(x, width)  # raises, naming what is wrong
        if not 0 < temperature < inf:
            R.route_scalars(temperature, novelty_floor, threshold)  # raises
        b = x.shape[0]
        if out_unknown is None:
            out_unknown = empty(b, bool_)
        elif (type(out_unknown) is not ndarray or out_unknown.shape != (b,)
              or out_unknown.dtype not in unknown_dtypes or not out_unknown.flags.writeable
              or not out_unknown.flags.c_contiguous):
            R.route_outs(b, t, None, None, out_unknown, None)  # raises, naming what is wrong
            raise ValueError("out_unknown must be a writable uint8 or bool array of shape (batch,)")
        best, conf, scores = empty(b, i64), empty(b, f32), empty((b, t), f32)
        if b and call(tab, from_buffer(x), b, temperature, novelty_floor, threshold, 0, null,
                      from_buffer("int64_t[]", best), from_buffer("float[]", conf),
                      from_buffer("uint8_t[]", out_unknown), from_buffer("float[]", scores)):
            raise MemoryError(no_scratch)
        return best, conf, out_unknown, scores

    # batch 1's outputs: written in place, handed out as copies (cheaper than four new
    # arrays and four pointers); the lock keeps a second thread to the general path
    one = (empty(1, i64), empty(1, f32), empty(1, i64), empty((1, t), f32))
    one_task, one_conf, one_best, one_scores = one
    task_p, conf_p, best_p, scores_p = (from_buffer(c, a) for c, a in zip(
        ("int64_t[]", "float[]", "int64_t[]", "float[]"), one, strict=True))
    one_lock = threading.Lock()

    one_shape = [None]  # the shape of a batch-1 x that passed the full check

    def decide(x, temperature, novelty_floor, threshold, unknown_task):
        if type(x) is ndarray and x.shape == one_shape[0] and x.dtype == f32 and x.flags.c_contiguous:
            b = 1  # batch 1 of a shape checked before: one tuple comparison for the shape
        else:
            # x's check (route_rows' conditions, inlined: any shape (batch, ...) of width values a row)
            if (type(x) is not ndarray or x.dtype != f32 or not x.flags.c_contiguous or x.ndim < 2
                    or x.size != x.shape[0] * width or not x.shape[0]):
                if R.route_rows(x, width) == 0:  # raises, naming what is wrong; or an empty batch
                    return empty(0, i64), empty(0, f32), empty(0, i64), empty((0, t), f32)
            b = x.shape[0]
            if b == 1:
                one_shape[0] = x.shape
        if not 0 < temperature < inf:
            R.route_scalars(temperature, novelty_floor, threshold)  # raises
        if b == 1 and one_lock.acquire(False):
            try:
                if call(tab, from_buffer(x), 1, temperature, novelty_floor, threshold, unknown_task,
                        task_p, best_p, conf_p, null, scores_p):
                    raise MemoryError(no_scratch)
                return one_task.copy(), one_conf.copy(), one_best.copy(), one_scores.copy()
            finally:
                one_lock.release()
        # new arrays per call: a decision's arrays stay its own
        task, best, conf, scores = empty(b, i64), empty(b, i64), empty(b, f32), empty((b, t), f32)
        if call(tab, from_buffer(x), b, temperature, novelty_floor, threshold, unknown_task,
                from_buffer("int64_t[]", task), from_buffer("int64_t[]", best),
                from_buffer("float[]", conf), null, from_buffer("float[]", scores)):
            raise MemoryError(no_scratch)
        return task, conf, best, scores

    route.d, route.tasks, route.decide, route.impl = d, t, decide, NAME
    # the arrays tab points into live as long as either function (decide may be kept alone)
    route.tables = decide.tables = (tables, tab, ptrs)
    return route


# ---------------------------------------------------------------- activations

def relu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    out = R.relu_args(x, out)
    if x.size:
        lib.ek_relu(_p(x, "float[]"), _p(out, "float[]"), x.size)
    return out


# ---------------------------------------------------------------- activation gradients

def clamp_grad(gy: np.ndarray, x: np.ndarray, lo: float = 0.0, hi: float | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    lo, hi, out = R.clamp_grad_args(gy, x, lo, hi, out)
    if gy.size:
        lib.ek_clamp_grad(_p(gy, "float[]"), _p(x, "float[]"), _p(out, "float[]"), gy.size, lo, hi)
    return out


# ---------------------------------------------------------------- depthwise convolution

def _dw_dims(geo):
    n, c, h, w, m, kh, kw, sh, sw, dh, dw, pt, pl, _, _, ho, wo = geo
    return n, c, h, w, m, kh, kw, sh, sw, dh, dw, pt, pl, ho, wo


def depthwise_conv2d(x: np.ndarray, w: np.ndarray, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                     out: np.ndarray | None = None) -> np.ndarray:
    C.f32("x", x)
    C.f32("w", w)
    geo = R.dwconv_args(x.shape, w.shape, strides, pads, dilations)
    n, c, m, ho, wo = geo[0], geo[1], geo[4], geo[15], geo[16]
    out = R._dw_out("out", out, (n, c * m, ho, wo), ("x", x), ("w", w))
    if out.size and lib.ek_dwconv_forward(_p(x, "float[]"), _p(w, "float[]"), _p(out, "float[]"),
                                          *_dw_dims(geo)):
        raise MemoryError("depthwise_conv2d: no scratch plane for the padded input")
    return out


def depthwise_conv2d_grad_input(gy: np.ndarray, w: np.ndarray, x_shape, strides=(1, 1), pads=(0, 0, 0, 0),
                                dilations=(1, 1), out: np.ndarray | None = None) -> np.ndarray:
    C.f32("gy", gy)
    C.f32("w", w)
    geo = R.dwconv_args(C.shape_of("x_shape", x_shape), w.shape, strides, pads, dilations)
    n, c, h, wd, m, ho, wo = geo[0], geo[1], geo[2], geo[3], geo[4], geo[15], geo[16]
    if gy.shape != (n, c * m, ho, wo):
        raise ValueError(f"gy has shape {gy.shape}, need {(n, c * m, ho, wo)}")
    out = R._dw_out("out", out, (n, c, h, wd), ("gy", gy), ("w", w))
    fwd = R.dw_grad_input_as_forward(geo)
    if fwd is not None:
        flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1])
        return depthwise_conv2d(gy, flipped, (1, 1), fwd, geo[9:11], out=out)
    if out.size and lib.ek_dwconv_grad_input(_p(gy, "float[]"), _p(w, "float[]"), _p(out, "float[]"),
                                             *_dw_dims(geo)):
        raise MemoryError("depthwise_conv2d_grad_input: no scratch plane for the padded input")
    return out


def depthwise_conv2d_grad_weight(x: np.ndarray, gy: np.ndarray, kernel_shape, strides=(1, 1),
                                 pads=(0, 0, 0, 0), dilations=(1, 1),
                                 out: np.ndarray | None = None) -> np.ndarray:
    C.f32("x", x)
    C.f32("gy", gy)
    kh, kw = R._ints("kernel_shape", kernel_shape, 2, 1)
    if gy.ndim != 4:
        raise ValueError(f"gy must be [N, C * M, Ho, Wo], got shape {gy.shape}")
    geo = R.dwconv_args(x.shape, (gy.shape[1], 1, kh, kw), strides, pads, dilations)
    n, c, m, ho, wo = geo[0], geo[1], geo[4], geo[15], geo[16]
    if gy.shape != (n, c * m, ho, wo):
        raise ValueError(f"gy has shape {gy.shape}, need {(n, c * m, ho, wo)}")
    out = R._dw_out("out", out, (c * m, 1, kh, kw), ("x", x), ("gy", gy))
    if lib.ek_dwconv_grad_weight(_p(x, "float[]"), _p(gy, "float[]"), _p(out, "float[]"), *_dw_dims(geo)):
        raise MemoryError(f"depthwise_conv2d_grad_weight: no scratch rows of {kh * kw * wo} floats")
    return out


for _name in ("materialize_bits", "materialize_units", "pack", "unpack", "owner_mask", "free_mask",
              "threshold_mask", "popcount", "overlap", "hamming", "and_", "or_", "andnot",
              "masked_sgd_momentum_", "masked_adam_", "score_step_", "route_prototype",
              "prepare_route_prototype", "depthwise_conv2d", "depthwise_conv2d_grad_input",
              "depthwise_conv2d_grad_weight", "relu", "clamp_grad"):
    globals()[_name].__doc__ = getattr(R, _name).__doc__
del _name
