"""Expert routing: experts and gate rows added per task on a frozen trunk, top-k gating
(KeepTopK + Softmax) in a static graph of the task's own (``modules`` kind); accuracy and
exact zero forgetting through the bundle and the numpy runtime, old routing unchanged,
active fraction and FLOPs."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.compiler.from_run import bundle_run
from edgecl.models.data import split_digits
from edgecl.models.methods import METHODS
from edgecl.models.methods.experts import Experts, expert_graph, site_macs
from edgecl.models.training import load_run, train
from edgecl.runtime import Runtime
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.evaluate import evaluate

from .conftest import _quiet


@pytest.fixture(scope="module")
def experts_run(tmp_path_factory):
    """The default MLP, seed 0: two tasks first (snapshot), then all five, bundled
    (routers off, as for PNN: see docs/method-experts.md)."""
    root = tmp_path_factory.mktemp("experts")
    train("split-digits", "experts", root / "run", seed=0, n_tasks=2, log=_quiet)
    early = load_run(root / "run").method
    x = [t.x_test.reshape(len(t.x_test), -1) for t in split_digits(0).tasks]
    snapshot = {"state": {k: v.clone() for k, v in early.state_dict().items()},
                "routing": [early.routing(x[t], t) for t in range(2)]}
    train("split-digits", "experts", root / "run", seed=0, log=_quiet)
    bundle_run(root / "run", root / "bundle", routers=False)
    return root / "run", root / "bundle", snapshot


def _x(task) -> np.ndarray:
    return task.x_test.reshape(len(task.x_test), -1)


def test_registered_and_checks_its_hyperparameters(experts_run):
    assert METHODS["experts"] is Experts and Experts.kind == "modules"
    g = load_run(experts_run[0]).graph
    for bad in ({"experts": 0}, {"top_k": 1.5}, {"trunk": 2}, {"width": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Experts(g, **bad)


def test_split_digits_accuracy_and_zero_bwt_through_runtime(experts_run):
    r = evaluate(experts_run[1], [(t.name, t.x_test, t.y_test) for t in split_digits(0).tasks])
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0
    for i, row in enumerate(r["acc_matrix"]):
        for j in range(i):
            assert row[j] == r["acc_matrix"][j][j]


def test_old_experts_gates_and_routing_are_byte_identical(experts_run):
    run_dir, bundle_dir, snap = experts_run
    m = load_run(run_dir).method
    state = m.state_dict()
    for k, v in snap["state"].items():
        if not k.startswith("experts-metrics."):
            assert state[k].numpy().tobytes() == v.numpy().tobytes(), k
    tasks = split_digits(0).tasks
    for t in range(2):  # the gate of an old task sends each input to the same experts, same weights
        assert m.routing(_x(tasks[t]), t).tobytes() == snap["routing"][t].tobytes()
    last, final = Bundle.open(bundle_dir), Runtime(bundle_dir)
    for j, name in enumerate(last.task_names):
        first = Bundle.open(bundle_dir, version=j + 1)
        assert first.task(name)["file"] == last.task(name)["file"]
        x = _x(tasks[j])
        assert Runtime(first).logits(x, name).tobytes() == final.logits(x, name).tobytes()


def test_runtime_matches_pytorch(experts_run):
    run, rt = load_run(experts_run[0]), Runtime(experts_run[1])
    for t, task in enumerate(split_digits(0).tasks):
        want = run.method.logits(_x(task), t).numpy()
        np.testing.assert_allclose(rt.logits(_x(task), task.name), want, atol=1e-5, rtol=0)


def test_top_k_routing_active_fraction_and_flops(experts_run):
    m = load_run(experts_run[0]).method
    b = Bundle.open(experts_run[1])
    tasks = split_digits(0).tasks
    for t in range(5):
        gates = m.routing(_x(tasks[t]), t)
        n = 2 * (t + 1)
        assert gates.shape == (len(gates), n)
        assert ((gates > 0).sum(axis=1) == 2).all()  # top-2 of n, the rest exactly 0
        np.testing.assert_allclose(gates.sum(axis=1), 1.0, rtol=1e-6)
        mt = b.task(t)["metrics"]
        g = m.graph_of(t)
        size = [sum(int(np.prod(g.params[p].shape)) for p in m.expert_params(i)) for i in range(n)]
        assert len(set(size)) == 1  # every expert the same size here
        want = (g.n_params - (n - 2) * size[0]) / g.n_params
        assert mt["active_fraction"] == pytest.approx(want, abs=1e-6)
        macs = site_macs(g)
        e_macs = sum(macs[p] for p in m.expert_params(0) if p in macs) + m.hidden
        in_experts = {p for i in range(n) for p in m.expert_params(i)}
        base = sum(v for p, v in macs.items() if p not in in_experts)  # trunk and gate
        assert mt["flops_static"] == 2 * (base + n * e_macs)
        assert mt["flops_sparse"] == 2 * (base + 2 * e_macs)
        stored = b.task_tensors(t)
        assert mt["stored_params"] == sum(v.size for k, v in stored.items() if k.startswith("param."))
    # the new experts of a later task are used by its inputs (not all sent to frozen old ones)
    gates = m.routing(_x(tasks[4]), 4)
    assert (gates[:, 8:] > 0).any(axis=1).mean() > 0.5


def test_graph_holds_only_the_experts_of_its_time(experts_run):
    m = load_run(experts_run[0]).method
    b = Bundle.open(experts_run[1])
    for t in range(5):
        name, g = m.task_graph(t)
        assert b.task(t)["graph"] == name and b.task_graph(t) == g
        cols = {p.split(".")[0] for p in g.params if p.startswith("c")}
        assert cols == {f"c{i + 2}" for i in range(2 * (t + 1))}  # expert i is column i + 2
        assert {p for p in g.params if p.startswith("moe.gate")} == \
            {f"moe.gate{j}.{w}" for j in range(1, t + 2) for w in ("weight", "bias")}
        assert next(n for n in g.nodes if n.op == "KeepTopK").attrs["k"] == 2


def test_mlp_experts_graph_runs_alike_in_numpy_and_torch():
    import torch

    from edgecl.models import architectures
    from edgecl.models.torchnet import features, init_backbone
    from edgecl.runtime import executor

    main = architectures.build("mlp", (1, 8, 8), hidden=[16])
    m = Experts(main, width=0, hidden=8, experts=3, top_k=2)
    g = m.graph_of(1)
    assert {p for p in g.params if p.startswith("moe.e")} == \
        {f"moe.e{i}.{w}" for i in range(6) for w in ("weight", "bias")}
    assert g.feature_dim == 8
    params = init_backbone(g, torch.Generator().manual_seed(0))
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    want = features(g, params, torch.from_numpy(x)).numpy()
    got = executor.features(g, {k: v.numpy() for k, v in params.items()}, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    one = expert_graph(main, [1], 8, 4)  # k above the experts there are: all of them
    assert next(n for n in one.nodes if n.op == "KeepTopK").attrs["k"] == 1
    assert one.feature_dim == 8 and "moe.logits" not in one.shapes()


def test_compiled_backends_refuse_an_experts_task_by_name(experts_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import shutil

    from edgecl.compiler.onnx_export import export_bundle
    from edgecl.runtime.backends import BackendUnavailable, open_backend

    dst = tmp_path / "b"
    shutil.copytree(experts_run[1], dst)
    export_bundle(dst)
    be = open_backend(dst, "onnxruntime")
    with pytest.raises(BackendUnavailable, match=r"task 'digits-0-1' runs on graph 'experts-1'.*numpy"):
        be.logits(_x(split_digits(0).tasks[0]), 0)


@pytest.mark.slow
def test_ds_cnn_split_digits_accuracy(tmp_path):
    """DS-CNN (zoo), Split-Digits fitted to its input, default hyperparameters (experts
    are width-0.25 copies of the DS-CNN): Task-IL ACC >= 0.97 and BWT 0.0 through the
    bundle."""
    from edgecl.models.data import load_spec
    from edgecl.models.importer import import_model

    graph, _ = import_model("ds-cnn")
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    train("split-digits", "experts", run_dir, graph=graph, log=_quiet)
    bundle_run(run_dir, bundle, routers=False)
    stream = load_spec(load_run(run_dir).config["stream"])
    r = evaluate(bundle, [(t.name, t.x_test, t.y_test) for t in stream.tasks])
    assert r["acc"] >= 0.97, r["acc_matrix"]
    assert r["bwt"] == 0.0


def test_grown_graph_exports_to_onnx_and_matches_the_numpy_runtime(experts_run):
    """No backend serves a graph of a task's own yet, but every op of it emits ONNX
    (KeepTopK included): the last task's graph, run by ONNX Runtime with its weights."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from edgecl.compiler.onnx_export import build_model

    rt = Runtime(experts_run[1])
    a = rt.activate(4)
    m = build_model(a.graph, 2)
    arrays = {**a.params, "head.weight": a.head[0], "head.bias": a.head[1]}
    # the export's external weights embedded; its constants (KeepTopK's k, -inf) kept
    inits = [numpy_helper.from_array(np.ascontiguousarray(arrays[i.name]), i.name) if i.name in arrays else i
             for i in m.graph.initializer]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _x(split_digits(0).tasks[4]).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], rt.logits(x, 4), atol=1e-5, rtol=0)
