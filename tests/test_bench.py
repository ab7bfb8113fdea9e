"""`edgecl bench`: the rows the issues name, for every backend asked, in one run."""

from __future__ import annotations

import json
import shutil

import pytest

from edgecl.compiler.onnx_export import export_bundle as export_onnx
from edgecl.compiler.tflite_export import export_bundle as export_tflite
from edgecl.compiler.tvm_build import compile_bundle
from edgecl.tools.cli import main

KEYS = {"backend", "batch", "p50_s", "p99_s", "throughput_per_s", "cold_load_s", "task_switch_s",
        "peak_rss_bytes"}


@pytest.mark.slow
def test_bench_backends_side_by_side(trained, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(trained("supsup")[1], bundle)
    compile_bundle(bundle, "host", train=False, log=lambda _m: None)
    export_onnx(bundle)
    export_tflite(bundle)
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    backends = ["numpy", "tvm", "onnxruntime", "tflite", "torch"]
    assert main(["bench", str(bundle), "--backends", ",".join(backends), "--batch", "1,32",
                 "--iters", "200", "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in backends for n in (1, 32)}
    for r in rows:
        assert KEYS <= set(r), set(r)
        assert r["p50_s"] > 0 and r["p99_s"] >= r["p50_s"] and r["peak_rss_bytes"] > 0
        assert r["router"] == "prototype" and r["router_share"] > 0
    assert png.stat().st_size > 0
    assert "x ORT p50" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_kernels_and_learn_rows(tmp_path):
    from edgecl.tools.bench_kernels import run_kernel_bench
    from edgecl.tools.bench_learn import run_learn_bench

    rows = run_kernel_bench(str(tmp_path / "k.json"), n=1_000_003, repeats=2, print_table=False)
    assert {"materialize_bits", "masked_sgd_momentum"} <= {r["kernel"] for r in rows}
    for r in rows:
        assert {"kernel", "edgecl_s", "numpy_s", "speedup", "gbps", "copy_gbps"} <= set(r)
    rows = run_learn_bench(tmp_path / "l.json", steps=20)
    assert {r["method"] for r in rows} >= {"packnet", "supsup"}
    assert json.loads((tmp_path / "l.json").read_text()) == rows
