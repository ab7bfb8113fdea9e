"""The C kernels (edgecl.kernels.native) against their numpy twins (edgecl.kernels.reference),
and both against definitions written here from numpy.packbits / np.where.

Bits, selects and integers compare byte for byte; the float optimizer steps compare
byte for byte too (the C is built with -ffp-contract=off, no fast-math, so each float32
operation rounds as numpy's does) and, as the contract, to 1e-6. The native module must
be built (``pip install -e .``): without it the native tests fail, they never skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
import zlib

import numpy as np
import pytest

from edgecl import kernels
from edgecl.kernels import reference as ref
from edgecl.runtime import masks

SIZES = [0, 1, 5, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 511, 512, 513, 1000, 4097, 100_003]
DENSITIES = [0.0, 1.0, 0.5, 0.03]
CANARIES = np.array([0x7FC0DEAD, 0xDEADBEEF, 0xFFFFFFFF, 0x7F800001, 0x80000000], np.uint32)


@pytest.fixture(scope="module")
def nat():
    """The native implementation; fails (never skips) when the module is not built."""
    return kernels.implementation("native")


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _weights(rng, shape) -> np.ndarray:
    """Random float32 with negatives, -0.0, infinities and NaN payloads sprinkled in."""
    w = rng.standard_normal(shape).astype(np.float32)
    flat = w.reshape(-1)
    if flat.size >= 8:
        idx = rng.choice(flat.size, size=max(1, flat.size // 50), replace=False)
        flat[idx] = np.resize(np.array([-0.0, np.inf, -np.inf, np.nan], np.float32), idx.size)
        flat.view(np.uint32)[idx[::3]] = np.resize(CANARIES, idx[::3].size)
    return w


def _mask(rng, n, density) -> np.ndarray:
    return rng.random(n) < density


def _packed_with_garbage_pad(mask: np.ndarray, extra: int = 0) -> np.ndarray:
    """Bundle-order bits with every pad bit of the last byte set (must be ignored), plus
    ``extra`` trailing bytes of 0xFF."""
    bits = np.packbits(mask.reshape(-1), bitorder="little")
    if mask.size % 8:
        bits[-1] |= np.uint8(0xFF << (mask.size % 8) & 0xFF)
    return np.concatenate([bits, np.full(extra, 0xFF, np.uint8)])


def _same_bytes(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes()


def test_native_module_is_built_and_active(nat):
    assert kernels.available(), kernels.status()
    assert kernels.status().startswith("native (cffi, "), kernels.status()
    assert "_native" in kernels.status()
    assert kernels.implementation() is nat
    assert kernels.implementation("numpy") is ref


# ---------------------------------------------------------------- materialize


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
def test_materialize_bits_matches_twin_and_definition(nat, n, density):
    rng = _rng("mat", n, density)
    w = _weights(rng, n)
    m = _mask(rng, n, density)
    bits = _packed_with_garbage_pad(m, extra=3)
    want = np.where(m, w, np.float32(0))  # the definition: select, +0.0 where dropped
    got_ref = ref.materialize_bits(w, bits)
    got = nat.materialize_bits(w, bits)
    _same_bytes(got_ref, want)
    _same_bytes(got, want)
    assert not np.signbit(got[~m]).any()  # dropped entries are +0.0, even where w was negative


def test_materialize_bits_shapes_out_buffer_and_readonly_input(nat):
    rng = _rng("mat-shape")
    w = _weights(rng, (3, 5, 7, 2))
    w.setflags(write=False)  # the backbone is a read-only mmap on the device
    m = _mask(rng, w.shape, 0.4)
    bits = np.packbits(m.reshape(-1), bitorder="little")
    out = np.full(w.shape, 7.0, np.float32)
    assert nat.materialize_bits(w, bits, out=out) is out
    _same_bytes(out, np.where(m, w, np.float32(0)))
    _same_bytes(kernels.materialize_bits(w, bits, impl="numpy"), out)


@pytest.mark.parametrize("shape", [(0,), (1,), (13,), (13, 9), (6, 3, 5, 5), (4, 0), (64, 33)])
@pytest.mark.parametrize("density", DENSITIES)
def test_materialize_units_matches_twin(nat, shape, density):
    rng = _rng("units", shape, density)
    w = _weights(rng, shape)
    gates = (rng.random(shape[0]) < density).astype(np.uint8)
    keep = gates.astype(bool).reshape((-1,) + (1,) * (len(shape) - 1))
    want = np.where(keep, w, np.float32(0))
    _same_bytes(ref.materialize_units(w, gates), want)
    _same_bytes(nat.materialize_units(w, gates), want)
    _same_bytes(nat.materialize_units(w, gates.astype(bool)), want)
    out = np.empty_like(w)
    assert nat.materialize_units(w, gates, out=out) is out
    _same_bytes(out, want)


# ---------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("n", SIZES)
def test_pack_unpack_bundle_bit_order(nat, n):
    rng = _rng("pack", n)
    m = _mask(rng, n, 0.5)
    want = np.packbits(m, bitorder="little")
    for impl in (ref, nat):
        _same_bytes(impl.pack(m), want)
        _same_bytes(impl.pack(m.astype(np.uint8) * rng.integers(1, 256, n).astype(np.uint8)), want)
        _same_bytes(impl.unpack(_packed_with_garbage_pad(m, extra=2), n), m)
    if n % 8:
        assert nat.pack(m)[-1] >> (n % 8) == 0  # pad bits written as 0


def test_pack_unpack_shapes_and_known_bytes(nat):
    m = np.zeros((2, 3, 5), bool)
    m[0, 0, 0] = m[0, 0, 3] = m[1, 2, 4] = True  # flat bits 0, 3, 29
    for impl in (ref, nat):
        _same_bytes(impl.pack(m), np.array([0b00001001, 0, 0, 0b00100000], np.uint8))
        _same_bytes(impl.unpack(impl.pack(m), m.shape), m)
        out = np.ones(m.shape, bool)
        assert impl.unpack(impl.pack(m), m.shape, out=out) is out
        _same_bytes(out, m)


# ---------------------------------------------------------------- nested masks


@pytest.mark.parametrize("n", SIZES)
def test_owner_and_free_masks(nat, n):
    rng = _rng("owner", n)
    owner = rng.integers(-1, 6, n).astype(np.int16)  # -1 is no task: neither owned nor free
    for t in (0, 1, 3, 5, 7):
        want = np.packbits((owner > 0) & (owner <= t), bitorder="little")
        _same_bytes(ref.owner_mask(owner, t), want)
        _same_bytes(nat.owner_mask(owner, t), want)
    want = np.packbits(owner == 0, bitorder="little")
    _same_bytes(ref.free_mask(owner), want)
    _same_bytes(nat.free_mask(owner), want)


def test_nested_masks_are_nested(nat):
    owner = _rng("nest").integers(0, 9, (40, 17)).astype(np.int16)
    free = nat.free_mask(owner)
    prev = np.zeros_like(free)
    for t in range(1, 9):
        cur = nat.owner_mask(owner, t)
        assert nat.popcount(nat.andnot(prev, cur, owner.size), owner.size) == 0  # prev ⊆ cur
        assert nat.overlap(cur, free, owner.size) == 0
        prev = cur
    assert nat.popcount(prev, owner.size) + nat.popcount(free, owner.size) == owner.size


@pytest.mark.parametrize("n", [0, 1, 9, 513, 10_007])
def test_threshold_mask(nat, n):
    s = _weights(_rng("thr", n), n)
    for thr in (0.0, 0.5, -1.0):
        want = np.packbits(s > np.float32(thr), bitorder="little")
        _same_bytes(ref.threshold_mask(s, thr), want)
        _same_bytes(nat.threshold_mask(s, thr), want)


@pytest.mark.parametrize("n", [0, 1, 7, 9, 31, 33, 1000, 4097])
def test_relu_is_numpys_maximum_with_zero_in_and_out_of_place(nat, n):
    """ReLU: the C, its twin and np.maximum(x, 0) are the same bytes (-0.0 -> +0.0, NaN
    payloads and signs kept, signaling ones too), out of place and in place."""
    x = _weights(_rng("relu", n), n)
    x[: n // 3] = np.resize(np.array([-0.0, 0.0, np.inf, -np.inf, 1e-45, -1e-45], np.float32), n // 3)
    want = np.maximum(x, np.float32(0))
    for impl in (ref, nat):
        _same_bytes(impl.relu(x), want)
        y = x.copy()
        assert impl.relu(y, out=y) is y
        _same_bytes(y, want)


@pytest.mark.parametrize("n", [0, 1, 7, 9, 31, 33, 1000, 4097])
def test_clamp_grad_matches_twin_and_numpys_masked_product(nat, n):
    """gy * (lo < x < hi), the indicator as 1.0 / 0.0: the C, its twin and numpy's product
    with a bool mask are the same bytes with infinities, -0.0 and NaN payloads in gy and x
    (a dropped lane is gy * 0: -0.0 for a negative gy, NaN for an infinite one), for ReLU
    (no upper bound), ReLU6, an unbounded clamp and an empty band."""
    rng = _rng("clamp", n)
    gy, x = _weights(rng, n), _weights(rng, n)
    x[: n // 4] = np.resize(np.array([0.0, 6.0, np.inf, -np.inf, -0.0], np.float32), n // 4)
    for lo, hi in ((0.0, None), (0.0, 6.0), (-np.inf, np.inf), (1.0, 1.0)):
        keep = x > np.float32(lo)
        if hi is not None:
            keep &= x < np.float32(hi)
        with np.errstate(invalid="ignore"):
            want = gy * keep
        _same_bytes(ref.clamp_grad(gy, x, lo, hi), want)
        _same_bytes(nat.clamp_grad(gy, x, lo, hi), want)
        out = np.full(n, 7.0, np.float32)
        assert nat.clamp_grad(gy, x, lo, hi, out=out) is out
        _same_bytes(out, want)


# ---------------------------------------------------------------- mask algebra


def _definitions(a_bool, b_bool):
    pk = lambda x: np.packbits(x, bitorder="little")  # noqa: E731
    return {
        "popcount": int(a_bool.sum()),
        "overlap": int((a_bool & b_bool).sum()),
        "hamming": int((a_bool ^ b_bool).sum()),
        "and_": pk(a_bool & b_bool),
        "or_": pk(a_bool | b_bool),
        "andnot": pk(a_bool & ~b_bool),
    }


def _check_algebra(impl, a_bool, b_bool, extra=0):
    n = a_bool.size
    a = _packed_with_garbage_pad(a_bool, extra)
    b = _packed_with_garbage_pad(b_bool, extra)
    want = _definitions(a_bool, b_bool)
    assert impl.popcount(a, n) == want["popcount"]
    assert impl.overlap(a, b, n) == want["overlap"]
    assert impl.hamming(a, b, n) == want["hamming"]
    for op in ("and_", "or_", "andnot"):
        _same_bytes(getattr(impl, op)(a, b, n), want[op])  # pad bits come out 0
        out = np.full(want[op].size, 0xAA, np.uint8)
        assert getattr(impl, op)(a, b, n, out=out) is out
        _same_bytes(out, want[op])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
def test_mask_algebra(nat, n, density):
    rng = _rng("alg", n, density)
    a_bool, b_bool = _mask(rng, n, density), _mask(rng, n, 0.5)
    for impl in (ref, nat):
        _check_algebra(impl, a_bool, b_bool, extra=5)


def test_mask_algebra_default_n_is_every_bit(nat):
    a = np.array([0xFF, 0x0F, 0x80], np.uint8)
    b = np.array([0xF0, 0xFF, 0x01], np.uint8)
    for impl in (ref, nat):
        assert impl.popcount(a) == 13
        assert impl.overlap(a, b) == 8
        assert impl.hamming(a, b) == 10
        assert masks.density(a, 24) == pytest.approx(13 / 24)


# ---------------------------------------------------------------- masked optimizer steps


def _opt_case(rng, n, density, shape=None):
    shape = shape or (n,)
    free = _mask(rng, n, density)
    free_bits = _packed_with_garbage_pad(free, extra=1)
    w = rng.standard_normal(shape).astype(np.float32)
    grad = rng.standard_normal(shape).astype(np.float32)
    states = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    states[1] = np.abs(states[1])  # Adam's second moment
    frozen = ~free.reshape(shape)
    for a in (w, *states):  # canaries at frozen positions: NaN payloads, 0xDEADBEEF, ...
        a.view(np.uint32)[frozen] = np.resize(CANARIES, int(frozen.sum()))
    return free.reshape(shape), free_bits, w, grad, states


def _run_step(kind, impl, w, grad, states, free_bits, steps=3):
    for step in range(1, steps + 1):
        if kind == "sgd":
            impl.masked_sgd_momentum_(w, grad, states[0], free_bits, lr=0.05, momentum=0.9,
                                      weight_decay=1e-3)
        else:
            impl.masked_adam_(w, grad, states[0], states[1], free_bits, lr=1e-2, step=step,
                              beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-3)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("n", [0, 1, 7, 9, 63, 65, 511, 513, 1537, 100_003])
@pytest.mark.parametrize("density", DENSITIES)
def test_masked_steps_match_twin_and_leave_frozen_bytes(nat, kind, n, density):
    rng = _rng("opt", kind, n, density)
    free, free_bits, w, grad, states = _opt_case(rng, n, density)
    nstate = 1 if kind == "sgd" else 2
    before = [a.copy() for a in (w, *states[:nstate])]
    grad0, bits0 = grad.copy(), free_bits.copy()
    results = {}
    for impl in (ref, nat):
        ws, ss = w.copy(), [s.copy() for s in states]
        _run_step(kind, impl, ws, grad, ss, free_bits)
        results[impl.NAME] = [ws, *ss[:nstate]]
    for got_n, got_r, orig in zip(results["native"], results["numpy"], before, strict=True):
        # frozen positions: every byte exactly as before (the canaries survive)
        _same_bytes(got_n.view(np.uint32)[~free], orig.view(np.uint32)[~free])
        _same_bytes(got_r.view(np.uint32)[~free], orig.view(np.uint32)[~free])
        # free positions: the twin's values, to 1e-6 and in fact to the byte
        np.testing.assert_allclose(got_n[free], got_r[free], rtol=1e-6, atol=1e-7)
        _same_bytes(got_n, got_r)
        if free.any():
            assert not np.array_equal(got_n[free], orig[free])  # it did learn
    _same_bytes(grad, grad0)  # inputs untouched
    _same_bytes(free_bits, bits0)


def test_masked_sgd_semantics_first_step():
    """buf = momentum*0 + (g + wd*w); w -= lr*buf -- checked in float64 by hand."""
    rng = _rng("sgd-sem")
    free, free_bits, w, grad, (buf, _) = _opt_case(rng, 1000, 0.5)
    buf[free] = 0.0
    w0 = np.zeros(w.shape)
    w0[free] = w[free]
    for impl in (ref, kernels.implementation("native")):
        ws, bs = w.copy(), buf.copy()
        impl.masked_sgd_momentum_(ws, grad, bs, free_bits, lr=0.1, momentum=0.9, weight_decay=0.01)
        g = grad[free] + 0.01 * w0[free]
        np.testing.assert_allclose(bs[free], g, rtol=1e-6)
        np.testing.assert_allclose(ws[free], w0[free] - 0.1 * g, rtol=1e-5, atol=1e-6)


def test_masked_adam_semantics_first_step():
    """First Adam step moves each free weight by about lr * sign(g)."""
    rng = _rng("adam-sem")
    free, free_bits, w, grad, (m, v) = _opt_case(rng, 1000, 0.5)
    m[free], v[free] = 0.0, 0.0
    for impl in (ref, kernels.implementation("native")):
        ws = w.copy()
        impl.masked_adam_(ws, grad, m.copy(), v.copy(), free_bits, lr=1e-3, step=1)
        np.testing.assert_allclose(ws[free] - w[free], -1e-3 * np.sign(grad[free]), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("n", [0, 1, 9, 4099])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_score_step(nat, n, momentum):
    rng = _rng("score", n, momentum)
    s, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    buf = rng.standard_normal(n).astype(np.float32)
    out = {}
    for impl in (ref, nat):
        ss, bb = s.copy(), buf.copy()
        impl.score_step_(ss, g, lr=0.1, momentum=momentum, momentum_buf=bb, weight_decay=1e-4)
        s2 = s.copy()
        impl.score_step_(s2, g, lr=0.1, weight_decay=1e-4)
        out[impl.NAME] = (ss, bb, s2)
    for a, b in zip(out["native"], out["numpy"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        _same_bytes(a, b)
    want = (s - 0.1 * (g + np.float32(1e-4) * s)).astype(np.float32)
    np.testing.assert_allclose(out["native"][2], want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- a huge case


def test_huge_masks(nat):
    """~50M bits (odd), and a 6M-weight layer: one pass each, native == numpy."""
    rng = np.random.default_rng(7)
    n = 50_000_003
    a = rng.integers(0, 256, (n + 7) // 8, dtype=np.uint8)
    b = rng.integers(0, 256, (n + 7) // 8, dtype=np.uint8)
    for f in ("popcount",):
        assert getattr(nat, f)(a, n) == getattr(ref, f)(a, n)
    assert nat.overlap(a, b, n) == ref.overlap(a, b, n)
    assert nat.hamming(a, b, n) == ref.hamming(a, b, n)
    for op in ("and_", "or_", "andnot"):
        _same_bytes(getattr(nat, op)(a, b, n), getattr(ref, op)(a, b, n))
    u = nat.unpack(a, n)
    _same_bytes(u, ref.unpack(a, n))
    _same_bytes(nat.pack(u), ref.pack(u))
    assert nat.popcount(a, n) == int(np.count_nonzero(u))

    m = 6_000_001
    w = rng.standard_normal(m, dtype=np.float32)
    bits = a[: (m + 7) // 8]
    _same_bytes(nat.materialize_bits(w, bits), ref.materialize_bits(w, bits))
    grad = rng.standard_normal(m, dtype=np.float32)
    w2, buf2 = w.copy(), np.zeros(m, np.float32)
    nat.masked_sgd_momentum_(w, grad, np.zeros(m, np.float32), bits, 0.1, 0.9)
    ref.masked_sgd_momentum_(w2, grad, buf2, bits, 0.1, 0.9)
    _same_bytes(w, w2)


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize("impl_name", ["native", "numpy"])
def test_bad_inputs_raise_value_errors_naming_the_argument(impl_name):
    impl = kernels.implementation(impl_name)
    w = np.ones((4, 6), np.float32)
    bits = np.zeros(3, np.uint8)
    cases = [
        (lambda: impl.materialize_bits(w.astype(np.float64), bits), "w must have dtype float32"),
        (lambda: impl.materialize_bits(w.T, bits), "w must be C-contiguous"),
        (lambda: impl.materialize_bits(w, bits[:2]), "bits holds 16 bits"),
        (lambda: impl.materialize_bits(w, bits.astype(np.int8)), "bits must have dtype uint8"),
        (lambda: impl.materialize_bits(w, bits, out=np.empty(23, np.float32)), "out has shape"),
        (lambda: impl.materialize_bits(w, bits, out=w), "w and out must not share memory"),
        (lambda: impl.materialize_bits([1.0], bits), "w must be a numpy array"),
        (lambda: impl.materialize_units(w, np.ones(5, np.uint8)), "gates has shape"),
        (lambda: impl.unpack(bits, (5, 5)), "bits holds 24 bits"),
        (lambda: impl.unpack(bits, -1), "shape must be >= 0"),
        (lambda: impl.owner_mask(np.zeros(4, np.int32), 1), "owner must have dtype int16"),
        (lambda: impl.popcount(bits, 25), "bits holds 24 bits"),
        (lambda: impl.hamming(bits, bits[:1], 24), "b holds 8 bits"),
        (lambda: impl.and_(bits, bits, 24, out=np.empty(2, np.uint8)), "out has shape"),
        (lambda: impl.masked_sgd_momentum_(w, w.copy()[:2], w.copy(), bits, 0.1, 0.9),
         "grad has shape"),
        (lambda: impl.masked_sgd_momentum_(w, w.copy(), w, bits, 0.1, 0.9),
         "w and momentum_buf must not share memory"),
        (lambda: impl.masked_sgd_momentum_(w, w.copy(), w.copy(), bits[:1], 0.1, 0.9),
         "free_bits holds 8 bits"),
        (lambda: impl.masked_adam_(w, w.copy(), w.copy(), w.copy(), bits, 0.1, step=0), "step must be"),
        (lambda: impl.masked_adam_(w, w.copy(), w.copy(), w.copy().astype(np.float16), bits, 0.1, 1),
         "exp_avg_sq must have dtype float32"),
        (lambda: impl.score_step_(w, w.copy(), 0.1, momentum=0.9), "momentum_buf is required"),
        (lambda: impl.relu(w.astype(np.float64)), "x must have dtype float32"),
        (lambda: impl.relu(w, out=w.reshape(4, 6)), "x and out must not share memory"),  # a view, not x
        (lambda: impl.clamp_grad(w, w.copy()[:2]), "x has shape"),
        (lambda: impl.clamp_grad(w, w.astype(np.float64)), "x must have dtype float32"),
        (lambda: impl.clamp_grad(w.T, w.T.copy()), "gy must be C-contiguous"),
        (lambda: impl.clamp_grad(w, w.copy(), out=w), "gy and out must not share memory"),
    ]
    ro = w.copy()
    ro.setflags(write=False)
    cases.append((lambda: impl.masked_sgd_momentum_(ro, w.copy(), w.copy(), bits, 0.1, 0.9),
                  "w must be writable"))
    cases.append((lambda: impl.relu(ro, out=ro), "out must be writable"))
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


def test_impl_argument():
    with pytest.raises(ValueError, match="impl must be"):
        kernels.popcount(np.zeros(1, np.uint8), impl="cuda")


# ---------------------------------------------------------------- runtime/masks.py


def _old_materialize_bits(weight, bits):  # runtime/masks.py before the kernels
    n = int(np.prod(weight.shape, dtype=np.int64))
    mask = np.unpackbits(np.asarray(bits, np.uint8), count=n, bitorder="little").view(bool)
    return np.where(mask.reshape(weight.shape), weight, np.zeros((), weight.dtype))


@pytest.mark.parametrize("shape", [(0,), (1,), (10,), (33, 17), (8, 3, 3, 3), (500, 784)])
def test_runtime_masks_byte_identical_to_reference(nat, shape):
    rng = _rng("masks", shape)
    w = _weights(rng, shape)
    m = _mask(rng, shape, 0.5)
    bits = masks.pack_bits(m)
    _same_bytes(bits, np.packbits(m.reshape(-1), bitorder="little"))
    _same_bytes(masks.unpack_bits(bits, shape), m)
    _same_bytes(masks.materialize_bits(w, bits), _old_materialize_bits(w, bits))
    _same_bytes(masks.materialize_bits(w, bits), ref.materialize_bits(w, bits))
    for dtype in (np.float64, np.float16):  # other dtypes keep the numpy path
        with np.errstate(all="ignore"):
            wd = w.astype(dtype)
        _same_bytes(masks.materialize_bits(wd, bits), _old_materialize_bits(wd, bits))
    if len(shape) > 1:  # a non-contiguous weight
        bits_t = masks.pack_bits(m.T)
        _same_bytes(masks.materialize_bits(w.T, bits_t), _old_materialize_bits(w.T, bits_t))
    gates = (rng.random(shape[0]) < 0.5).astype(np.uint8)
    keep = gates.astype(bool).reshape((-1,) + (1,) * (len(shape) - 1))
    _same_bytes(masks.materialize_units(w, gates), np.where(keep, w, np.float32(0)))
    assert masks.density(bits, m.size) == (float(m.sum()) / m.size if m.size else 0.0)


# ---------------------------------------------------------------- the fallback

_FALLBACK_SCRIPT = textwrap.dedent("""
    import sys, warnings
    import numpy as np
    {prelude}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        from edgecl import kernels
        from edgecl.runtime import masks
        w = np.arange(20, dtype=np.float32) - 10
        m = np.arange(20) % 3 == 0
        bits = masks.pack_bits(m)
        a = masks.materialize_bits(w, bits)
        b = kernels.materialize_bits(w, bits)
        kernels.popcount(bits, 20)
    assert a.tobytes() == np.where(m, w, np.float32(0)).tobytes()
    assert a.tobytes() == b.tobytes()
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1 and "numpy fallback" in msgs[0], msgs
    assert not kernels.available()
    assert "torch" not in sys.modules
    print(kernels.status())
""")


def _run(script: str, env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_fallback_forced_by_env_warns_once():
    out = _run(_FALLBACK_SCRIPT.format(prelude=""), {"EDGECL_KERNELS": "numpy"})
    assert out == "numpy fallback: EDGECL_KERNELS=numpy"


def test_fallback_when_module_cannot_load_warns_once():
    prelude = textwrap.dedent("""
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == "edgecl.kernels._native":
                    raise ImportError("blocked by the test")
        sys.meta_path.insert(0, _Block())
    """)
    out = _run(_FALLBACK_SCRIPT.format(prelude=prelude), {"EDGECL_KERNELS": "auto"})
    assert out.startswith("numpy fallback: the compiled module could not be loaded"), out
    assert "blocked by the test" in out


def test_fallback_in_process_warns_once(monkeypatch):
    monkeypatch.setenv("EDGECL_KERNELS", "numpy")
    monkeypatch.setattr(kernels, "_warned", False)
    assert not kernels.available()
    assert kernels.status() == "numpy fallback: EDGECL_KERNELS=numpy"
    w, bits = np.ones(9, np.float32), np.array([0xFF, 0x01], np.uint8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert kernels.implementation() is ref
        kernels.materialize_bits(w, bits)
        kernels.materialize_bits(w, bits)
    assert [str(r.message) for r in rec] == ["edgecl.kernels: using the numpy fallback, EDGECL_KERNELS=numpy"]
    monkeypatch.setenv("EDGECL_KERNELS", "native")
    assert kernels.implementation() is kernels.implementation("native")
    monkeypatch.setenv("EDGECL_KERNELS", "bogus")
    with pytest.raises(ValueError, match="EDGECL_KERNELS"):
        kernels.available()


# ---------------------------------------------------------------- routing (prototype router)


def _route_tables(rng, d, k, t):
    a = rng.standard_normal((d, d)).astype(np.float64)
    p = a @ a.T / d + np.eye(d)  # a precision matrix
    mu = rng.standard_normal((k, d))
    fused = np.hstack([p, p @ mu.T]).astype(np.float32)
    const = (-0.5 * ((mu @ p) * mu).sum(axis=1)).astype(np.float32)
    starts = np.sort(rng.choice(np.arange(1, k), t - 1, replace=False)) if t > 1 else np.zeros(0)
    return fused, const, np.r_[0, starts].astype(np.int64)


def _check_route(got, want, x, fused, const):
    best, conf, unknown, scores = got
    wbest, wconf, wunknown, wscores = want
    # scores: float32 sums in another order than BLAS; 1e-5 of the terms' magnitude
    # (ll = xPμᵀ + const - quad/2 cancels, so the bound is on the terms, not on ll)
    d = fused.shape[0]
    scale = np.abs(x) @ np.abs(fused)
    mag = (scale[:, d:].max(axis=1, initial=0) + np.abs(const).max()
           + 0.5 * (scale[:, :d] * np.abs(x)).sum(axis=1))[:, None]
    assert scores.shape == wscores.shape and scores.dtype == np.float32
    assert (np.abs(scores - wscores) <= 1e-5 * mag + 1e-30).all()
    assert best.dtype == np.int64 and conf.dtype == np.float32 and unknown.dtype == np.bool_
    # decisions match except where the twin's top two scores are within rounding
    srt = np.sort(wscores, axis=1)
    clear = (srt[:, -1] - srt[:, -2] > 1e-4 * mag[:, 0]) if wscores.shape[1] > 1 else np.ones(len(x), bool)
    assert np.array_equal(best[clear], wbest[clear])
    np.testing.assert_allclose(conf[clear], wconf[clear], rtol=1e-4, atol=1e-6)
    near = clear & (np.abs(conf - 0.5) > 1e-3)
    assert np.array_equal(unknown[near], wunknown[near])


@pytest.mark.parametrize("b", [0, 1, 3, 64])
@pytest.mark.parametrize("d,k,t", [(1, 1, 1), (1, 5, 2), (7, 13, 3), (64, 60, 5), (33, 71, 12),
                                   (100, 93, 7), (17, 1, 1), (50, 130, 11)])
def test_route_prototype_matches_twin(nat, b, d, k, t):
    rng = _rng("route", b, d, k, t)
    fused, const, starts = _route_tables(rng, d, k, t)
    x = rng.standard_normal((b, d)).astype(np.float32)
    for temp, floor, thr in [(1.0, -np.inf, 0.5), (7.3, float(-d * 3), 0.9), (0.05, 0.0, 0.0)]:
        want = ref.route_prototype(x, fused, const, starts, temp, floor, thr)
        got = nat.route_prototype(x, fused, const, starts, temp, floor, thr)
        _check_route(got, want, x, fused, const)
        prepared = nat.prepare_route_prototype(fused, const, starts)(x, temp, floor, thr)
        for a, c in zip(prepared, got, strict=True):
            _same_bytes(a, c)
        twin_prepared = ref.prepare_route_prototype(fused, const, starts)(x, temp, floor, thr)
        for a, c in zip(twin_prepared, want, strict=True):
            _same_bytes(a, c)
        # the twin is the router's own arithmetic: prototype.scores + the shared decide
        if b:
            r = x @ fused
            ll = r[:, d:] + (const - 0.5 * (r[:, :d] * x).sum(axis=1, keepdims=True))
            _same_bytes(want[3], np.maximum.reduceat(ll, starts, axis=1))
            conf = 1.0 / np.exp((want[3] - want[3].max(axis=1, keepdims=True)) / temp).sum(axis=1)
            _same_bytes(want[1], conf)


def test_route_prototype_ties_nan_and_out_buffers(nat):
    # two tasks with identical prototypes: exact ties pick the first task, like argmax
    rng = _rng("route-ties")
    fused, const, _ = _route_tables(rng, 9, 2, 1)
    d = 9
    fused[:, d + 1] = fused[:, d]
    const[1] = const[0]
    starts = np.array([0, 1], np.int64)
    x = rng.standard_normal((5, d)).astype(np.float32)
    for impl in (ref, nat):
        best, conf, unknown, scores = impl.route_prototype(x, fused, const, starts, 1.0, -1e30, 0.5)
        assert (scores[:, 0] == scores[:, 1]).all() and (best == 0).all()
        assert np.allclose(conf, 0.5) and not unknown.any()  # 0.5 is not < 0.5
        ob, oc, ou, os_ = (np.empty(5, np.int64), np.empty(5, np.float32), np.ones(5, np.uint8),
                           np.empty((5, 2), np.float32))
        out = impl.route_prototype(x, fused, const, starts, 1.0, 1e30, 0.5, ob, oc, ou, os_)
        assert out[0] is ob and out[1] is oc and out[2] is ou and out[3] is os_
        assert (ou == 1).all()  # below the novelty floor
    # NaN inputs: NaN scores, best = first NaN task (argmax); NaN compares false, so the
    # row is not flagged unknown -- exactly as the generic numpy decide behaves
    x[2] = np.nan
    got = nat.route_prototype(x, fused, const, starts, 1.0, -1e30, 0.5)
    want = ref.route_prototype(x, fused, const, starts, 1.0, -1e30, 0.5)
    assert np.isnan(got[3][2]).all() and got[0][2] == want[0][2] == 0
    assert got[2][2] == want[2][2] and not np.isnan(got[1][:2]).any()


@pytest.mark.parametrize("impl_name", ["native", "numpy"])
def test_route_prototype_bad_inputs(impl_name):
    impl = kernels.implementation(impl_name)
    fused, const, starts = _route_tables(_rng("route-bad"), 4, 6, 3)
    x = np.ones((2, 4), np.float32)
    ok = dict(temperature=1.0, novelty_floor=0.0, threshold=0.5)
    cases = [
        ((x.astype(np.float64), fused, const, starts), "x must be"),
        ((x[:, :3], fused, const, starts), "x must be"),
        ((np.ones((4, 2), np.float32).T, fused, const, starts), "x must be"),
        ((x, fused.astype(np.float64), const, starts), "fused must have dtype float32"),
        ((x, np.ascontiguousarray(fused[:, :9]), const, starts), "fused has shape"),
        ((x, fused, const[:5], starts), "fused has shape"),
        ((x, fused, const, starts.astype(np.int32)), "starts must have dtype int64"),
        ((x, fused, const, starts[::-1].copy()), "strictly ascending"),
        ((x, fused, const, np.array([0, 6], np.int64)), "strictly ascending"),
        ((x, fused, const, np.zeros(0, np.int64)), "at least one task"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            impl.route_prototype(*args, **ok)
    with pytest.raises(ValueError, match="temperature"):
        impl.route_prototype(x, fused, const, starts, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="out_scores has shape"):
        impl.route_prototype(x, fused, const, starts, **ok, out_scores=np.empty((2, 2), np.float32))
    route = impl.prepare_route_prototype(fused, const, starts)
    with pytest.raises(ValueError, match="x must be"):
        route(x.astype(np.float64), 1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        route(x, -1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="out_unknown"):
        route(x, 1.0, 0.0, 0.5, np.empty(3, np.uint8))
    # the prepared tables are copies: later changes to the caller's arrays do not leak in
    before = route(x, 1.0, 0.0, 0.5)[3].copy()
    fused[:] = 0
    _same_bytes(route(x, 1.0, 0.0, 0.5)[3], before)
    assert kernels.prepare_route_prototype(fused, const, starts, impl=impl_name).d == 4


def _pool_case(rng, shape, cells):
    """A pooled view's index table (runtime/routers/view.py) over an input ``shape``."""
    from edgecl.runtime.routers.view import pool_index

    return pool_index(shape, cells)


# (input shape, cells per axis): ds-cnn's 49x10 -> 7x10 and the 640 features -> 160 (even,
# one pooled axis), uneven cells on one and on two axes (-1 padding), a kept channel axis
POOLS = [((1, 49, 10), (1, 7, 10)), ((640,), (160,)), ((49, 10), (16, 10)),
         ((1, 13, 17), (1, 9, 10)), ((3, 10, 11), (3, 4, 5)), ((331,), (160,)), ((5,), (1,))]


@pytest.mark.parametrize("shape,cells", POOLS)
@pytest.mark.parametrize("b", [0, 1, 3, 64])
def test_route_pool_matches_twin_byte_for_byte(nat, shape, cells, b):
    """The kernel pools a row as the twin's pool_rows does, byte for byte (-0.0 and inf
    included; NaN where the twin has NaN): its decision equals the unpooled kernel's on the
    twin's pooled rows. A sum of two NaNs keeps either one's payload (IEEE 754 leaves it
    open): numpy 2.2's vectorized add (JetPack's Python 3.10 venv) keeps the other operand's
    than C and numpy 2.4 do, so NaN payloads are not compared."""
    import math

    rng = _rng("route-pool", shape, b)
    pool = _pool_case(rng, shape, cells)
    d, n = math.prod(cells), math.prod(shape)
    # every input value in exactly one cell, ascending within it, -1 only at a column's end
    assert sorted(pool[pool >= 0].tolist()) == list(range(n))
    assert all((np.diff(col[col >= 0]) > 0).all() and (col[:(col >= 0).sum()] >= 0).all() for col in pool.T)
    fused, const, starts = _route_tables(rng, d, 9, 3)
    x = _weights(rng, (b, *shape)) if b != 3 else rng.standard_normal((b, *shape)).astype(np.float32)
    if b:
        x.reshape(b, -1)[0, pool[:, 0][pool[:, 0] >= 0]] = -0.0  # a cell of -0.0 stays -0.0
    with np.errstate(all="ignore"):  # inf - inf, NaN: compared byte for byte, not warned about
        v = ref.pool_rows(x.reshape(b, n), pool)
        assert v.dtype == np.float32 and v.shape == (b, d)
        if b:
            assert np.signbit(v[0, 0]) and v[0, 0] == 0
        pooled = nat.prepare_route_prototype(fused, const, starts, pool=pool, n_in=n)
        plain = nat.prepare_route_prototype(fused, const, starts)
        twin = ref.prepare_route_prototype(fused, const, starts, pool=pool, n_in=n)
        twin_plain = ref.prepare_route_prototype(fused, const, starts)
        for temp, floor, thr, unknown_task in [(1.0, -np.inf, 0.5, -1), (3.0, 0.0, 0.9, 2)]:
            got = pooled.decide(x, temp, floor, thr, unknown_task)
            want = plain.decide(v, temp, floor, thr, unknown_task)
            for a, c in zip(got, want, strict=True):
                _same_bytes_any_nan(a, c)
            for a, c in zip(twin.decide(x, temp, floor, thr, unknown_task),
                            twin_plain.decide(v, temp, floor, thr, unknown_task), strict=True):
                _same_bytes_any_nan(a, c)


def _same_bytes_any_nan(a: np.ndarray, b: np.ndarray) -> None:
    """Byte for byte, but a NaN equals a NaN of any payload (the same positions)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.dtype.kind == "f":
        na, nb = np.isnan(a), np.isnan(b)
        assert (na == nb).all()
        a, b = np.where(na, a.dtype.type(np.nan), a), np.where(nb, b.dtype.type(np.nan), b)
    _same_bytes(a, b)


@pytest.mark.parametrize("shape,cells", POOLS)
def test_route_pool_values_through_identity_tables(nat, shape, cells):
    """Tables that make each task's score one view value (P = 0, μ = e_c, one prototype a
    task): the kernel's scores are its pooled row itself, equal to pool_rows byte for byte."""
    import math

    rng = _rng("route-pool-id", shape)
    pool = _pool_case(rng, shape, cells)
    d, n = math.prod(cells), math.prod(shape)
    fused = np.hstack([np.zeros((d, d)), np.eye(d)]).astype(np.float32)
    const, starts = np.zeros(d, np.float32), np.arange(d, dtype=np.int64)
    x = (rng.standard_normal((9, *shape)) * 10.0 ** rng.integers(-3, 4, (9, *shape))).astype(np.float32)
    for impl in (nat, ref):
        scores = impl.prepare_route_prototype(fused, const, starts, pool=pool, n_in=n).decide(
            x, 1.0, 0.0, 0.5, -1)[3]
        _same_bytes(scores, ref.pool_rows(x.reshape(9, n), pool))


@pytest.mark.parametrize("b", [0, 1, 5])
def test_route_decide_is_route_with_the_task(nat, b):
    """decide = route's (best, conf, scores) and task = unknown_task where unknown, else
    best; the numpy twin's decide as route_prototype's twin (to float32 rounding); any
    C-contiguous shape with the row's values passes."""
    rng = _rng("route-decide", b)
    fused, const, starts = _route_tables(rng, 12, 10, 4)
    x = rng.standard_normal((b, 3, 4)).astype(np.float32)
    for impl in (nat, ref):
        prepared = impl.prepare_route_prototype(fused, const, starts)
        assert prepared.impl == impl.NAME
        for thr, unknown_task in [(0.5, -1), (0.99, 3), (0.0, -1)]:
            best, conf, unknown, scores = prepared(x.reshape(b, 12), 2.0, -40.0, thr)
            task, conf2, best2, scores2 = prepared.decide(x, 2.0, -40.0, thr, unknown_task)
            for a, c in [(best, best2), (conf, conf2), (scores, scores2)]:
                _same_bytes(a, c)
            _same_bytes(task, np.where(unknown, np.int64(unknown_task), best))
    if b:
        want = ref.prepare_route_prototype(fused, const, starts).decide(x, 2.0, -40.0, 0.5, -1)
        got = nat.prepare_route_prototype(fused, const, starts).decide(x, 2.0, -40.0, 0.5, -1)
        as_route = [(d[2], d[1], d[0] == -1, d[3]) for d in (got, want)]  # (best, conf, unknown, scores)
        _check_route(*as_route, x.reshape(b, 12), fused, const)


def test_route_decide_arrays_are_each_calls_own(nat):
    """Batch 1 is written into kept buffers and handed out as copies: a later call (or
    another thread's) never changes an earlier decision's arrays."""
    import threading

    rng = _rng("route-own")
    fused, const, starts = _route_tables(rng, 16, 12, 3)
    xs = rng.standard_normal((64, 1, 16)).astype(np.float32) * 3
    decide = nat.prepare_route_prototype(fused, const, starts).decide
    serial = [decide(x, 1.0, -30.0, 0.6, -1) for x in xs]
    kept = [tuple(a.copy() for a in d) for d in serial]
    for d, k in zip(serial, kept, strict=True):
        for a, c in zip(d, k, strict=True):
            _same_bytes(a, c)
    assert len({id(a) for d in serial for a in d}) == 4 * len(xs)
    got: dict[int, list] = {}

    def run(i):
        got[i] = [decide(x, 1.0, -30.0, 0.6, -1) for x in xs for _ in range(20)][::20]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(4):
        for d, k in zip(got[i], kept, strict=True):
            for a, c in zip(d, k, strict=True):
                _same_bytes(a, c)


@pytest.mark.parametrize("impl_name", ["native", "numpy"])
def test_route_pool_and_decide_bad_inputs(impl_name):
    impl = kernels.implementation(impl_name)
    fused, const, starts = _route_tables(_rng("route-pool-bad"), 4, 6, 3)
    pool = np.array([[0, 2, 4, 6], [1, 3, 5, -1]], np.int32)
    cases = [
        (dict(pool=pool.astype(np.int64), n_in=7), "pool must have dtype int32"),
        (dict(pool=pool, n_in=None), "n_in"),
        (dict(pool=pool[:, :3].copy(), n_in=7), "pool has shape"),
        (dict(pool=np.zeros((0, 4), np.int32), n_in=7), "pool has shape"),
        (dict(pool=pool, n_in=6), r"pool indices must be in \[0, 6\)"),
        (dict(pool=pool - 1, n_in=7), "pool indices"),
        (dict(pool=None, n_in=7), "n_in is 7 without a pool"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            impl.prepare_route_prototype(fused, const, starts, **kw)
    decide = impl.prepare_route_prototype(fused, const, starts, pool=pool, n_in=7).decide
    for x in [np.ones((2, 7)), np.ones((2, 8), np.float32), np.ones(7, np.float32),
              np.ones((7, 2), np.float32).T, [[1.0] * 7]]:
        with pytest.raises(ValueError, match="x must be a C-contiguous float32 array of 7 values per row"):
            decide(x, 1.0, 0.0, 0.5, -1)
    with pytest.raises(ValueError, match="temperature"):
        decide(np.ones((1, 7), np.float32), 0.0, 0.0, 0.5, -1)
    empty = decide(np.ones((0, 7), np.float32), 1.0, 0.0, 0.5, -1)
    assert [a.shape for a in empty] == [(0,), (0,), (0,), (0, 3)]
    assert [a.dtype for a in empty] == [np.int64, np.float32, np.int64, np.float32]


# ---------------------------------------------------------------- depthwise convolution
# (x shape, channel multiplier, kernel, strides, pads, dilations): 3x3 at stride 1 and 2
# (wide and narrow planes: the C kernel's row and flat paths), asymmetric pads, dilation,
# rectangular kernels, a multiplier > 1, padding wider than the kernel reads, batch 0.
DW_CASES = [
    ((2, 3, 12, 20), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 3, 12, 20), 1, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ((3, 4, 7, 6), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 5, 3, 3), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 4, 9, 8), 1, (3, 3), (2, 2), (0, 0, 1, 1), (1, 1)),
    ((2, 4, 9, 8), 1, (3, 3), (2, 1), (2, 1, 0, 3), (2, 1)),
    ((1, 2, 11, 17), 2, (3, 3), (1, 2), (0, 1, 1, 0), (1, 2)),
    ((2, 3, 8, 9), 3, (2, 4), (1, 1), (1, 2, 0, 1), (1, 1)),
    ((2, 2, 13, 10), 1, (5, 5), (3, 1), (2, 2, 2, 2), (1, 1)),
    ((2, 6, 25, 5), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((1, 3, 1, 1), 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    ((1, 2, 4, 4), 2, (3, 3), (2, 2), (3, 0, 3, 4), (1, 1)),
    ((0, 3, 6, 6), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    # narrow planes, 3x3, stride 1, output the input's size: the kernels' masked flat path
    ((2, 3, 9, 7), 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 3, 10, 6), 1, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ((2, 4, 5, 7), 1, (3, 3), (1, 1), (0, 2, 2, 0), (1, 1)),
    ((1, 3, 6, 1), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((3, 2, 2, 15), 1, (3, 3), (1, 1), (2, 0, 0, 2), (1, 1)),
]


def _dw_case(case, finite=True):
    xs, m, (kh, kw), strides, pads, dil = case
    rng = _rng("dw", case)
    x = rng.standard_normal(xs).astype(np.float32)
    w = (rng.standard_normal((xs[1] * m, 1, kh, kw)) if finite else _weights(rng, (xs[1] * m, 1, kh, kw)))
    w = np.asarray(w, np.float32)
    y = ref.depthwise_conv2d(x, w, strides, pads, dil)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    return x, w, gy, dict(strides=strides, pads=pads, dilations=dil)


def _dw_torch(x, w, gy, geo):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    pt, pl, pb, pr = geo["pads"]
    y = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), wt, None, geo["strides"], 0, geo["dilations"], x.shape[1])
    y.backward(torch.tensor(gy))
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


@pytest.mark.parametrize("case", DW_CASES, ids=[str(i) for i in range(len(DW_CASES))])
def test_depthwise_conv_matches_twin_and_torch(nat, case):
    """Forward and grad-input: byte for byte the twin's (the same float32 additions in the
    same order); grad-weight: the same sums in another order, so to float32 rounding.
    All three against PyTorch's conv2d with groups = channels."""
    x, w, gy, geo = _dw_case(case)
    y = nat.depthwise_conv2d(x, w, **geo)
    _same_bytes(y, ref.depthwise_conv2d(x, w, **geo))
    gx = nat.depthwise_conv2d_grad_input(gy, w, x.shape, **geo)
    _same_bytes(gx, ref.depthwise_conv2d_grad_input(gy, w, x.shape, **geo))
    gw = nat.depthwise_conv2d_grad_weight(x, gy, w.shape[2:], **geo)
    gw_ref = ref.depthwise_conv2d_grad_weight(x, gy, w.shape[2:], **geo)
    assert gw.shape == gw_ref.shape == w.shape and gw.dtype == np.float32
    if not x.shape[0]:
        _same_bytes(gw, np.zeros_like(w))
        return
    terms = x.shape[0] * y.shape[2] * y.shape[3]  # products summed per weight
    np.testing.assert_allclose(gw, gw_ref, rtol=0, atol=1e-6 * terms * np.abs(gy).max() * np.abs(x).max())
    ty, tgx, tgw = _dw_torch(x, w, gy, geo)
    np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, tgx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, tgw, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_forward_bytes_with_special_weights(nat):
    """Infinities, NaN payloads and -0.0 in the weights: the forward multiplies the padding
    too (as the twin), so even those give the twin's bytes (the masked flat path's masked
    lanes included: the last five cases)."""
    for case in DW_CASES[:6] + DW_CASES[-5:]:
        x, w, _, geo = _dw_case(case, finite=False)
        _same_bytes(nat.depthwise_conv2d(x, w, **geo), ref.depthwise_conv2d(x, w, **geo))


# More geometries of the masked flat path (narrow planes, 3x3, stride 1, "same"): its unit
# geometry (dilation 1, pads 1 across; constant offsets, no mask on the middle column) with
# planes of 1, of fewer than 8, of 16 and of 16k + 5 elements, with a channel multiplier,
# with an odd number of planes; pt = dh = 2 with dw = pl = 1 (unit columns, rows two
# apart); and the general offsets (dilation 2 across, asymmetric pads).
DW_SAME_CASES = [
    ((2, 6, 25, 5), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((3, 5, 7, 3), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 3, 2, 3), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 4, 4, 4), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((1, 3, 12, 12), 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 3, 9, 7), 2, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((1, 1, 1, 1), 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((2, 3, 8, 5), 1, (3, 3), (1, 1), (2, 1, 2, 1), (2, 1)),
    ((2, 3, 10, 6), 1, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    ((2, 4, 5, 7), 1, (3, 3), (1, 1), (0, 2, 2, 0), (1, 1)),
    ((3, 2, 2, 15), 1, (3, 3), (1, 1), (2, 0, 0, 2), (1, 1)),
]


def _same_bytes_but_nan_payloads(a: np.ndarray, b: np.ndarray) -> None:
    """Byte for byte, except that a NaN may carry another NaN's payload: where two NaNs
    meet in a product or a sum, which one survives is the operand order the compiler chose
    (the C's, or numpy's own kernels', which differ between numpy releases)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    assert a[~nan].tobytes() == b[~nan].tobytes()


@pytest.mark.parametrize("case", DW_SAME_CASES, ids=[str(i) for i in range(len(DW_SAME_CASES))])
def test_depthwise_conv_same_path_special_values(nat, case):
    """The masked flat path with infinities, NaN payloads, -0.0 and a huge finite value in
    the input, the weights and the output gradient. Forward and grad-input: the twin's
    bytes with the specials in the weights (the padding's products w * 0 included, as the
    twin's), and with specials in the data too, but for which NaN payload survives where
    two NaNs meet. Grad-weight: the twin's NaNs and infinities where it has them (a tap
    off the row adds gy * 0, never 0 * x of a neighbouring column), its values to float32
    rounding elsewhere. On finite inputs, PyTorch's."""
    x, w, gy, geo = _dw_case(case)
    rng = _rng("dw-special", case)
    xs, ws, gys = _weights(rng, x.shape), _weights(rng, w.shape), _weights(rng, gy.shape)
    for (xx, ww, gg), same in (((x, w, gy), _same_bytes), ((x, ws, gy), _same_bytes),
                               ((xs, w, gys), _same_bytes_but_nan_payloads),
                               ((xs, ws, gys), _same_bytes_but_nan_payloads)):
        with np.errstate(invalid="ignore", over="ignore"):
            same(nat.depthwise_conv2d(xx, ww, **geo), ref.depthwise_conv2d(xx, ww, **geo))
            same(nat.depthwise_conv2d_grad_input(gg, ww, xx.shape, **geo),
                 ref.depthwise_conv2d_grad_input(gg, ww, xx.shape, **geo))
            gw = nat.depthwise_conv2d_grad_weight(xx, gg, (3, 3), **geo)
            gw_ref = ref.depthwise_conv2d_grad_weight(xx, gg, (3, 3), **geo)
            big = np.nanmax(np.abs(np.where(np.isinf(gg), np.nan, gg))) * np.nanmax(
                np.abs(np.where(np.isinf(xx), np.nan, xx)))
        terms = xx.shape[0] * xx.shape[2] * xx.shape[3]
        np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-6 * terms * big, equal_nan=True)
    ty, tgx, tgw = _dw_torch(x, w, gy, geo)
    gx = nat.depthwise_conv2d_grad_input(gy, w, x.shape, **geo)
    gw = nat.depthwise_conv2d_grad_weight(x, gy, (3, 3), **geo)
    np.testing.assert_allclose(nat.depthwise_conv2d(x, w, **geo), ty, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, tgx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, tgw, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_out_buffers_and_readonly_inputs(nat):
    x, w, gy, geo = _dw_case(DW_CASES[1])
    for a in (x, w, gy):
        a.setflags(write=False)
    for impl in (nat, ref):
        out = np.full(gy.shape, np.nan, np.float32)
        assert impl.depthwise_conv2d(x, w, **geo, out=out) is out
        _same_bytes(out, ref.depthwise_conv2d(x, w, **geo))
        gx = np.full(x.shape, np.nan, np.float32)
        assert impl.depthwise_conv2d_grad_input(gy, w, x.shape, **geo, out=gx) is gx
        gw = np.full(w.shape, np.nan, np.float32)
        assert impl.depthwise_conv2d_grad_weight(x, gy, (3, 3), **geo, out=gw) is gw
        assert np.isfinite(gx).all() and np.isfinite(gw).all()
    assert kernels.depthwise_conv2d(x, w, **geo, impl="numpy").tobytes() == out.tobytes()


@pytest.mark.parametrize("impl_name", ["native", "numpy"])
def test_depthwise_conv_bad_inputs(impl_name):
    impl = kernels.implementation(impl_name)
    x = np.ones((2, 3, 6, 6), np.float32)
    w = np.ones((6, 1, 3, 3), np.float32)
    gy = np.ones((2, 6, 4, 4), np.float32)
    buf = np.ones(x.size, np.float32)
    cases = [
        (lambda: impl.depthwise_conv2d(x.astype(np.float64), w), "x must have dtype float32"),
        (lambda: impl.depthwise_conv2d(x.transpose(0, 1, 3, 2), w), "x must be C-contiguous"),
        (lambda: impl.depthwise_conv2d(x[0], w), "x must be NCHW"),
        (lambda: impl.depthwise_conv2d(x, np.ones((6, 3, 3, 3), np.float32)), "one input channel"),
        (lambda: impl.depthwise_conv2d(x, np.ones((4, 1, 3, 3), np.float32)), "not a multiple"),
        (lambda: impl.depthwise_conv2d(x, w, strides=(0, 1)), "strides must be"),
        (lambda: impl.depthwise_conv2d(x, w, pads=(1, 1, -1, 1)), "pads must be"),
        (lambda: impl.depthwise_conv2d(x, w, pads=(1, 1)), "pads must be"),
        (lambda: impl.depthwise_conv2d(x, w, dilations=(4, 4)), "too small"),
        (lambda: impl.depthwise_conv2d(x, w, out=np.empty((2, 6, 4, 5), np.float32)), "out has shape"),
        (lambda: impl.depthwise_conv2d(x, w, out=x.reshape(2, 6, 3, 6)[:, :, :, :4]), "out must be"),
        (lambda: impl.depthwise_conv2d_grad_input(gy[:1], w, x.shape), "gy has shape"),
        (lambda: impl.depthwise_conv2d_grad_input(buf[:192].reshape(gy.shape), w, x.shape,
                                                  out=buf.reshape(x.shape)),
         "gy and out must not share memory"),
        (lambda: impl.depthwise_conv2d_grad_weight(x, gy, (3,)), "kernel_shape must be"),
        (lambda: impl.depthwise_conv2d_grad_weight(x, gy[:1], (3, 3)), "gy has shape"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()
