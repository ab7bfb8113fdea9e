"""LoRA per task on a frozen backbone, and task arithmetic over the tasks (docs/method-lora.md):
Task-IL accuracy and exact zero forgetting through the runtime, storage, the merge (function
and CLI) with the merged / isolated / router-picked accuracies, and a LoRA task learned on
the device with torch blocked, then merged again."""

from __future__ import annotations

import json
import math
import shutil
import textwrap

import numpy as np
import pytest

from edgecl.compiler.from_run import bundle_run
from edgecl.models.data import split_digits
from edgecl.models.methods import METHODS
from edgecl.models.methods.lora import Adapter, LoRA
from edgecl.models.training import train
from edgecl.runtime import Runtime
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.evaluate import evaluate
from edgecl.runtime.kinds import get_kind
from edgecl.runtime.learn import planner
from edgecl.runtime.learn.methods import LEARN_METHODS
from edgecl.runtime.merge import MergeError, merge, merged_params, task_vectors

from .conftest import _quiet
from .device_process import run_on_device
from .test_learn import _prefix_bundle

NAMES = [f"digits-{a}-{a + 1}" for a in range(0, 10, 2)]


def _test_data(stream):
    return [(t.name, t.x_test, t.y_test) for t in stream.tasks]


def _global(stream, names=NAMES):
    """(task, x_test, y_test as global labels) of the named tasks."""
    by = {t.name: t for t in stream.tasks}
    return [(n, by[n].x_test, np.asarray(by[n].classes)[by[n].y_test]) for n in names]


def _logit_bytes(rt: Runtime, stream, k: int) -> list[bytes]:
    return [rt.logits(t.x_test.reshape(-1, *rt.input_shape), t.name).tobytes() for t in stream.tasks[:k]]


def _file_bytes(root, names) -> dict[str, bytes]:
    b = Bundle.open(root)
    return {n: (root / b.task(n)["file"]).read_bytes() for n in names}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """The default MLP, seed 0: 3 tasks bundled, then the run continued to 5 and bundled
    again (the old tasks' runtime outputs and backbone recorded in between)."""
    root = tmp_path_factory.mktemp("lora")
    run_dir, bundle = root / "run", root / "bundle"
    stream = split_digits(0)
    train("split-digits", "lora", run_dir, n_tasks=3, log=_quiet)
    assert bundle_run(run_dir, bundle) == [1, 2, 3]
    rt = Runtime(bundle)
    before = _logit_bytes(rt, stream, 3)
    backbone = (bundle / rt.bundle.backbone_file()).read_bytes()
    run = train("split-digits", "lora", run_dir, log=_quiet)  # continues the run
    assert bundle_run(run_dir, bundle) == [4, 5]
    return {"run": run, "bundle": bundle, "stream": stream, "before": before, "backbone": backbone,
            "root": root}


def test_lora_is_registered_on_host_kind_and_device():
    assert METHODS["lora"] is LoRA and LoRA.kind == "lora"
    assert "lora" in LEARN_METHODS and "lora" in get_kind("lora").learners
    assert LEARN_METHODS["lora"].produces == "lora"


def test_split_digits_task_il_accuracy_zero_bwt_and_storage(lora):
    r = evaluate(lora["bundle"], _test_data(lora["stream"]))
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0
    for i, row in enumerate(r["acc_matrix"]):
        for j in range(i):
            assert row[j] == r["acc_matrix"][j][j]
    # storage: r * (fan_in + units) float32 per site (fc1 64->256, fc2 256->256) and the scale
    graph = Bundle.open(lora["bundle"]).graph
    own = 4 * sum(4 * (math.prod(s.shape) // s.units + s.units) for s in graph.mask_sites()) + 4
    assert r["bits_per_weight_per_task"] == [8.0 * own / graph.n_weights] * 5
    assert all(t["method_metrics"]["lora_rank"] == 4 for t in r["per_task"])


def test_old_tasks_byte_identical_after_learning_more(lora):
    rt = Runtime(lora["bundle"])
    assert _logit_bytes(rt, lora["stream"], 3) == lora["before"]
    assert (lora["bundle"] / rt.bundle.backbone_file()).read_bytes() == lora["backbone"]
    # every version holds the same backbone file: the backbone is frozen after task 1
    files = {Bundle.open(lora["bundle"], version=v).backbone_file() for v in range(1, 6)}
    assert files == {rt.bundle.backbone_file()}


def test_runtime_runs_the_task_as_pytorch_does(lora):
    rt, run = Runtime(lora["bundle"]), lora["run"]
    for j, t in enumerate(lora["stream"].tasks):
        x = t.x_test.reshape(-1, *rt.input_shape)
        np.testing.assert_allclose(rt.logits(x, t.name), run.method.logits(x, j).numpy(), atol=1e-5, rtol=0)


def test_bad_hyperparameters_are_refused():
    from edgecl.models import architectures

    graph = architectures.build("mlp", (1, 8, 8))
    with pytest.raises(ValueError, match="rank must be at least 1"):
        LoRA(graph, rank=0)
    with pytest.raises(ValueError, match="last_sites must lie in 0..2"):
        LoRA(graph, last_sites=3)


def test_last_sites_puts_pairs_on_the_last_sites_only(tmp_path):
    run = train("split-digits", "lora", tmp_path / "run", n_tasks=1,
                hparams={"epochs": 2, "pretrain_epochs": 2, "last_sites": 1}, log=_quiet)
    parts = run.method.export_task(0)
    assert sorted(parts) == ["head.bias", "head.weight", "lora.fc2.a", "lora.fc2.b", "lora.scale"]


def test_layers_before_the_chosen_sites_run_once_per_input_not_per_epoch(monkeypatch, tmp_path):
    """With ``last_sites`` the frozen layers' outputs are computed once over the training
    set (a Prefix) and the steps run the layers after them: the same features as the whole
    graph, and the frozen layers' ops are called once per chunk, not once per batch."""
    import torch

    from edgecl.models import torchnet
    from edgecl.models.importer import import_model

    graph, _ = import_model("ds-cnn")
    params = torchnet.init_backbone(graph, torch.Generator().manual_seed(0))
    sites = graph.mask_sites()
    x = torch.randn(70, *graph.input_shape, generator=torch.Generator().manual_seed(1))
    pre = torchnet.frozen_prefix(graph, params, x, {sites[-1].weight}, chunk=32)
    assert pre is not None and len(pre) == 70 and 0 < len(pre.nodes) < len(graph.backbone_nodes)
    assert graph.input.name not in pre.values  # the first layers do not run again
    idx = torch.tensor([3, 69, 0, 41])
    with torch.no_grad():
        want = torchnet.features(graph, params, x[idx])
        got = torchnet.features(graph, params, pre[idx])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # training the first site leaves no frozen prefix: nothing is cached
    assert torchnet.frozen_prefix(graph, params, x, {sites[0].weight}) is None
    # LoRA on the MLP's last site: while a task's pair trains, its first layer runs once per
    # 256-input chunk of the training set (the prefix), not in each of the 2 x 9 steps
    runs = {"fc1": 0}
    real_run, real_train = torchnet._run, LoRA._train_task

    def counted(g, nodes, *a, **k):
        runs["fc1"] += any(n.name == "fc1" for n in nodes)
        return real_run(g, nodes, *a, **k)

    def train_task(self, task, gen):
        runs["fc1"] = 0
        real_train(self, task, gen)
        runs["during"] = runs["fc1"]

    monkeypatch.setattr(torchnet, "_run", counted)
    monkeypatch.setattr(LoRA, "_train_task", train_task)
    train("split-digits", "lora", tmp_path / "run", n_tasks=1,
          hparams={"epochs": 2, "pretrain_epochs": 1, "last_sites": 1}, log=_quiet)
    assert runs["during"] == math.ceil(len(split_digits(0).tasks[0].x_train) / 256)


# ------------------------------------------------------------------ merging
@pytest.fixture(scope="module")
def merged(lora):
    dst = lora["root"] / "merged"
    shutil.copytree(lora["bundle"], dst)
    before = _file_bytes(dst, NAMES)
    report = merge(dst, NAMES, _global(lora["stream"]), name="merged")
    return dst, report, before


def test_merge_reports_merged_isolated_and_routed_accuracy(merged):
    dst, r, before = merged
    b = Bundle.open(dst)
    assert b.task_names == [*NAMES, "merged"] and r["version"] == 6
    entry = b.task("merged")
    assert entry["kind"] == "merged" and entry["depends"] == NAMES and entry["classes"] == list(range(10))
    assert np.array_equal(b.task_tensors("merged")["merge.scale"], np.asarray(r["scales"], np.float32))
    # the three figures, on the same held-out samples (half of each test set)
    assert r["n_report"] + r["n_select"] == sum(len(t.y_test) for t in split_digits(0).tasks)
    assert r["isolated_acc"] >= 0.97
    assert 0.0 <= r["merged_acc"] <= 1.0 and set(r["router_acc"]) == {"entropy", "gradient", "prototype"}
    m = entry["metrics"]
    assert m["merged_acc"] == r["merged_acc"] and m["isolated_acc"] == r["isolated_acc"]
    # the sources stay byte-identical, and the routers cover the merged task too
    assert _file_bytes(dst, NAMES) == before
    assert all(v["tasks"] == b.task_names for v in b.manifest["routers"].values())


def test_the_merged_task_runs_the_task_arithmetic(merged):
    """The runtime's merged task = W + sum_i s_i (P_i - W) with the heads side by side, and
    the chosen scales are at least as good on the choosing samples as any shared one."""
    dst, r, _ = merged
    b = Bundle.open(dst)
    rt = Runtime(b)
    base, deltas = task_vectors(b, NAMES)
    assert set(base) == {"fc1.weight", "fc2.weight"}
    params = {**{p: b.backbone[p] for p in b.graph.params}, **merged_params(base, deltas, r["scales"])}
    active = rt.activate("merged")
    for p in base:
        assert active.params[p].tobytes() == params[p].tobytes()
    hw = active.head[0]
    for name in NAMES:  # row of class c = the source's row for c
        src = b.task_tensors(name)["head.weight"]
        for j, c in enumerate(b.task(name)["classes"]):
            assert np.array_equal(hw[c], src[j])
    x = split_digits(0).tasks[0].x_test.reshape(-1, 64)
    assert rt.logits(x, "merged").shape == (len(x), 10)


def test_eval_measures_the_stream_and_the_merged_task_apart(merged):
    """`evaluate` after a merge: the accuracy matrix over the learned tasks (the merged one
    is no step of the stream), the merged task on its sources' test sets together."""
    dst, r, _ = merged
    res = evaluate(dst, _test_data(split_digits(0)))
    assert res["tasks"] == NAMES and res["bwt"] == 0.0 and res["acc"] >= 0.97
    (m,) = res["merged"]
    assert m["name"] == "merged" and m["sources"] == NAMES
    assert m["samples"] == sum(len(t.y_test) for t in split_digits(0).tasks)
    # the same predictions as the merge's own report, on all test samples instead of half
    x = np.concatenate([t.x_test.reshape(-1, 64) for t in split_digits(0).tasks])
    y = np.concatenate([np.asarray(t.classes)[t.y_test] for t in split_digits(0).tasks])
    assert m["acc"] == float((Runtime(dst).logits(x, "merged").argmax(axis=1) == y).mean())


def test_merge_refuses_bad_requests(merged, lora):
    dst, _, _ = merged
    data = _global(lora["stream"])
    with pytest.raises(MergeError, match="already in the bundle"):
        merge(dst, NAMES, data, name="merged")
    with pytest.raises(MergeError, match="at least 2 tasks"):
        merge(dst, NAMES[:1], data, name="m1")
    with pytest.raises(MergeError, match="no task 'nope'"):
        merge(dst, [NAMES[0], "nope"], data, name="m1")
    with pytest.raises(MergeError, match=r"no samples for task\(s\) \['digits-2-3'\]"):
        merge(dst, NAMES[:2], data[:1], name="m1")
    wrong = [(data[0][0], data[0][1], data[0][2] + 4), data[1]]
    with pytest.raises(MergeError, match=r"labels \[4, 5\], not among its classes \[0, 1\]"):
        merge(dst, NAMES[:2], wrong, name="m1")
    with pytest.raises(MergeError, match=r"x of shape \(90, 1, 4, 8\).*do not fit the model's input \(64,\)"):
        merge(dst, NAMES[:2], [(data[0][0], data[0][1][:, :, :4], data[0][2]), data[1]], name="m1")
    assert Bundle.open(dst).task_names == [*NAMES, "merged"]  # nothing committed


def test_merge_cli_with_npz_data_and_shared_scale(lora, tmp_path):
    from edgecl.tools.cli import main

    dst = tmp_path / "b"
    shutil.copytree(lora["bundle"], dst)
    data = _global(lora["stream"], NAMES[:3])
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.concatenate([d[1] for d in data]), y=np.concatenate([d[2] for d in data]))
    rc = main(["merge", str(dst), "--tasks", ",".join(NAMES[:3]), "--data", str(npz), "--name", "m3",
               "--search", "shared", "--json", str(tmp_path / "r.json"), "--threads", "1"])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert len(set(r["scales"])) == 1 and r["tasks"] == NAMES[:3]
    assert Bundle.open(dst).task("m3")["classes"] == list(range(6))
    # a label of no source task is refused, naming it
    np.savez(npz, x=data[0][1], y=np.full(len(data[0][1]), 9))
    assert main(["merge", str(dst), "--tasks", ",".join(NAMES[:2]), "--data", str(npz), "--name", "m2",
                 "--threads", "1"]) == 2


# ------------------------------------------------------------------ on the device
def test_lora_plan_counts_the_pairs_not_the_weights():
    from edgecl.models import architectures

    graph = architectures.build("mlp", (1, 8, 8))
    kw = dict(graph=graph, n_tasks=4, n_classes=2, n_samples=300, batch_size=32)
    lo, sup = planner.plan(mode="lora", **kw), planner.plan(mode="supsup", **kw)
    k = 4 * ((64 + 256) + (256 + 256))  # r * (fan_in + units) per site
    assert lo.trainable == 4 * k and lo.optimizer == 8 * k + k // 8 + 4
    assert lo.gradients == 4 * k + 8 * graph.n_weights
    assert lo.optimizer < sup.optimizer / 10


def test_lora_step_gradients_match_torch():
    """The pair's gradients from dL/dW_eff (what the learner's backward gives) equal torch
    autograd through W + scale * B @ A (on a Conv site: the unit-axis matrix view)."""
    torch = pytest.importorskip("torch")
    from edgecl.models import architectures
    from edgecl.runtime.learn.trainer import Problem

    graph = architectures.build("cnn", (1, 8, 8))
    rng = np.random.default_rng(0)
    backbone = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in graph.params.items()}
    m = LEARN_METHODS["lora"]
    x, y = rng.random((4, 1, 8, 8), dtype=np.float32), np.array([0, 1, 0, 1])
    p = Problem(graph, backbone, {}, x, y, 2, m, dict(m.defaults), 4, 0)
    s = p.initial()
    n = p.trainable[0]
    site = p.site[n]
    s.arrays[f"lora.{n}.b"][:] = rng.standard_normal(s.arrays[f"lora.{n}.b"].shape)
    w_eff = m.step_weight(p, s, n)
    g = rng.standard_normal(w_eff.shape).astype(np.float32)
    a = torch.tensor(s.arrays[f"lora.{n}.a"], requires_grad=True)
    b = torch.tensor(s.arrays[f"lora.{n}.b"], requires_grad=True)
    scale = float(m.defaults["alpha"]) / m.defaults["rank"]
    w = torch.tensor(backbone[site.weight]).reshape(site.units, -1) + scale * (b @ a)
    np.testing.assert_allclose(w.detach().numpy().reshape(w_eff.shape), w_eff, rtol=1e-5, atol=1e-5)
    (w.reshape(w_eff.shape) * torch.tensor(g)).sum().backward()
    old = {k: s.arrays[k].copy() for k in (f"lora.{n}.a", f"lora.{n}.b")}
    seen = {}
    import edgecl.runtime.learn.methods as M

    real = M.adam
    M.adam = lambda arrays, key, grad, bits, lr, t: seen.setdefault(key, grad.copy())
    try:
        m.update_site(p, s, n, g, 1e-2, 1)
    finally:
        M.adam = real
    np.testing.assert_allclose(seen[f"lora.{n}.a"], a.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(seen[f"lora.{n}.b"], b.grad.numpy(), rtol=1e-4, atol=1e-4)
    assert all(np.array_equal(s.arrays[k], v) for k, v in old.items())


def test_device_learns_a_lora_task_with_torch_blocked_then_merges_again(lora, tmp_path):
    """A 4-task LoRA bundle with a merge of its tasks; ``edgecl learn --method lora`` with
    torch blocked (learning child included) commits a signed ``lora`` task, every old task
    byte-identical; then ``edgecl merge`` (numpy only) merges all five."""
    from edgecl.runtime.signing import generate_key

    stream = lora["stream"]
    bundle = _prefix_bundle(lora["bundle"], tmp_path / "b4", 4, stream)
    merge(bundle, NAMES[:4], _global(stream, NAMES[:4]), name="merged-4")
    old = [*NAMES[:4], "merged-4"]
    rt = Runtime(bundle)
    before = {n: rt.logits(stream.tasks[0].x_test.reshape(-1, 64), n).tobytes() for n in old}
    files = _file_bytes(bundle, old)
    key = tmp_path / "device.key"
    kid = generate_key(key)
    t = stream.tasks[4]
    samples = tmp_path / "s.npz"
    np.savez(samples, x=t.x_train, y=np.asarray(t.classes)[t.y_train])
    data = _global(stream)
    mix = tmp_path / "all.npz"
    np.savez(mix, x=np.concatenate([d[1] for d in data]), y=np.concatenate([d[2] for d in data]))
    code = textwrap.dedent("""
        import argparse, os, sys
        from edgecl.tools import learn_cmd, merge_cmd
        bundle, samples, mix, key, names = sys.argv[1:6]
        os.environ["EDGECL_SIGNING_KEY"] = key
        p = argparse.ArgumentParser(); learn_cmd.add_arguments(p)
        rc = learn_cmd.main(p.parse_args([bundle, "--task", "digits-8-9", "--data", samples,
                                          "--method", "lora", "--quiet"]))
        assert rc == 0
        p = argparse.ArgumentParser(); sub = p.add_subparsers(); merge_cmd.add_parser(sub)
        rc = merge_cmd.main(p.parse_args(["merge", bundle, "--tasks", names, "--data", mix,
                                          "--name", "merged-5"]))
        assert "torch" not in sys.modules
        sys.exit(rc)
    """)
    r = run_on_device(tmp_path, code, bundle, samples, mix, key, ",".join(NAMES), blocked=("torch",))
    assert r.returncode == 0, r.stderr + r.stdout
    assert "byte-identical" in r.stdout and "merged (no task id" in r.stdout
    b = Bundle.open(bundle)
    assert b.task_names == [*old, "digits-8-9", "merged-5"]
    new = b.task("digits-8-9")
    assert new["kind"] == "lora" and new["method"] == "lora" and new["metrics"]["learned_on"] == "device"
    assert new["origin"]["key"] == kid and b.manifest["signature"]["key"] == kid
    assert sorted(k for k in b.task_tensors("digits-8-9") if k.startswith("lora.")) == [
        "lora.fc1.a", "lora.fc1.b", "lora.fc2.a", "lora.fc2.b", "lora.scale"]
    assert new["metrics"]["device_acc"] >= 0.9
    rt2 = Runtime(b)
    assert {n: rt2.logits(stream.tasks[0].x_test.reshape(-1, 64), n).tobytes() for n in old} == before
    assert _file_bytes(bundle, old) == files
    acc = float((rt2.logits(t.x_test.reshape(-1, 64), "digits-8-9").argmax(1) == t.y_test).mean())
    assert acc >= 0.95
    assert b.task("merged-5")["depends"] == NAMES and b.task("merged-5")["classes"] == list(range(10))


# ------------------------------------------------------------------ adapters
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """Bottleneck adapters on the default MLP: 3 tasks bundled, then continued to 5."""
    root = tmp_path_factory.mktemp("adapter")
    run_dir, bundle = root / "run", root / "bundle"
    stream = split_digits(0)
    train("split-digits", "adapter", run_dir, n_tasks=3, log=_quiet)
    bundle_run(run_dir, bundle, routers=False)
    before = _logit_bytes(Runtime(bundle), stream, 3)
    files = _file_bytes(bundle, NAMES[:3])
    run = train("split-digits", "adapter", run_dir, log=_quiet)
    bundle_run(run_dir, bundle, routers=False)
    return {"run": run, "bundle": bundle, "stream": stream, "before": before, "files": files}


def test_adapter_tasks_own_a_graph_accuracy_and_zero_forgetting(adapter):
    assert METHODS["adapter"] is Adapter and Adapter.kind == "modules"
    bundle, stream = adapter["bundle"], adapter["stream"]
    r = evaluate(bundle, _test_data(stream))
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0
    rt = Runtime(bundle)
    assert _logit_bytes(rt, stream, 3) == adapter["before"]
    assert _file_bytes(bundle, NAMES[:3]) == adapter["files"]
    b = rt.bundle
    for k, name in enumerate(NAMES):
        entry = b.task(name)
        assert entry["kind"] == "modules" and entry["graph"] == f"adapter-{k + 1}"
        # the file holds the task's own adapters only: 2 sites x (16x256 + 16 + 256x16 + 256)
        params = {t: v for t, v in b.task_tensors(name).items() if t.startswith("param.")}
        assert sorted(params) == sorted(f"param.a{k + 1}.{n}.{p}.{r}" for n in ("fc1", "fc2")
                                        for p in ("down", "up") for r in ("weight", "bias"))
        assert entry["storage"]["mask_bytes"] == 4 * 2 * (16 * 256 + 16 + 256 * 16 + 256)
    for j, t in enumerate(stream.tasks):
        x = t.x_test.reshape(-1, *rt.input_shape)
        np.testing.assert_allclose(rt.logits(x, t.name), adapter["run"].method.logits(x, j).numpy(),
                                   atol=1e-5, rtol=0)


def test_adapter_tasks_cannot_be_merged_by_task_arithmetic(adapter, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(adapter["bundle"], dst)
    with pytest.raises(MergeError, match=r"'digits-0-1' \(kind 'modules'\) does not run on the main graph"):
        merge(dst, NAMES[:2], _global(adapter["stream"], NAMES[:2]), name="m")


def test_adapter_on_conv_sites_uses_1x1_convs():
    from edgecl.models import architectures
    from edgecl.runtime.graph import Graph

    graph = architectures.build("cnn", (1, 8, 8))
    g = Adapter(graph, bottleneck=4).graph_of(0)
    assert Graph.from_dict(g.to_dict()).to_dict() == g.to_dict()
    convs = [s for s in graph.mask_sites() if s.op == "Conv"]
    assert convs
    for s in convs:
        down = g.params[f"a1.{s.node}.down.weight"]
        assert down.shape == (4, s.units, 1, 1)
    assert [s.weight for s in g.mask_sites()] == [s.weight for s in graph.mask_sites()]


# ------------------------------------------------------------------ MiniLM on real text
# A task stream of real English from what every Python ships: which standard-library
# module a docstring sentence comes from, 5 tasks of 2 modules (read with ``ast``, never
# imported), tokenized with all-MiniLM-L6-v2's own WordPiece vocabulary (its tokenizer.json).
TEXT_PAIRS = [("turtle", "email"), ("unittest", "tarfile"), ("asyncio", "_pydecimal"), ("logging", "inspect"),
              ("http", "xml")]


def docstring_sentences(module: str) -> list[str]:
    """Sentences (5+ words, first occurrence) of every docstring in a stdlib module or package."""
    import ast
    import re
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((root / module).rglob("*.py")) if (root / module).is_dir() else [root / f"{module}.py"]
    out, seen = [], set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8", errors="replace"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", ast.get_docstring(node) or ""):
                    s = " ".join(s.split())
                    if len(s.split()) >= 5 and s not in seen:
                        seen.add(s)
                        out.append(s)
    return out


class WordPiece:
    """BERT uncased WordPiece from a tokenizer.json: lowercase, accents stripped, split on
    whitespace and punctuation, greedy longest-match pieces (``##`` continuations);
    ``[CLS] ids [SEP]`` then pads (id 0) to ``seq_len``."""

    def __init__(self, tokenizer_json: dict) -> None:
        self.vocab = tokenizer_json["model"]["vocab"]
        self.unk, self.cls, self.sep = self.vocab["[UNK]"], self.vocab["[CLS]"], self.vocab["[SEP]"]

    @staticmethod
    def _is_punct(c: str) -> bool:
        import unicodedata

        o = ord(c)
        return unicodedata.category(c).startswith("P") or 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 \
            or 123 <= o <= 126

    def _words(self, text: str) -> list[str]:
        import unicodedata

        text = "".join(c for c in unicodedata.normalize("NFD", text.lower())
                       if unicodedata.category(c) != "Mn")
        out = []
        for w in text.split():
            cur = ""
            for c in w:
                if self._is_punct(c):
                    out += [cur, c] if cur else [c]
                    cur = ""
                else:
                    cur += c
            if cur:
                out.append(cur)
        return out

    def _pieces(self, word: str) -> list[int]:
        ids, start = [], 0
        def piece(end: int) -> str:
            return word[start:end] if start == 0 else "##" + word[start:end]

        while start < len(word) and len(word) <= 100:
            end = len(word)
            while end > start and piece(end) not in self.vocab:
                end -= 1
            if end == start:
                return [self.unk]
            ids.append(self.vocab[piece(end)])
            start = end
        return ids if len(word) <= 100 else [self.unk]

    def ids(self, text: str) -> list[int]:
        return [self.cls, *(i for w in self._words(text) for i in self._pieces(w)), self.sep]

    def encode(self, text: str, seq_len: int) -> np.ndarray:
        ids = self.ids(text)
        ids = ids[: seq_len - 1] + [self.sep] if len(ids) > seq_len else ids
        out = np.zeros(seq_len, dtype=np.int64)
        out[: len(ids)] = ids
        return out


def _minilm_tokenizer() -> dict:
    import zipfile

    from edgecl.models.zoo.minilm import minilm_zip_path

    try:
        path = minilm_zip_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("tokenizer.json"))


def text_tasks(seq_len: int = 32, per_class: int = 100, seed: int = 0, test_fraction: float = 0.25):
    from edgecl.models.data import Task

    tok = WordPiece(_minilm_tokenizer())
    rng = np.random.default_rng(seed)
    tasks = []
    for t, pair in enumerate(TEXT_PAIRS):
        xs, ys = [], []
        for c, module in enumerate(pair):
            s = docstring_sentences(module)
            xs += [tok.encode(s[i], seq_len) for i in rng.permutation(len(s))[:per_class]]
            ys += [c] * min(per_class, len(s))
        order = rng.permutation(len(ys))
        x, y = np.stack(xs)[order], np.array(ys, dtype=np.int64)[order]
        n_te = int(round(len(y) * test_fraction))
        tasks.append(Task(f"{pair[0].strip('_')}-vs-{pair[1].strip('_')}", [2 * t, 2 * t + 1],
                          x[n_te:], y[n_te:], x[:n_te], y[:n_te]))
    return tasks


def test_wordpiece_matches_the_reference_tokenizer():
    """The test's WordPiece gives the ids of the ``tokenizers`` package on the stream's text."""
    tokenizers = pytest.importorskip("tokenizers")
    spec = _minilm_tokenizer()
    ref = tokenizers.Tokenizer.from_str(json.dumps(spec))
    ref.no_padding()
    ref.no_truncation()
    tok = WordPiece(spec)
    sents = docstring_sentences("turtle")[:300] + docstring_sentences("email")[:300]
    assert len(sents) == 600
    assert [tok.ids(s) for s in sents] == [ref.encode(s).ids for s in sents]


@pytest.mark.slow
def test_minilm_text_stream_lora_zero_bwt_and_merge(tmp_path):
    """all-MiniLM-L6-v2 (given, frozen) + a LoRA pair on each Linear weight of its last two
    layers (12 of 36: backward stops there, and the first four run once per input) per
    task, on the docstring stream: Task-IL accuracy, BWT exactly 0.0 through the runtime,
    and the merged model's accuracy next to the isolated tasks'."""
    from edgecl.models.importer import import_model
    from edgecl.models.training import Run, new_method, save_run

    tasks = text_tasks(seq_len=16)  # 16 tokens: half the cost of 32, ACC 0.924 against 0.928
    graph, weights = import_model("minilm", zoo_kwargs={"seq_len": 16})
    config = {"method": "lora", "arch": "minilm", "hidden": None, "input_shape": list(graph.input_shape),
              "graph": graph.to_dict(), "seed": 0, "hparams": {"epochs": 5, "lr": 2e-3, "last_sites": 12},
              "stream": {"data": "stdlib-docstrings"}}
    # built here, not by `train`: models.data turns an int64 model's .npz input into pixel tokens
    run = Run(tmp_path / "run", config, new_method(config, weights), [])
    for i, task in enumerate(tasks):
        run.method.learn(task)
        run.acc_matrix.append([run.method.accuracy(t.x_test, t.y_test, j)
                               for j, t in enumerate(tasks[: i + 1])])
        save_run(run)
    bundle = tmp_path / "bundle"
    bundle_run(run.path, bundle, routers=False)
    r = evaluate(bundle, [(t.name, t.x_test, t.y_test) for t in tasks])
    print("minilm acc matrix", r["acc_matrix"], "bits/weight", r["per_task"][0]["mask_bits_per_weight"])
    assert r["bwt"] == 0.0
    assert r["acc"] >= 0.85, r["acc_matrix"]
    data = [(t.name, t.x_test, np.asarray(t.classes)[t.y_test]) for t in tasks]
    m = merge(bundle, [t.name for t in tasks], data, search="shared", grid=(0.2, 0.6, 1.0))
    print("minilm merge", {k: m[k] for k in ("scales", "merged_acc", "isolated_acc", "merged_acc_per_task")})
    assert Bundle.open(bundle).task("merged")["depends"] == [t.name for t in tasks]
    assert m["isolated_acc"] >= 0.85 and 0.0 <= m["merged_acc"] <= 1.0


# ------------------------------------------------------------------ DS-CNN (zoo)
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_ds_cnn_zero_forgetting(method, tmp_path, monkeypatch):
    from . import test_zoo_methods as zoo

    monkeypatch.setitem(zoo.QUICK, method, {"epochs": 1, "batch_size": 32})
    zoo.check_zero_forgetting("ds-cnn", method, tmp_path)


@pytest.mark.slow
def test_ds_cnn_split_digits_accuracy_and_merge(tmp_path):
    """The full Split-Digits stream on DS-CNN (random init, trained densely on task 1)."""
    from edgecl.models.data import load_spec
    from edgecl.models.importer import import_model
    from edgecl.models.training import load_run

    graph, _ = import_model("ds-cnn")
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train("split-digits", "lora", run_dir, graph=graph, log=_quiet)
    bundle_run(run_dir, bundle)
    stream = load_spec(load_run(run_dir).config["stream"])
    r = evaluate(bundle, _test_data(stream))
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0
    m = merge(bundle, NAMES, _global(stream), search="shared", grid=(0.2, 0.6, 1.0))  # 3 forward passes
    print("ds-cnn merge", {k: m[k] for k in ("scales", "merged_acc", "isolated_acc", "router_acc")})
    assert m["isolated_acc"] >= 0.97 and m["router_acc"]["prototype"]["class_il_acc"] >= 0.9


@pytest.mark.slow
def test_ds_cnn_adapter_split_digits_accuracy(tmp_path):
    """Adapters after every site of DS-CNN (1x1 Convs on its Conv sites), backbone trained
    with the first task."""
    from edgecl.models.data import load_spec
    from edgecl.models.importer import import_model
    from edgecl.models.training import load_run

    graph, _ = import_model("ds-cnn")
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train("split-digits", "adapter", run_dir, graph=graph, log=_quiet)
    bundle_run(run_dir, bundle, routers=False)
    r = evaluate(bundle, _test_data(load_spec(load_run(run_dir).config["stream"])))
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0
