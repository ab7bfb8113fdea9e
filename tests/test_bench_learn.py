"""`edgecl bench learn --zoo`: the plumbing of the three-way step bench (edgecl device step,
torch eager, ONNX Runtime training) on the smallest zoo model, a few steps. Speed is not
checked here (design rule 7: benchmarks, not timed tests)."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.tools import bench_learn as bl

K = 2  # the last depthwise-separable block of DS-CNN: dw 3x3 + pw 1x1
CASE = {"ds-cnn-test": ("ds-cnn", {}, K, "test: DS-CNN, last block")}
FEAT, C = 64, bl.ZOO_CLASSES


@pytest.fixture(scope="module")
def rows():
    """One bench run shared by the tests: batch 4, 1 warm-up + 2 timed steps per side, two
    interleaved rounds."""
    return bl.run_zoo_bench(["ds-cnn-test"], steps=2, warmup=1, batch=4, cases=CASE, echo=False, rounds=2)


def test_torch_side_is_the_graph():
    """The torch variant runs the imported graph: the zoo module with BN folded and the
    graph's weights gives the graph's features."""
    torch = pytest.importorskip("torch")
    from edgecl.models.importer import import_model
    from edgecl.runtime import executor

    graph, weights = import_model("ds-cnn")
    net = bl.torch_zoo_features("ds-cnn", {}, weights)
    assert not any(p.requires_grad for p in net.parameters())
    x = np.random.default_rng(0).random((3, *graph.input.shape), dtype=np.float32)
    ref = executor.features(graph, weights, x)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * float(np.abs(ref).max()))


def test_zoo_bench_edgecl_and_torch(rows):
    (r,) = rows
    assert r["model"] == "ds-cnn-test" and r["train_last"] == K and len(r["sites"]) == K
    # the last block: dw 3x3 (64x1x3x3) + pw 1x1 (64x64x1x1)
    assert r["site_weights"] == 64 * 9 + 64 * 64
    for key in ("edgecl_step_ms", "torch_step_ms", "edgecl_cpu_ms", "torch_cpu_ms",
                "edgecl_peak_rss_mib", "torch_peak_rss_mib", "torch_over_edgecl", "rss_ratio"):
        assert r[key] > 0 and np.isfinite(r[key]), key
    assert r["torch_threads"] == 1
    # two rounds: each variant's median (of two: their mean) and the median of the rounds' ratios
    assert r["rounds"] == 2 and len(r["edgecl_step_ms_runs"]) == len(r["torch_step_ms_runs"]) == 2
    assert r["edgecl_step_ms"] == pytest.approx(np.mean(r["edgecl_step_ms_runs"]))
    assert r["torch_over_edgecl"] == pytest.approx(
        np.mean(np.divide(r["torch_step_ms_runs"], r["edgecl_step_ms_runs"])))
    # the same update: scores of the K sites + the head on both sides, nothing else trainable
    assert r["torch_trainable"] == r["site_weights"] + C * FEAT + C
    assert all(np.isfinite(r["edgecl_loss"])) and all(np.isfinite(r["torch_loss"]))


def test_zoo_bench_onnxruntime_training(rows):
    (r,) = rows
    if bl.orttrain_python() is None:
        assert r["ort_step_ms"] is None and "scripts/setup_orttrain.sh" in r["ort_skipped"]
        pytest.skip(".venv-orttrain absent (onnxruntime-training 1.19.2 is opt-in: "
                    "bash scripts/setup_orttrain.sh, see docs/learning.md)")
    assert r["ort_skipped"] is None and r["onnxruntime"] == "1.19.2"
    assert r["ort_step_ms"] > 0 and r["ort_peak_rss_mib"] > 0 and r["ort_over_edgecl"] > 0
    # the same sites' weights + the head: the same number of trained values as the scores
    assert r["ort_trainable"] == r["torch_trainable"]
    assert all(np.isfinite(r["ort_loss"]))


def test_zoo_bench_without_orttrain_venv(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_ORTTRAIN_PYTHON", str(tmp_path / "absent" / "python"))
    assert bl.orttrain_python() is None


def test_cli_wiring(monkeypatch):
    """`edgecl bench learn --zoo a,b` reaches run_zoo_bench with its options; without
    --zoo it is the MLP bench."""
    from edgecl.tools.cli import build_parser

    calls = []
    monkeypatch.setattr(bl, "run_zoo_bench", lambda *a, **k: calls.append(("zoo", a, k)) or [])
    monkeypatch.setattr(bl, "run_learn_bench", lambda *a, **k: calls.append(("mlp", a, k)) or [])
    args = build_parser().parse_args(["bench", "learn", "--zoo", "ds-cnn,mobilenet-v2", "--zoo-steps", "3",
                                      "--train-last", "2", "--zoo-rounds", "3", "--json", "out.json"])
    assert args.func(args) == 0
    kind, a, k = calls[-1]
    assert kind == "zoo" and a == (["ds-cnn", "mobilenet-v2"], "out.json")
    assert k["steps"] == 3 and k["train_last"] == 2 and k["threads"] == 1 and k["batch"] == bl.BATCH
    assert k["rounds"] == 3
    args = build_parser().parse_args(["bench", "learn"])
    assert args.func(args) == 0 and calls[-1][0] == "mlp"


def test_unknown_zoo_model_is_refused_first():
    with pytest.raises(ValueError, match="unknown zoo bench model 'no-such-model'"):
        bl.run_zoo_bench(["ds-cnn", "no-such-model"], echo=False)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bl.run_zoo_bench(["ds-cnn"], echo=False, rounds=0)
