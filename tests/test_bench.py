"""`edgecl bench`: the rows the issues name, for every backend and peer asked, in one run;
`edgecl bench zoo`: the zoo benchmark's plumbing (fields, not speed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    assert "x peer" in capsys.readouterr().out


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


# -- the peers (ONNX Runtime, LiteRT, torch eager in their own processes) -------------------
PEER_KEYS = KEYS | {"kind", "provider", "x_peer", "fastest_peer", "check", "task_switch_us_per_mweight"}


def test_peers_side_by_side_on_the_mlp(trained, tmp_path):
    """ort, litert and torch next to edgecl's onnxruntime row: every row's fields, ratios
    against the fastest peer, and each peer computing the bundle's own logits."""
    from edgecl.tools.bench import run_bench

    bundle = tmp_path / "b"
    shutil.copytree(trained("supsup")[1], bundle)
    export_onnx(bundle)
    export_tflite(bundle)
    names = ["onnxruntime", "ort", "litert", "torch"]
    rows = run_bench(bundle, names, [1, 4], iters=40, log=lambda _m: None, seconds=0.05, min_iters=3,
                     switch_rounds=2, workdir=tmp_path / "work")
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in names for n in (1, 4)}
    for r in rows:
        assert PEER_KEYS <= set(r), PEER_KEYS - set(r)
        assert r["kind"] == ("edgecl" if r["backend"] == "onnxruntime" else "peer")
        assert r["p50_s"] > 0 and r["p99_s"] >= r["p50_s"] and r["peak_rss_bytes"] > 0 and r["iters"] >= 3
        assert r["check"] < 1e-4, (r["backend"], r["check"])  # the same logits as the numpy reference
        assert r["task_switch_s"] > 0
        peers = [p for p in rows if p["kind"] == "peer" and p["batch"] == r["batch"]]
        best = min(peers, key=lambda p: p["p50_s"])
        assert r["fastest_peer"] == best["backend"]
        assert r["x_peer"] == pytest.approx(r["p50_s"] / best["p50_s"])
        assert r["router"] == "prototype" and r["router_share"] > 0
    by = {r["backend"]: r for r in rows}
    assert by["onnxruntime"]["provider"] == "onnxruntime" and "p50_backend_s" in by["onnxruntime"]
    assert by["ort"]["provider"].startswith("onnxruntime ")
    assert by["torch"]["torch_model"].startswith("graph via torchnet")  # the MLP is not a zoo model
    # the ORT peer's models are self-contained: the task's weights are in the file
    import onnx

    m = onnx.load(str(tmp_path / "work" / "task0.onnx"))
    inits = m.graph.initializer
    assert inits and all(t.data_location != onnx.TensorProto.EXTERNAL for t in inits)


def test_ratios_and_summary():
    from edgecl.tools.bench import add_ratios, summary

    def row(name, kind, batch, p50, router=None):
        r = {"backend": name, "kind": kind, "provider": name, "batch": batch, "p50_s": p50}
        if router is not None:
            r["router_s"] = router
        return r

    rows = [row("edgecl", "edgecl", 1, 9e-6, 1e-6), row("tvm", "edgecl", 1, 12e-6, 1e-6),
            row("ort", "peer", 1, 10e-6), row("torch", "peer", 1, 40e-6),
            row("edgecl", "edgecl", 8, 90e-6, 2e-6), row("ort", "peer", 8, 60e-6),
            row("litert", "peer", 8, 50e-6)]
    add_ratios(rows)
    assert rows[0]["fastest_peer"] == "ort" and rows[0]["x_peer"] == pytest.approx(0.9)
    assert rows[4]["fastest_peer"] == "litert" and rows[4]["x_peer"] == pytest.approx(1.8)
    s = summary(rows)["batches"]
    assert s[1]["edgecl"] == "edgecl" and s[1]["peer"] == "ort"
    assert s[1]["ratio"] == pytest.approx(0.9) and s[1]["tvm_ratio"] == pytest.approx(1.2)
    assert s[1]["router_share"] == pytest.approx(1e-6 / 9e-6)
    assert s[8]["ratio"] == pytest.approx(1.8) and s[8]["tvm_ratio"] is None


def test_bench_zoo_rejects_an_unknown_model(capsys):
    assert main(["bench", "zoo", "--models", "no-such-model", "--quick"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_bench_zoo_quick_plumbing(tmp_path, monkeypatch, capsys):
    """`edgecl bench zoo --models ds-cnn --quick`: the cached 2-task bundle, its exports, one
    table and the summary, the JSON document (fields, not speed); a second run reuses the cache."""
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "zoo.json"
    rows = "edgecl,onnxruntime,tflite,ort,litert,torch"
    assert main(["bench", "zoo", "--models", "ds-cnn", "--quick", "--backends", rows, "--batch", "1,8",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "== summary" in text and "fastest peer" in text and "ds-cnn" in text
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["batches"] == [1, 8] and list(doc["models"]) == ["ds-cnn"]
    m = doc["models"]["ds-cnn"]
    assert m["zoo"] == {"name": "ds-cnn", "kwargs": {}} and m["tvm"] is None  # tvm not asked: not built
    want = {(b, n) for b in rows.split(",") for n in (1, 8)}
    assert {(r["backend"], r["batch"]) for r in m["rows"]} == want
    by = {(r["backend"], r["batch"]): r for r in m["rows"]}
    assert by[("edgecl", 1)]["provider"] in ("onnxruntime", "tflite")  # no TVM library in the bundle
    assert by[("torch", 1)]["torch_model"].startswith("zoo module ds-cnn")  # the original nn.Module
    for r in m["rows"]:
        assert PEER_KEYS <= set(r) and r["check"] < 1e-3, (r["backend"], r["check"])
    for b in ("1", "8"):
        s = m["summary"]["batches"][b]
        assert {"edgecl", "edgecl_p50_s", "peer", "peer_p50_s", "ratio"} <= set(s)
        assert s["peer"] in ("ort", "litert", "torch") and s["ratio"] > 0
    assert m["summary"]["batches"]["1"]["router_share"] > 0
    bundle = m["bundle"]
    assert bundle.startswith(str(tmp_path / "cache" / "bench-zoo"))
    made = (Path(bundle) / "manifest.json").stat().st_mtime_ns
    assert main(["bench", "zoo", "--models", "ds-cnn", "--quick", "--backends", "ort", "--batch", "1"]) == 0
    assert (Path(bundle) / "manifest.json").stat().st_mtime_ns == made  # cached: not trained again


@pytest.mark.slow
def test_bench_methods_one_run_every_figure(tmp_path, capsys):
    """`edgecl bench methods`: the figures of each method measured in one run on one stream:
    accuracy through the runtime, zero BWT, storage, a latency, the router's task-ID
    accuracy, and what a device holds for each number of tasks (growing with N)."""
    out, png = tmp_path / "methods.json", tmp_path / "growth.png"
    assert main(["bench", "methods", "--methods", "packnet,hat", "--workdir", str(tmp_path / "w"),
                 "--json", str(out), "--plot", str(png)]) == 0
    table = capsys.readouterr().out.split("=== all methods")[-1]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["packnet", "hat"]
    for r in rows:
        assert r["method"] in table
        assert r["acc"] >= 0.97 and r["bwt"] == 0.0 and r["latency_us_b1"] > 0 and r["train_s"] > 0
        assert 0.9 <= r["task_id_acc"] <= 1.0 and r["bits_per_weight_per_task"] > 0
        assert [p["tasks"] for p in r["per_n_tasks"]] == [1, 2, 3, 4, 5]
        flash = [p["flash_bytes"] for p in r["per_n_tasks"]]
        assert all(b > a for a, b in zip(flash, flash[1:], strict=False))  # a task file per task
        assert all(p["ram_bytes"] > 0 for p in r["per_n_tasks"])
    assert png.stat().st_size > 0


def test_bench_methods_refuses_an_unknown_method(capsys):
    assert main(["bench", "methods", "--methods", "packnet,nope"]) != 0
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
