"""The numpy twins of the C kernels: the reference every native kernel is tested
against (byte for byte for bits, selects and integers; the float steps also round the
same way, one float32 operation at a time), and the fallback where the compiled module
cannot be loaded. Same signatures and checks as :mod:`edgecl.kernels.native`.

Bit order: flatten C-order; bit ``i`` is bit ``i % 8`` (least significant first) of
byte ``i // 8`` -- ``numpy.packbits(mask.reshape(-1), bitorder="little")``. Pad bits of
the last byte are written 0 and ignored when read.
"""

from __future__ import annotations

import math

import numpy as np

from . import _checks as C

NAME = "numpy"


def _unpack_flat(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits[: C.nbytes_for(n)], count=n, bitorder="little").view(bool)


def _pack_flat(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.reshape(-1), bitorder="little")


def _tail_clear(out: np.ndarray, n: int) -> np.ndarray:
    if n % 8 and out.size:
        out[-1] &= np.uint8((1 << (n % 8)) - 1)
    return out


# ---------------------------------------------------------------- materialize

def materialize_bits(w: np.ndarray, bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``W ⊙ M`` for a packed weight-level mask: kept weights' bytes, +0.0 elsewhere."""
    C.f32("w", w)
    C.bits("bits", bits, w.size)
    out = C.out_array("out", out, w.shape, np.float32)
    C.no_overlap(w=w, out=out)
    mask = _unpack_flat(bits, w.size).reshape(w.shape)
    np.copyto(out, np.where(mask, w, np.float32(0)))
    return out


def materialize_units(w: np.ndarray, gates: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows / output channels of ``w`` (axis 0) kept where ``gates`` is nonzero, else +0.0."""
    C.f32("w", w)
    if w.ndim < 1:
        raise ValueError("w must have at least one dimension (its units along axis 0)")
    C.bools("gates", gates)
    if gates.shape != (w.shape[0],):
        raise ValueError(f"gates has shape {gates.shape}, need ({w.shape[0]},) (one per unit of w)")
    out = C.out_array("out", out, w.shape, np.float32)
    C.no_overlap(w=w, out=out)
    keep = (gates != 0).reshape((-1,) + (1,) * (w.ndim - 1))
    np.copyto(out, np.where(keep, w, np.float32(0)))
    return out


# ---------------------------------------------------------------- pack / unpack

def pack(mask: np.ndarray) -> np.ndarray:
    """bool (or uint8, nonzero = 1) array of any shape -> packed bits, (n + 7) // 8 bytes."""
    C.bools("mask", mask)
    return _pack_flat(mask)


def unpack(bits: np.ndarray, shape, out: np.ndarray | None = None) -> np.ndarray:
    """Packed bits -> bool array of ``shape`` (an int or a tuple)."""
    shape = C.shape_of("shape", shape)
    n = int(np.prod(shape, dtype=np.int64))
    C.bits("bits", bits, n)
    out = C.out_array("out", out, shape, np.bool_)
    np.copyto(out, _unpack_flat(bits, n).reshape(shape))
    return out


# ---------------------------------------------------------------- nested masks

def owner_mask(owner: np.ndarray, t: int) -> np.ndarray:
    """PackNet's nested mask of task ``t`` (1-based): bits of ``0 < owner <= t``."""
    C.int16("owner", owner)
    t = C.count("t", t)
    if t > np.iinfo(np.int16).max:
        raise ValueError(f"t must be <= {np.iinfo(np.int16).max}, got {t}")
    return _pack_flat((owner > 0) & (owner <= t))


def free_mask(owner: np.ndarray) -> np.ndarray:
    """The free set, bits of ``owner == 0``."""
    C.int16("owner", owner)
    return _pack_flat(owner == 0)


def threshold_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Bits of ``scores > threshold`` (float32 comparison; NaN scores are 0)."""
    C.f32("scores", scores)
    return _pack_flat(scores > np.float32(threshold))


# ---------------------------------------------------------------- mask algebra

def popcount(bits: np.ndarray, n: int | None = None) -> int:
    """Ones among the first ``n`` bits (default: all of ``bits``)."""
    bits, n = C.bits_arg("bits", bits, n)
    return int(np.count_nonzero(_unpack_flat(bits, n)))


def _pair(a, b, n):
    a, n = C.bits_arg("a", a, n)
    C.bits("b", b, n)
    return a[: C.nbytes_for(n)], b[: C.nbytes_for(n)], n


def overlap(a: np.ndarray, b: np.ndarray, n: int | None = None) -> int:
    """|a AND b| over the first ``n`` bits."""
    a, b, n = _pair(a, b, n)
    return popcount(np.bitwise_and(a, b), n)


def hamming(a: np.ndarray, b: np.ndarray, n: int | None = None) -> int:
    """|a XOR b| over the first ``n`` bits."""
    a, b, n = _pair(a, b, n)
    return popcount(np.bitwise_xor(a, b), n)


def _binop(op, a, b, n, out):
    a, b, n = _pair(a, b, n)
    out = C.out_array("out", out, (C.nbytes_for(n),), np.uint8)
    op(a, b, out=out)
    return _tail_clear(out, n)


def and_(a: np.ndarray, b: np.ndarray, n: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """a AND b over ``n`` bits; pad bits 0."""
    return _binop(np.bitwise_and, a, b, n, out)


def or_(a: np.ndarray, b: np.ndarray, n: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """a OR b over ``n`` bits; pad bits 0."""
    return _binop(np.bitwise_or, a, b, n, out)


def andnot(a: np.ndarray, b: np.ndarray, n: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """a AND NOT b over ``n`` bits; pad bits 0."""
    return _binop(lambda x, y, out: np.bitwise_and(x, np.invert(y), out=out), a, b, n, out)


# ---------------------------------------------------------------- masked optimizer steps

def sgd_args(w, grad, buf, free_bits, lr, momentum, weight_decay):
    C.f32("w", w, writable=True)
    C.f32("grad", grad)
    C.same_shape("grad", grad, "w", w)
    C.f32("momentum_buf", buf, writable=True)
    C.same_shape("momentum_buf", buf, "w", w)
    C.bits("free_bits", free_bits, w.size)
    C.no_overlap(w=w, grad=grad, momentum_buf=buf, free_bits=free_bits)
    return np.float32(lr), np.float32(momentum), np.float32(weight_decay)


def adam_args(w, grad, m, v, free_bits, lr, step, beta1, beta2, eps, weight_decay):
    C.f32("w", w, writable=True)
    C.f32("grad", grad)
    C.same_shape("grad", grad, "w", w)
    C.f32("exp_avg", m, writable=True)
    C.same_shape("exp_avg", m, "w", w)
    C.f32("exp_avg_sq", v, writable=True)
    C.same_shape("exp_avg_sq", v, "w", w)
    C.bits("free_bits", free_bits, w.size)
    C.no_overlap(w=w, grad=grad, exp_avg=m, exp_avg_sq=v, free_bits=free_bits)
    step = C.count("step", step)
    if step < 1:
        raise ValueError("step must be >= 1 (the 1-based count of Adam steps taken, this one included)")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    f = np.float32
    # bias corrections in double, then rounded once: both implementations get these
    step_size = f(lr / (1.0 - beta1**step))
    sqrt_bc2 = f((1.0 - beta2**step) ** 0.5)
    return (step_size, f(beta1), f(beta2), f(1.0 - beta1), f(1.0 - beta2), sqrt_bc2, f(eps),
            f(weight_decay))


def score_args(scores, grad, lr, momentum, buf, weight_decay):
    C.f32("scores", scores, writable=True)
    C.f32("grad", grad)
    C.same_shape("grad", grad, "scores", scores)
    if buf is not None:
        C.f32("momentum_buf", buf, writable=True)
        C.same_shape("momentum_buf", buf, "scores", scores)
    elif momentum != 0:
        raise ValueError("momentum_buf is required when momentum != 0")
    C.no_overlap(scores=scores, grad=grad, momentum_buf=buf)
    return np.float32(lr), np.float32(momentum), np.float32(weight_decay)


def masked_sgd_momentum_(w: np.ndarray, grad: np.ndarray, momentum_buf: np.ndarray,
                         free_bits: np.ndarray, lr: float, momentum: float,
                         weight_decay: float = 0.0) -> None:
    """In place, at free positions only (bit set in ``free_bits``)::

        g = grad + weight_decay * w;  buf = momentum * buf + g;  w = w - lr * buf

    Every other byte of ``w`` and ``momentum_buf`` is left untouched.
    """
    lr, mom, wd = sgd_args(w, grad, momentum_buf, free_bits, lr, momentum, weight_decay)
    mask = _unpack_flat(free_bits, w.size).reshape(w.shape)
    with np.errstate(all="ignore"):  # frozen lanes may hold anything; their results are dropped
        g = grad + wd * w
        nb = mom * momentum_buf + g
        nw = w - lr * nb
    np.copyto(momentum_buf, nb, where=mask)
    np.copyto(w, nw, where=mask)


def masked_adam_(w: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                 free_bits: np.ndarray, lr: float, step: int, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """Adam (L2 weight decay, PyTorch's form) in place, at free positions only::

        g = grad + weight_decay * w
        m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g * g
        w = w - step_size * (m / (sqrt(v) / sqrt_bc2 + eps))

    with ``step_size = lr / (1 - beta1**step)`` and ``sqrt_bc2 = sqrt(1 - beta2**step)``
    (``step`` counts from 1). Every other byte of ``w``, ``exp_avg``, ``exp_avg_sq`` is
    left untouched.
    """
    ss, b1, b2, omb1, omb2, sbc2, eps, wd = adam_args(w, grad, exp_avg, exp_avg_sq, free_bits, lr,
                                                       step, beta1, beta2, eps, weight_decay)
    mask = _unpack_flat(free_bits, w.size).reshape(w.shape)
    with np.errstate(all="ignore"):
        g = grad + wd * w
        nm = b1 * exp_avg + omb1 * g
        nv = b2 * exp_avg_sq + omb2 * (g * g)
        denom = np.sqrt(nv) / sbc2 + eps
        nw = w - ss * (nm / denom)
    np.copyto(exp_avg, nm, where=mask)
    np.copyto(exp_avg_sq, nv, where=mask)
    np.copyto(w, nw, where=mask)


def score_step_(scores: np.ndarray, grad: np.ndarray, lr: float, momentum: float = 0.0,
                momentum_buf: np.ndarray | None = None, weight_decay: float = 0.0) -> None:
    """The supermask score update (Piggyback / SupSup, every score of the task learns;
    the backbone is frozen so there is no mask): SGD in place on real-valued scores::

        g = grad + weight_decay * s
        buf = momentum * buf + g;  s = s - lr * buf      (with momentum_buf)
        s = s - lr * g                                   (without)

    The task's mask is then ``threshold_mask(scores, threshold)`` (Piggyback) or the
    top-k of the scores (SupSup).
    """
    lr, mom, wd = score_args(scores, grad, lr, momentum, momentum_buf, weight_decay)
    g = grad + wd * scores
    if momentum_buf is not None:
        np.copyto(momentum_buf, mom * momentum_buf + g)
        np.copyto(scores, scores - lr * momentum_buf)
    else:
        np.copyto(scores, scores - lr * g)


# ---------------------------------------------------------------- routing

def route_tables(fused, const, starts) -> tuple[int, int, int]:
    """Checks of the router's tables; returns (d, K, T)."""
    C.f32("fused", fused)
    C.f32("const", const)
    C.array("starts", starts, (np.dtype(np.int64),))
    if const.ndim != 1:
        raise ValueError(f"const must be 1-D (one per prototype), got shape {const.shape}")
    k = const.shape[0]
    if fused.ndim != 2 or fused.shape[1] < k:
        raise ValueError(f"fused has shape {fused.shape}, need (d, d + {k}) ([P | P mu^T])")
    d = fused.shape[1] - k
    if fused.shape[0] != d:
        raise ValueError(f"fused has shape {fused.shape}, need ({d}, {d + k}) ([P | P mu^T])")
    if starts.ndim != 1 or starts.size < 1:
        raise ValueError(f"starts must be 1-D with at least one task, got shape {starts.shape}")
    if starts[0] < 0 or starts[-1] >= k or (starts.size > 1 and (np.diff(starts) <= 0).any()):
        raise ValueError(f"starts must be strictly ascending columns in [0, {k}), got {starts}")
    return d, k, starts.size


def route_scalars(temperature, novelty_floor, threshold) -> tuple[float, float, float]:
    """float32 values (as Python floats) of the decision's scalars."""
    t, f, h = (float(np.float32(v)) for v in (temperature, novelty_floor, threshold))
    if not t > 0 or t == np.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return t, f, h


def route_x(x, d: int) -> int:
    """The light per-call check of a batch: a C-contiguous float32 [B, d] array."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 \
            or x.shape[1] != d or not x.flags.c_contiguous:
        got = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
               else type(x).__name__)
        raise ValueError(f"x must be a C-contiguous float32 array of shape (batch, {d}), got {got}")
    return x.shape[0]


def route_rows(x, width: int) -> int:
    """The check of a prepared route's ``decide`` batch: a C-contiguous float32 array of
    ``width`` values per row (shape (batch, width) or (batch, ...) that holds them)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 2 \
            or math.prod(x.shape[1:]) != width or not x.flags.c_contiguous:
        got = (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
               else type(x).__name__)
        raise ValueError(f"x must be a C-contiguous float32 array of {width} values per row "
                         f"(shape (batch, {width}) or (batch, ...)), got {got}")
    return x.shape[0]


def route_pool(pool, d: int, n_in) -> tuple[int, int]:
    """Checks of a pooled view's index table; returns (values per input row, m): (d, 0)
    without one."""
    if pool is None:
        if n_in is not None and n_in != d:
            raise ValueError(f"n_in is {n_in} without a pool: the rows are the view ({d} values)")
        return d, 0
    C.array("pool", pool, (np.dtype(np.int32),))
    if n_in is None:
        raise ValueError("n_in (values per input row) is needed with a pool")
    n_in = C.count("n_in", n_in)
    if pool.ndim != 2 or pool.shape[1] != d or pool.shape[0] < 1:
        raise ValueError(f"pool has shape {pool.shape}, need (m, {d}) with m >= 1 (m indices per view value)")
    if pool.min() < -1 or pool.max() >= n_in:
        raise ValueError(f"pool indices must be in [0, {n_in}) or -1, got [{pool.min()}, {pool.max()}]")
    return n_in, pool.shape[0]


def pool_rows(x: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """[B, n_in] -> [B, d]: ``v[:, c] = -0.0 + x[:, pool[0, c]] + x[:, pool[1, c]] + ...``
    added in ascending j (-1: nothing), the order of the C kernel, so the two agree byte
    for byte (but for which payload a sum of two NaNs keeps: IEEE 754 leaves it open and
    numpy's loops differ between versions). -0.0 is the exact identity of a float sum: a
    cell's first value comes out unchanged (a signaling NaN quieted, as C's add does), and
    the -0.0 column appended for index -1 adds nothing."""
    g = np.concatenate([x, np.full((len(x), 1), -0.0, x.dtype)], axis=1)[:, pool]  # [B, m, d]
    v = np.add(g[:, 0], x.dtype.type(-0.0), out=np.empty((len(x), pool.shape[1]), x.dtype))
    for j in range(1, len(pool)):
        np.add(v, g[:, j], out=v)
    return v


def route_outs(b: int, t: int, out_best, out_conf, out_unknown, out_scores):
    best = C.out_array("out_best", out_best, (b,), np.int64)
    conf = C.out_array("out_conf", out_conf, (b,), np.float32)
    if out_unknown is None:
        unknown = np.empty(b, np.bool_)
    else:
        unknown = C.bools("out_unknown", out_unknown, writable=True)
        if unknown.shape != (b,):
            raise ValueError(f"out_unknown has shape {unknown.shape}, need ({b},)")
    scores = C.out_array("out_scores", out_scores, (b, t), np.float32)
    C.no_overlap(out_best=best, out_conf=conf, out_unknown=unknown, out_scores=scores)
    return best, conf, unknown, scores


def _route(x, fused, const, starts, temperature, novelty_floor, threshold, outs):
    best, conf, unknown, scores = outs
    d = fused.shape[0]
    r = x @ fused
    quad = (r[:, :d] * x).sum(axis=1, keepdims=True)
    ll = r[:, d:] + (const - np.float32(0.5) * quad)
    s = np.maximum.reduceat(ll, starts, axis=1) if len(x) else np.empty((0, starts.size), np.float32)
    np.copyto(scores, s)
    np.copyto(best, s.argmax(axis=1))
    top = s.max(axis=1, keepdims=True)
    np.copyto(conf, np.float32(1) / np.exp((s - top) / np.float32(temperature)).sum(axis=1))
    np.copyto(unknown, (conf < np.float32(threshold)) | (top[:, 0] < np.float32(novelty_floor)),
              casting="unsafe")
    return best, conf, unknown, scores


def route_prototype(x: np.ndarray, fused: np.ndarray, const: np.ndarray, starts: np.ndarray,
                    temperature: float, novelty_floor: float, threshold: float,
                    out_best: np.ndarray | None = None, out_conf: np.ndarray | None = None,
                    out_unknown: np.ndarray | None = None, out_scores: np.ndarray | None = None):
    """Routing decision of the prototype router for a batch, in one call.

    ``x`` [B, d] float32; ``fused`` = [P | P μᵀ] [d, d + K]; ``const`` [K]; ``starts``
    [T] int64, the first prototype column of each task (strictly ascending). Per row,
    in float32: ``ll = x P μᵀ + const − (x P · x) / 2``, a task's score is the max of
    ``ll`` over its columns, ``best`` the first argmax, ``conf = 1 / Σ_t exp((s_t −
    s_best) / temperature)``, ``unknown = conf < threshold or s_best < novelty_floor``
    (the three scalars taken as float32). Returns ``(best int64 [B], conf float32 [B],
    unknown bool [B] (or the given uint8/bool buffer), scores float32 [B, T])``.
    """
    d, _, t = route_tables(fused, const, starts)
    scal = route_scalars(temperature, novelty_floor, threshold)
    b = route_x(x, d)
    outs = route_outs(b, t, out_best, out_conf, out_unknown, out_scores)
    return _route(x, fused, const, starts, *scal, outs)


def prepare_route_prototype(fused: np.ndarray, const: np.ndarray, starts: np.ndarray,
                            pool: np.ndarray | None = None, n_in: int | None = None):
    """``route_prototype`` with the tables checked and copied once: returns
    ``route(x, temperature, novelty_floor, threshold, out_unknown=None)`` that checks only
    ``x`` (C-contiguous float32 [B, d]) and returns the same four arrays.

    ``route.decide(x, temperature, novelty_floor, threshold, unknown_task)`` is the
    router's decision: ``(task, conf, best, scores)`` with ``task = unknown_task`` where
    the row is unknown, else ``best``; each call's arrays are new. Its ``x`` holds a row's
    values in any C-contiguous shape (batch, ...): the view itself, or with ``pool`` (int32
    [m, d], see :func:`pool_rows`) the ``n_in`` values the view is pooled from."""
    d, _, t = route_tables(fused, const, starts)
    width, _ = route_pool(pool, d, n_in)
    fused, const, starts = (np.array(a, copy=True) for a in (fused, const, starts))
    pool = None if pool is None else np.array(pool, copy=True)

    def route(x, temperature, novelty_floor, threshold, out_unknown=None):
        b = route_x(x, d)
        scal = route_scalars(temperature, novelty_floor, threshold)
        outs = route_outs(b, t, None, None, out_unknown, None)
        return _route(x, fused, const, starts, *scal, outs)

    def decide(x, temperature, novelty_floor, threshold, unknown_task):
        b = route_rows(x, width)
        scal = route_scalars(temperature, novelty_floor, threshold)
        v = x.reshape(b, width)
        if pool is not None:
            v = pool_rows(v, pool)
        best, conf, unknown, scores = _route(v, fused, const, starts, *scal,
                                             route_outs(b, t, None, None, None, None))
        return np.where(unknown, np.int64(unknown_task), best), conf, best, scores

    route.d, route.tasks, route.decide, route.impl = d, t, decide, NAME
    return route


# ---------------------------------------------------------------- activations

def relu_args(x, out) -> np.ndarray:
    C.f32("x", x)
    if out is x:  # in place
        return C.array("out", out, (np.dtype(np.float32),), writable=True)
    if out is None:  # a new array overlaps nothing
        return np.empty(x.shape, np.float32)
    out = C.out_array("out", out, x.shape, np.float32)
    C.no_overlap(x=x, out=out)
    return out


def relu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.maximum(x, 0)``'s bytes: positive values and NaNs kept as they are, everything
    else +0.0 (-0.0 included); ``out`` may be ``x`` itself (in place)."""
    out = relu_args(x, out)
    keep = np.greater(x, np.float32(0))
    keep |= np.isnan(x)
    np.copyto(out.view(np.uint32), x.view(np.uint32) & (np.uint32(0) - keep.astype(np.uint32)))
    return out


# ---------------------------------------------------------------- activation gradients

def clamp_grad_args(gy, x, lo, hi, out) -> tuple[float, float, np.ndarray]:
    C.f32("gy", gy)
    C.f32("x", x)
    C.same_shape("x", x, "gy", gy)
    if out is None:  # a new array overlaps nothing
        out = np.empty(gy.shape, np.float32)
    else:
        out = C.out_array("out", out, gy.shape, np.float32)
        C.no_overlap(gy=gy, out=out)
        C.no_overlap(x=x, out=out)
    return float(lo), float("nan") if hi is None else float(hi), out


def clamp_grad(gy: np.ndarray, x: np.ndarray, lo: float = 0.0, hi: float | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """The gradient through a clamp: ``gy * (lo < x < hi)`` (``hi`` None: ``gy * (x > lo)``,
    ReLU's), the indicator as 1.0 / 0.0, so a dropped lane is ``gy * 0`` (NaN for an
    infinite ``gy``), as numpy's product with a bool mask. ``x`` may be the clamp's input or
    its output (the same indicator)."""
    lo, hi, out = clamp_grad_args(gy, x, lo, hi, out)
    f = np.float32
    keep = np.greater(x, f(lo))
    if hi == hi:  # not NaN
        keep &= np.less(x, f(hi))
    np.multiply(gy, keep, out=out)
    return out


# ---------------------------------------------------------------- depthwise convolution

def _ints(name: str, v, n: int, least: int) -> tuple[int, ...]:
    if type(v) in (list, tuple) and len(v) == n and all(type(k) is int and k >= least for k in v):
        return tuple(v)  # the common case, without the per-value checks below
    try:
        t = tuple(C.count(name, k) for k in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} integers >= {least}, got {v!r}") from None
    if len(t) != n or min(t) < least:
        raise ValueError(f"{name} must be {n} integers >= {least}, got {v!r}")
    return t


def dwconv_args(x_shape, w_shape, strides, pads, dilations) -> tuple[int, ...]:
    """Checks of a depthwise convolution's geometry; returns (N, C, H, W, M, kh, kw, sh, sw,
    dh, dw, pt, pl, pb, pr, Ho, Wo): x [N, C, H, W], weight [C * M, 1, kh, kw] (M output
    channels per input channel), ONNX's strides, pads (top, left, bottom, right) and
    dilations."""
    x_shape, w_shape = tuple(x_shape), tuple(w_shape)
    if len(x_shape) != 4:
        raise ValueError(f"x must be NCHW (4-D), got shape {x_shape}")
    if len(w_shape) != 4 or w_shape[1] != 1 or min(w_shape) < 1:
        raise ValueError(f"w must be [C * M, 1, kh, kw] (one input channel per group), got {w_shape}")
    n, c, h, w = x_shape
    if c < 1 or w_shape[0] % c:
        raise ValueError(f"w has {w_shape[0]} output channels, not a multiple of x's {c} channels")
    sh, sw = _ints("strides", strides, 2, 1)
    dh, dw = _ints("dilations", dilations, 2, 1)
    pt, pl, pb, pr = _ints("pads", pads, 4, 0)
    kh, kw = w_shape[2], w_shape[3]
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"x of shape {x_shape} is too small for a {kh}x{kw} kernel (with these pads and "
                         f"dilations)")
    return n, c, h, w, w_shape[0] // c, kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, ho, wo


def _dw_taps(geo):
    """(i, j, index of the tap's input samples in the padded input), taps in order."""
    _, _, _, _, _, kh, kw, sh, sw, dh, dw, _, _, _, _, ho, wo = geo
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(None), slice(None), slice(i * dh, i * dh + (ho - 1) * sh + 1, sh),
                         slice(j * dw, j * dw + (wo - 1) * sw + 1, sw))


def _dw_pad(x, geo):
    pt, pl, pb, pr = geo[11:15]
    if not (pt or pl or pb or pr):
        return x
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))


def dw_grad_input_as_forward(geo) -> tuple[int, int, int, int] | None:
    """With one output channel per input channel and stride 1, dL/dx is a forward
    depthwise convolution of dL/dy, padded by the kernel's reach less the pads, with the
    kernel flipped: the pads of that forward, or None where it does not apply (a channel
    multiplier, a stride, a pad beyond the kernel's reach)."""
    _, _, _, _, m, kh, kw, sh, sw, dh, dw, pt, pl, pb, pr, _, _ = geo
    if m != 1 or sh != 1 or sw != 1:
        return None
    rh, rw = (kh - 1) * dh, (kw - 1) * dw
    pads = (rh - pt, rw - pl, rh - pb, rw - pr)
    return pads if min(pads) >= 0 else None


def _dw_out(name, out, shape, *inputs):
    if out is None:  # a new array overlaps nothing: no checks (~3 us a call at batch 1)
        return np.empty(shape, np.float32)
    out = C.out_array(name, out, shape, np.float32)
    for k, a in inputs:
        C.no_overlap(**{k: a, name: out})
    return out


def depthwise_conv2d(x: np.ndarray, w: np.ndarray, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                     out: np.ndarray | None = None) -> np.ndarray:
    """Depthwise convolution (no bias), NCHW: ``x`` [N, C, H, W], ``w`` [C * M, 1, kh, kw];
    output channel ``o`` reads input channel ``o // M``. Returns [N, C * M, Ho, Wo]: per
    output, ``0 + Σ w[o, i, j] · x[...]`` added one float32 product at a time over the taps
    (i, j) in order (the C kernel skips taps on the padding, which add ±0)."""
    C.f32("x", x)
    C.f32("w", w)
    geo = dwconv_args(x.shape, w.shape, strides, pads, dilations)
    n, c, _, _, m, kh, kw = geo[:7]
    ho, wo = geo[15:]
    out = _dw_out("out", out, (n, c * m, ho, wo), ("x", x), ("w", w))
    xp = _dw_pad(x, geo)
    out5 = out.reshape(n, c, m, ho, wo)
    out5.fill(0)
    w4 = w.reshape(c, m, kh, kw)
    tmp = np.empty_like(out5)
    for i, j, sl in _dw_taps(geo):
        np.multiply(xp[sl][:, :, None], w4[None, :, :, i, j, None, None], out=tmp)
        out5 += tmp
    return out


def depthwise_conv2d_grad_input(gy: np.ndarray, w: np.ndarray, x_shape, strides=(1, 1), pads=(0, 0, 0, 0),
                                dilations=(1, 1), out: np.ndarray | None = None) -> np.ndarray:
    """dL/dx of :func:`depthwise_conv2d` from ``gy`` = dL/dy. With no channel multiplier
    and stride 1 (pads within the kernel's reach) it is :func:`depthwise_conv2d` of ``gy``
    with the flipped kernel (:func:`dw_grad_input_as_forward`): the taps in reverse order,
    the padding's products included. Otherwise, per input element, the sum over the taps
    (i, j) and then the channel multiplier m, in that order, one float32 product at a time."""
    C.f32("gy", gy)
    C.f32("w", w)
    geo = dwconv_args(C.shape_of("x_shape", x_shape), w.shape, strides, pads, dilations)
    n, c, h, wd, m, kh, kw = geo[:7]
    pt, pl = geo[11:13]
    ho, wo = geo[15:]
    if gy.shape != (n, c * m, ho, wo):
        raise ValueError(f"gy has shape {gy.shape}, need {(n, c * m, ho, wo)}")
    out = _dw_out("out", out, (n, c, h, wd), ("gy", gy), ("w", w))
    fwd = dw_grad_input_as_forward(geo)
    if fwd is not None:
        flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1])
        return depthwise_conv2d(gy, flipped, (1, 1), fwd, geo[9:11], out=out)
    gxp = np.zeros((n, c, h + geo[11] + geo[13], wd + geo[12] + geo[14]), np.float32)
    gy5 = gy.reshape(n, c, m, ho, wo)
    w4 = w.reshape(c, m, kh, kw)
    tmp = np.empty((n, c, ho, wo), np.float32)
    for i, j, sl in _dw_taps(geo):
        for k in range(m):
            np.multiply(gy5[:, :, k], w4[None, :, k, i, j, None, None], out=tmp)
            gxp[sl] += tmp
    np.copyto(out, gxp[:, :, pt : pt + h, pl : pl + wd])
    return out


def depthwise_conv2d_grad_weight(x: np.ndarray, gy: np.ndarray, kernel_shape, strides=(1, 1),
                                 pads=(0, 0, 0, 0), dilations=(1, 1),
                                 out: np.ndarray | None = None) -> np.ndarray:
    """dL/dw [C * M, 1, kh, kw] of :func:`depthwise_conv2d` from ``x`` and ``gy`` = dL/dy.
    Sums of many products: the C kernel and this twin add them in different orders, so they
    agree to float32 rounding (not byte for byte)."""
    C.f32("x", x)
    C.f32("gy", gy)
    kh, kw = _ints("kernel_shape", kernel_shape, 2, 1)
    if gy.ndim != 4:
        raise ValueError(f"gy must be [N, C * M, Ho, Wo], got shape {gy.shape}")
    geo = dwconv_args(x.shape, (gy.shape[1], 1, kh, kw), strides, pads, dilations)
    n, c, _, _, m = geo[:5]
    ho, wo = geo[15:]
    if gy.shape != (n, c * m, ho, wo):
        raise ValueError(f"gy has shape {gy.shape}, need {(n, c * m, ho, wo)}")
    out = _dw_out("out", out, (c * m, 1, kh, kw), ("x", x), ("gy", gy))
    xp = _dw_pad(x, geo)
    gy5 = gy.reshape(n, c, m, ho, wo)
    gw = out.reshape(c, m, kh, kw)
    for i, j, sl in _dw_taps(geo):
        gw[:, :, i, j] = (gy5 * xp[sl][:, :, None]).sum(axis=(0, 3, 4))
    return out
