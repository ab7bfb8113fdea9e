"""On-device learning (edgecl.runtime.learn): a new task learned in numpy + the C kernels,
zero forgetting checked on canaries, RAM and energy budgets, resume, torch blocked."""

from __future__ import annotations

import json
import shutil
import stat
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgecl.runtime import Runtime
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_format import MANIFEST, VERSIONS_DIR, parse_manifest
from edgecl.runtime.evaluate import evaluate
from edgecl.runtime.learn import ForgettingError, LearnError, RamBudgetError, energy, learn, planner
from edgecl.runtime.learn import learner as L
from edgecl.runtime.learn import train_numpy as T
from edgecl.runtime.routers.store import update_routers

from .device_process import run_on_device

TICK = {"kind": "model", "watts": 1.0, "tick_s": 0.1}  # 0.1 J per meter read: deterministic


def _prefix_bundle(src: Path, dst: Path, n: int, digits) -> Path:
    """The bundle a host run of the first ``n`` tasks gives (``edgecl bundle``): version n
    of a longer bundle, made current, then its routers fitted with those tasks' data."""
    shutil.copytree(src, dst)
    raw = (dst / VERSIONS_DIR / f"{n:06d}.json").read_bytes()
    manifest = parse_manifest(raw, dst / MANIFEST)
    assert len(manifest["tasks"]) == n
    (dst / MANIFEST).write_bytes(raw)
    for p in (dst / VERSIONS_DIR).glob("*.json"):
        if int(p.stem) > n:
            p.unlink()
    keep = set(manifest["files"])
    for p in [p for p in dst.rglob("*.safetensors")]:
        if str(p.relative_to(dst)) not in keep:
            p.unlink()
    update_routers(dst, [(t.name, t.x_train, t.y_train) for t in digits.tasks[:n]])
    return dst


@pytest.fixture
def four(trained, digits, tmp_path):
    def get(method: str) -> Path:
        return _prefix_bundle(trained(method)[1], tmp_path / f"b4-{method}", 4, digits)
    return get


def _samples(tmp_path: Path, task) -> Path:
    path = tmp_path / "samples.npz"
    np.savez(path, x=task.x_train, y=np.asarray(task.classes)[task.y_train])
    return path


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _logits_bytes(rt: Runtime, digits, names) -> dict[str, bytes]:
    return {n: rt.logits(digits.tasks[i].x_test.reshape(-1, 64), n).tobytes()
            for i, n in enumerate(names)}


# ------------------------------------------------------------------ the math
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_numpy_backward_matches_torch_autograd(arch):
    torch = pytest.importorskip("torch")
    from edgecl.models import architectures
    from edgecl.models.torchnet import features

    layers = architectures.build(arch, (1, 8, 8))
    rng = np.random.default_rng(0)
    params = {}
    for layer in architectures.weighted(layers):
        shape = architectures.weight_shape(layer)
        params[layer["name"]] = (rng.standard_normal(shape).astype(np.float32) * 0.2,
                                 rng.standard_normal(shape[0]).astype(np.float32) * 0.1)
    fd = architectures.feature_dim(layers)
    head = (rng.standard_normal((3, fd)).astype(np.float32) * 0.1, np.zeros(3, np.float32))
    x = rng.random((6, 64) if arch == "mlp" else (6, 1, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 1, 0, 2])
    logits, cache = T.forward(layers, params, head, x)
    loss, g = T.cross_entropy(logits, y)
    gw, gb, ghw, ghb = T.backward(layers, params, head, cache, g, set(params), bias=True)
    tp = {n: (torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True))
          for n, (w, b) in params.items()}
    th = [torch.tensor(a, requires_grad=True) for a in head]
    out = torch.nn.functional.linear(features(layers, tp, torch.tensor(x)), *th)
    tl = torch.nn.functional.cross_entropy(out, torch.tensor(y))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-5
    np.testing.assert_allclose(logits, out.detach().numpy(), atol=1e-5)
    for n in params:
        np.testing.assert_allclose(gw[n], tp[n][0].grad.numpy(), atol=1e-5)
        np.testing.assert_allclose(gb[n], tp[n][1].grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(ghw, th[0].grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(ghb, th[1].grad.numpy(), atol=1e-5)


# ------------------------------------------------------------------ Split-Digits task 5
@pytest.mark.slow
@pytest.mark.parametrize("method", ["supsup", "packnet"])
def test_device_learns_task5_like_the_host_and_forgets_nothing(method, four, run_of, digits, tmp_path):
    bundle = four(method)
    names = [t.name for t in digits.tasks[:4]]
    v_before = Bundle.open(bundle)
    old_backbone = (bundle / v_before.manifest["backbone"]).read_bytes()
    before = _logits_bytes(Runtime(bundle), digits, names)
    # holdout 0: the device trains on exactly the samples the host trained on
    r = learn(bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method=method, seed=0,
              holdout=0.0, quiet=True, json_path=tmp_path / "report.json")
    assert r["status"] == "committed" and len(r["versions"]) == 2  # the task, then the routers
    doc = json.loads((tmp_path / "report.json").read_text())
    for key in ("steps", "seconds", "joules", "meter", "peak_rss_bytes", "batch_size", "plan_bytes"):
        assert doc[key] is not None, key
    after = Bundle.open(bundle)
    assert after.task_names == names + ["digits-8-9"]
    assert _logits_bytes(Runtime(bundle), digits, names) == before  # byte-identical
    if method == "supsup":
        assert after.manifest["backbone"] == v_before.manifest["backbone"]
    else:
        assert after.manifest["backbone"] != v_before.manifest["backbone"]
        assert not (bundle / L.WORK_DIR).exists()
    assert (bundle / v_before.manifest["backbone"]).read_bytes() == old_backbone
    t5 = digits.tasks[4]
    device = float((Runtime(bundle).predict(t5.x_test.reshape(-1, 64), "digits-8-9")
                    == np.asarray(t5.classes)[t5.y_test]).mean())
    host = run_of(method).acc_matrix[4][4]
    print(f"{method}: device {device:.4f} host {host:.4f}")
    assert abs(device - host) <= 0.02
    # edgecl eval --data split-digits: task 5 is the next row and column
    res = evaluate(bundle, [(t.name, t.x_test, t.y_test) for t in digits.tasks])
    assert res["tasks"][-1] == "digits-8-9" and res["acc_matrix"][4][4] == pytest.approx(device)
    assert res["bwt"] == 0.0
    assert all(res["acc_matrix"][4][j] == res["acc_matrix"][j][j] for j in range(4))
    # the routers cover the new task (updated with its data only)
    assert sorted(after.manifest["routers"]) and all(
        e["tasks"] == after.task_names for e in after.manifest["routers"].values())


def test_head_mode_reports_holdout_accuracy_and_keeps_the_backbone(four, digits, tmp_path):
    bundle = four("supsup")
    backbone = Bundle.open(bundle).manifest["backbone"]
    r = learn(bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method="head", epochs=10,
              quiet=True, routers=False)
    assert r["holdout_acc"] is not None and r["holdout_acc"] > 0.8 and r["n_holdout"] > 0
    b = Bundle.open(bundle)
    assert b.manifest["backbone"] == backbone and b.task("digits-8-9")["mask_kind"] == "weight_bits"
    # head mode runs on the newest task's mask: the file carries that mask
    new, src = b.task_tensors("digits-8-9"), b.task_tensors("digits-6-7")
    assert all(np.array_equal(new[k], src[k]) for k in src if k.startswith("mask."))


# ------------------------------------------------------------------ RAM budget
def test_ram_budget_below_minimum_is_refused_with_the_minimum(four, digits, tmp_path):
    bundle = four("supsup")
    snap = _all_bytes(bundle)
    with pytest.raises(RamBudgetError, match=r"below the minimum .*: \d+\.\d+ MiB"):
        learn(bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method="supsup",
              ram_mb=1.0, quiet=True)
    assert _all_bytes(bundle) == snap


def test_child_exceeding_the_budget_dies_alone_and_nothing_changes(four, digits, tmp_path):
    bundle = four("packnet")
    snap = _all_bytes(bundle)
    with pytest.raises(RamBudgetError, match="exceeded its RAM budget"):
        learn(bundle, "digits-8-9", _samples(tmp_path, digits.tasks[4]), method="packnet",
              ram_mb=32, quiet=True, debug_alloc_mb=200)
    assert _all_bytes(bundle) == snap
    assert Bundle.open(bundle).task_names[-1] == "digits-6-7"


def test_planner_picks_a_smaller_batch_under_a_tighter_budget():
    from edgecl.models.architectures import build, feature_dim

    layers = build("cnn", (1, 8, 8))
    model = {"layers": layers, "input_shape": [1, 8, 8], "feature_dim": feature_dim(layers)}
    kw = dict(model=model, mode="packnet", n_tasks=4, n_classes=2, n_samples=300)
    big = planner.plan(batch_size=32, **kw)
    one = planner.plan(batch_size=1, **kw)
    assert big.total > one.total and big.activations == 32 * one.activations
    chosen, minimum = planner.choose(one.total + (big.total - one.total) // 2, 32, **kw)
    assert 1 < chosen.batch_size < 32 and minimum.total == one.total
    with pytest.raises(ValueError):
        planner.choose(one.total - 1, 32, **kw)
    head = planner.plan(batch_size=32, **dict(kw, mode="head"))
    assert head.gradients == 0 and head.optimizer == 0


# ------------------------------------------------------------------ energy budget
@pytest.mark.parametrize("method", ["packnet", "supsup"])
def test_energy_pause_and_resume_equals_an_uninterrupted_run(method, four, digits, tmp_path):
    a = four(method)
    b = tmp_path / "uninterrupted"
    shutil.copytree(a, b)
    data = _samples(tmp_path, digits.tasks[4])
    kw = dict(method=method, epochs=5, seed=3, meter=TICK, quiet=True, routers=False)
    snap = _all_bytes(a)
    r1 = learn(a, "digits-8-9", data, energy_j=2.0, **kw)
    assert r1["status"] == "paused" and r1["steps"] == 20  # start + 20 reads of 0.1 J
    ckpt = Path(r1["checkpoint"])
    assert ckpt.is_file() and ckpt.parent.parent == a / L.WORK_DIR
    assert {k: v for k, v in _all_bytes(a).items() if not k.startswith(L.WORK_DIR)} == snap
    with pytest.raises(LearnError, match="--resume"):
        learn(a, "digits-8-9", data, **kw)
    with pytest.raises(LearnError, match="seed"):
        learn(a, "digits-8-9", data, resume=True, **dict(kw, seed=4))
    r2 = learn(a, "digits-8-9", data, energy_j=1.5, resume=True, **kw)
    assert r2["status"] == "paused" and r2["steps"] == 35
    r3 = learn(a, "digits-8-9", data, resume=True, **kw)
    assert r3["status"] == "committed" and r3["steps"] == r3["total_steps"]
    assert not ckpt.exists()
    ref = learn(b, "digits-8-9", data, **kw)
    ta, tb = Bundle.open(a), Bundle.open(b)
    xa, xb = ta.task_tensors("digits-8-9"), tb.task_tensors("digits-8-9")
    assert xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_allclose(xa[k], xb[k], atol=1e-6, rtol=0)
    np.testing.assert_allclose(r3["joules"], ref["joules"], rtol=1e-9)
    for k, v in tb.backbone.items():
        np.testing.assert_allclose(ta.backbone[k], v, atol=1e-6, rtol=0)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_rapl_reader_counts_across_wraparound(tmp_path):
    z = tmp_path / "sys/class/powercap/intel-rapl:0"
    _write(z / "energy_uj", "999000000\n")
    _write(z / "max_energy_range_uj", "1000000000\n")
    _write(tmp_path / "sys/class/powercap/intel-rapl:0:0/energy_uj", "5\n")  # a sub-zone: ignored
    m = energy.RaplMeter(tmp_path)
    m.start()
    _write(z / "energy_uj", "999500000\n")
    assert m.joules() == pytest.approx(0.5)
    _write(z / "energy_uj", "250000\n")  # wrapped past max_energy_range_uj
    assert m.joules() == pytest.approx(0.5 + 0.5 + 0.25)
    assert "intel-rapl:0" in m.describe() and not m.estimate


def test_ina3221_readers_both_layouts(tmp_path):
    clock = iter([0.0, 2.0, 4.0]).__next__
    iio = tmp_path / "sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0"
    _write(iio / "in_power0_input", "1000\n")  # mW
    _write(iio / "in_power1_input", "500\n")
    m = energy.Ina3221Meter(tmp_path, clock=clock)
    m.start()
    assert m.joules() == pytest.approx(3.0)  # 1.5 W for 2 s
    _write(iio / "in_power0_input", "2500\n")
    assert m.joules() == pytest.approx(3.0 + 0.5 * (1.5 + 3.0) * 2)
    root2 = tmp_path / "orin"
    hw = root2 / "sys/class/hwmon/hwmon3"
    _write(hw / "name", "ina3221\n")
    _write(hw / "in1_input", "5000\n")   # mV
    _write(hw / "curr1_input", "400\n")  # mA -> 2 W
    _write(hw / "in2_input", "5000\n")
    _write(hw / "curr2_input", "200\n")  # 1 W
    _write(root2 / "sys/class/hwmon/hwmon0/name", "acpitz\n")
    m2 = energy.Ina3221Meter(root2, clock=iter([10.0, 11.0]).__next__)
    assert m2.watts() == pytest.approx(3.0)


PMIC_OUT = """\
     3V7_WL_SW_A current(0)=0.00390372A
       3V3_SYS_A current(1)=0.05660400A
      VDD_CORE_A current(7)=0.50000000A
     3V7_WL_SW_V volt(8)=3.74475600V
       3V3_SYS_V volt(9)=3.31200000V
      VDD_CORE_V volt(15)=0.80000000V
       EXT5V_V volt(24)=5.13600000V
"""


def test_pmic_reader_parses_vcgencmd(tmp_path):
    rails = energy.parse_pmic_adc(PMIC_OUT)
    assert set(rails) == {"3V7_WL_SW", "3V3_SYS", "VDD_CORE"}  # EXT5V has no current
    tool = tmp_path / "usr/bin/vcgencmd"
    _write(tool, "#!/bin/sh\ncat <<'EOF'\n" + PMIC_OUT + "EOF\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    m = energy.PmicMeter(tmp_path)
    want = 0.00390372 * 3.744756 + 0.056604 * 3.312 + 0.5 * 0.8
    assert m.watts() == pytest.approx(want)


def test_absent_readers_are_reported_absent_and_model_is_an_estimate(tmp_path):
    got = energy.probe(tmp_path)
    assert all(got[k].startswith("absent") for k in ("rapl", "ina3221", "pmic"))
    assert "estimate" in got["model"]
    m = energy.make_meter("auto", tmp_path)
    assert m.estimate and isinstance(m, energy.ModelMeter)
    with pytest.raises(energy.MeterUnavailable):
        energy.RaplMeter(tmp_path)
    mm = energy.ModelMeter("rpi5", cpu_time=iter([1.0, 3.0]).__next__)
    mm.start()
    assert mm.joules() == pytest.approx(2.0 * energy.CALIBRATION_W["rpi5"])


# ------------------------------------------------------------------ zero forgetting guard
def test_a_candidate_that_changes_an_owned_weight_is_refused(four, digits):
    bundle = Bundle.open(four("packnet"))
    canaries = L.canary_inputs((64,), digits.tasks[4].x_train.reshape(-1, 64))
    before = L._old_logits(Runtime(bundle), bundle.task_names, canaries)
    last = bundle.task_tensors(bundle.task_names[-1])
    entry = {"name": "new", "classes": [8, 9], "n_classes": 2, "method": "packnet",
             "mask_kind": "weight_bits", "metrics": {}}
    backbone = {k: np.array(v) for k, v in bundle.backbone.items()}
    owned = np.unpackbits(last["mask.fc1"], bitorder="little")[: backbone["fc1.weight"].size]
    free_i, owned_i = np.flatnonzero(owned == 0)[0], np.flatnonzero(owned == 1)[0]
    backbone["fc1.weight"].reshape(-1)[free_i] = 0.5  # a free weight: old tasks never see it
    L.verify_candidate(bundle, backbone, entry, last, canaries, before)
    backbone["fc1.weight"].reshape(-1)[owned_i] += 1.0
    with pytest.raises(ForgettingError, match="owned weights of fc1"):
        L.verify_candidate(bundle, backbone, entry, last, canaries, before)
    tampered = {k: v for k, v in before.items()}
    tampered[bundle.task_names[0]] = b"x"
    with pytest.raises(ForgettingError, match="canary"):
        L.verify_candidate(bundle, None, entry, last, canaries, tampered)


# ------------------------------------------------------------------ torch blocked
def test_learner_runs_with_torch_blocked(four, digits, tmp_path):
    bundle = four("packnet")
    data = _samples(tmp_path, digits.tasks[4])
    code = textwrap.dedent("""
        import argparse, sys
        from edgecl.tools import learn_cmd
        p = argparse.ArgumentParser(); learn_cmd.add_arguments(p)
        rc = learn_cmd.main(p.parse_args(sys.argv[1:]))
        assert "torch" not in sys.modules
        sys.exit(rc)
    """)
    r = run_on_device(tmp_path, code, bundle, "--task", "digits-8-9", "--data", data, "--method",
                      "packnet", "--epochs", "2", "--quiet", "--json", tmp_path / "r.json",
                      blocked=("torch",))  # the learning child inherits the blocker
    assert r.returncode == 0, r.stderr + r.stdout
    assert "byte-identical" in r.stdout
    chk = run_on_device(tmp_path, "import torch", blocked=("torch",))
    assert chk.returncode != 0 and "blocked" in chk.stderr
    assert Bundle.open(bundle).task_names[-1] == "digits-8-9"


# ------------------------------------------------------------------ the compiled TVM step
@pytest.mark.slow
def test_tvm_train_step_is_used_and_agrees_with_the_numpy_path(four, digits, tmp_path):
    """With a compiled training step in the bundle, learn uses it; the task it learns is the
    one the numpy path learns (same seed, same data order)."""
    from edgecl.compiler.tvm_build import compile_bundle

    a = four("supsup")
    compile_bundle(a, "host")  # forward + train step for this machine
    assert Bundle.open(a).manifest["targets"]["host"]["train_step"]["file"]
    b = tmp_path / "numpy-copy"
    shutil.copytree(a, b)
    samples = _samples(tmp_path, digits.tasks[4])
    kw = {"method": "supsup", "epochs": 3, "seed": 0, "holdout": 0.0, "quiet": True, "routers": False}
    r_tvm = learn(a, "digits-8-9", samples, step_backend="auto", **kw)
    r_np = learn(b, "digits-8-9", samples, step_backend="numpy", **kw)
    assert r_tvm["step_backend"] == "tvm" and r_np["step_backend"] == "numpy"
    assert r_tvm["steps"] == r_np["steps"] > 0
    ta, tb = Bundle.open(a).task_tensors("digits-8-9"), Bundle.open(b).task_tensors("digits-8-9")
    for key in ta:
        if key.startswith("mask."):  # supermask bits: the same top-k, up to rare ties
            same = np.unpackbits(ta[key]) == np.unpackbits(tb[key])
            assert same.mean() >= 0.999, key
        else:
            np.testing.assert_allclose(ta[key], tb[key], atol=1e-4, rtol=0)
    x = digits.tasks[4].x_test.reshape(-1, 64)
    np.testing.assert_allclose(Runtime(a).logits(x, "digits-8-9"), Runtime(b).logits(x, "digits-8-9"),
                               atol=1e-3, rtol=0)


# ------------------------------------------------------------------ supsup's top-k
def _reference_topk(flat: np.ndarray, k: int) -> np.ndarray:
    """The top-k the straightforward way: a stable sort, descending, lowest index first
    among equal scores."""
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep


def test_incremental_topk_is_exactly_the_top_k_under_any_moves():
    from edgecl.runtime.learn.trainer import TopK, kth_largest, topk_mask

    rng = np.random.default_rng(0)
    for size, density in [(65536, 0.5), (16384, 0.5), (1000, 0.3), (7, 0.5), (1, 0.5)]:
        flat = rng.uniform(-0.15, 0.15, size).astype(np.float32)
        tk = TopK(size, density)
        for step in range(60):
            # small Adam-like moves, occasional large jumps, a shift of everything, ties
            kind = step % 6
            if kind == 3:
                flat += np.float32(rng.uniform(-0.05, 0.05))
            elif kind == 4:
                flat[rng.integers(0, size, max(1, size // 10))] = np.float32(rng.uniform(-1, 1))
            elif kind == 5:
                flat[rng.integers(0, size, max(1, size // 3))] = flat[rng.integers(0, size)]
            else:
                flat += (rng.standard_normal(size) * 1e-3).astype(np.float32)
            thr = tk.threshold(flat)
            assert thr == kth_largest(flat, tk.k)
            keep = topk_mask(flat, tk.k, thr)
            assert int(keep.sum()) == tk.k
            np.testing.assert_array_equal(keep, _reference_topk(flat, tk.k))
        if size >= 16384:
            assert tk.full < 20  # the band finds it most of the time


def test_supsup_step_runs_on_the_exact_supermask_of_its_scores():
    from edgecl.runtime.learn import trainer
    from edgecl.runtime.masks import materialize_bits

    rng = np.random.default_rng(1)
    layers = [{"op": "linear", "name": "fc1", "in_features": 16, "out_features": 32, "bias": False},
              {"op": "relu"},
              {"op": "linear", "name": "fc2", "in_features": 32, "out_features": 32, "bias": False},
              {"op": "relu"}]
    model = {"layers": layers, "input_shape": [16], "feature_dim": 32}
    backbone = {"fc1.weight": rng.standard_normal((32, 16)).astype(np.float32),
                "fc2.weight": rng.standard_normal((32, 32)).astype(np.float32)}
    x, y = rng.random((64, 16), dtype=np.float32), rng.integers(0, 3, 64)
    hp = dict(trainer.DEFAULTS["supsup"], epochs=1)
    p = trainer.Problem(model, backbone, [], x, y, 3, "supsup", hp, 16, 0)
    s = p.initial()
    for i in range(40):
        params = trainer._step_params(p, s)
        for n in p.names:
            scores = s.arrays[f"scores.{n}"]
            want = _reference_topk(scores.reshape(-1), trainer.topk_count(scores.size, 0.5))
            np.testing.assert_array_equal(params[n][0].view(np.uint32), materialize_bits(
                backbone[f"{n}.weight"], np.packbits(want, bitorder="little")).view(np.uint32))
            np.testing.assert_array_equal(trainer.topk_bits(scores, 0.5),
                                          np.packbits(want, bitorder="little"))
        trainer.numpy_step(p, s, np.arange(i % 4 * 16, i % 4 * 16 + 16))
