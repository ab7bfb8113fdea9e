"""``edgecl bench kernels``: each C kernel against its numpy twin, side by side in one run.

For every kernel: the best of ``repeats`` timings of the native kernel and of its numpy
twin on the same inputs (a layer of ``n`` weights, masks of density 0.5), the speedup,
and the bandwidth the native kernel reaches (bytes read + written / time) next to that
of a plain ``numpy.copyto`` moving the same number of bytes (the machine's memory
bandwidth reference). Figures are reported, never asserted.

    python -m edgecl.tools.bench_kernels [--n N] [--repeats R] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np

from edgecl import kernels
from edgecl.tools.tables import render

HEADERS = ["kernel", "edgecl_s", "numpy_s", "speedup", "gbps", "copy_gbps", "copy_frac"]


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: page faults, caches, dispatch
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _copy_time(nbytes: int, repeats: int, cache: dict[int, float]) -> float:
    """Time of numpy.copyto moving ``nbytes`` in all (half read, half written)."""
    half = max(1, nbytes // 2)
    if half not in cache:
        src = np.ones(half, np.uint8)
        dst = np.zeros(half, np.uint8)
        cache[half] = _best(lambda: np.copyto(dst, src), repeats)
    return cache[half]


def _cases(n: int, rng: np.random.Generator):
    """(name, bytes moved, native call, numpy call) for each kernel."""
    nat, ref = kernels.implementation("native"), kernels.implementation("numpy")
    nb = (n + 7) // 8
    w = rng.standard_normal(n, dtype=np.float32)
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    mask = rng.random(n) < 0.5
    bits = np.packbits(mask, bitorder="little")
    bits2 = np.packbits(rng.random(n) < 0.5, bitorder="little")
    out = np.empty(n, np.float32)
    out_b = np.empty(n, np.bool_)
    out_bits = np.empty(nb, np.uint8)
    rows = max(1, n // 1000)
    w2 = w[: rows * (n // rows)].reshape(rows, -1)
    gates = (rng.random(rows) < 0.5).astype(np.uint8)
    out2 = np.empty_like(w2)
    owner = rng.integers(0, 6, n).astype(np.int16)
    # optimizer states, one set per implementation (they are updated in place)
    st = {k: [w.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)] for k in ("nat", "ref")}
    steps = {"nat": 0, "ref": 0}

    def sgd(impl, key):
        p, b, _ = st[key]
        return lambda: impl.masked_sgd_momentum_(p, grad, b, bits, 0.01, 0.9, 1e-4)

    def adam(impl, key):
        p, m, v = st[key]

        def step():
            steps[key] += 1
            impl.masked_adam_(p, grad, m, v, bits, 1e-3, steps[key], weight_decay=1e-4)

        return step

    def score(impl, key):
        s, b, _ = st[key]
        return lambda: impl.score_step_(s, grad, 0.01, momentum=0.9, momentum_buf=b)

    return [
        ("materialize_bits", 8 * n + nb,
         lambda: nat.materialize_bits(w, bits, out=out), lambda: ref.materialize_bits(w, bits, out=out)),
        ("materialize_units", 8 * w2.size + rows,
         lambda: nat.materialize_units(w2, gates, out=out2),
         lambda: ref.materialize_units(w2, gates, out=out2)),
        ("masked_sgd_momentum", 20 * n + nb, sgd(nat, "nat"), sgd(ref, "ref")),
        ("masked_adam", 28 * n + nb, adam(nat, "nat"), adam(ref, "ref")),
        ("score_step (momentum)", 20 * n, score(nat, "nat"), score(ref, "ref")),
        ("pack", n + nb, lambda: nat.pack(mask), lambda: ref.pack(mask)),
        ("unpack", nb + n, lambda: nat.unpack(bits, n, out=out_b), lambda: ref.unpack(bits, n, out=out_b)),
        ("owner_mask", 2 * n + nb, lambda: nat.owner_mask(owner, 3), lambda: ref.owner_mask(owner, 3)),
        ("free_mask", 2 * n + nb, lambda: nat.free_mask(owner), lambda: ref.free_mask(owner)),
        ("popcount", nb, lambda: nat.popcount(bits, n), lambda: ref.popcount(bits, n)),
        ("and", 3 * nb, lambda: nat.and_(bits, bits2, n, out=out_bits),
         lambda: ref.and_(bits, bits2, n, out=out_bits)),
        ("andnot", 3 * nb, lambda: nat.andnot(bits, bits2, n, out=out_bits),
         lambda: ref.andnot(bits, bits2, n, out=out_bits)),
        ("hamming", 2 * nb, lambda: nat.hamming(bits, bits2, n), lambda: ref.hamming(bits, bits2, n)),
        ("overlap", 2 * nb, lambda: nat.overlap(bits, bits2, n), lambda: ref.overlap(bits, bits2, n)),
    ]


def run_kernel_bench(json_path: str | None = None, n: int = 10_000_000, repeats: int = 7,
                     *, print_table: bool = True) -> list[dict]:
    """Time every kernel against its numpy twin on a layer of ``n`` weights; print a
    table, write the rows as JSON to ``json_path`` if given, and return them.

    Row keys: ``kernel``, ``edgecl_s`` and ``numpy_s`` (best of ``repeats``), ``speedup``
    (numpy_s / edgecl_s), ``gbps`` (bytes read + written by the kernel / edgecl_s, in
    GB/s), ``copy_gbps`` (the same bytes moved by numpy.copyto), ``copy_frac``
    (gbps / copy_gbps), ``bytes``, ``n`` and ``repeats``. Raises RuntimeError if the native kernels are not
    built (a benchmark of the fallback against itself says nothing).
    """
    kernels.implementation("native")  # fails loudly without the compiled module
    rng = np.random.default_rng(0)
    copies: dict[int, float] = {}
    rows = []
    for name, nbytes, fn_nat, fn_ref in _cases(n, rng):
        t_nat, t_ref = _best(fn_nat, repeats), _best(fn_ref, repeats)
        t_copy = _copy_time(nbytes, repeats, copies)
        gbps, copy_gbps = nbytes / t_nat / 1e9, nbytes / t_copy / 1e9
        rows.append({"kernel": name, "edgecl_s": t_nat, "numpy_s": t_ref, "speedup": t_ref / t_nat,
                     "gbps": gbps, "copy_gbps": copy_gbps, "copy_frac": gbps / copy_gbps,
                     "bytes": nbytes, "n": n, "repeats": repeats})
    if print_table:
        print(f"edgecl kernels vs numpy: n={n:,} weights, masks of density 0.5, best of {repeats}; "
              f"{platform.machine()}, numpy {np.__version__}")
        print(f"kernels: {kernels.status()}")
        print(render(HEADERS, [[r["kernel"], f"{r['edgecl_s'] * 1e3:.3f} ms", f"{r['numpy_s'] * 1e3:.3f} ms",
                                f"{r['speedup']:.1f}x", f"{r['gbps']:.1f}", f"{r['copy_gbps']:.1f}",
                                f"{100 * r['copy_frac']:.0f}%"] for r in rows]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgecl bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000_000, help="weights in the layer (default 10M)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per kernel; the best counts")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = p.parse_args(argv)
    run_kernel_bench(args.json, n=args.n, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
