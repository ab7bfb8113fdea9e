"""The compiled TVM training step: loss and gradients match PyTorch autograd to 1e-4.

The step is built from the model graph (every op through the registry's ``tvm``
emission) and differentiates the masked model with respect to its effective weights
W_eff = W ⊙ M (biases and head included); see compiler/tvm_train.py. The reference runs
the same graph through the registry's ``torch`` forms. TVM is part of the test setup
(the ``tvm`` extra): these tests fail, not skip, without it.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch

from edgecl.compiler import tvm_build, tvm_train
from edgecl.compiler.tvm_build import compile_bundle
from edgecl.runtime.backends.tvm_train import load_train_step, packnet_update, score_grad
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.ops import get_op
from edgecl.runtime.session import Runtime

from .device_process import run_on_device
from .test_tvm_graph import SMALL, random_head, random_params


@pytest.fixture(scope="module")
def compiled(trained, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("train")
    os.environ.setdefault("EDGECL_CACHE", str(root / "cache"))
    for arch, method in (("mlp", "supsup"), ("cnn", "hat")):
        dst = root / arch
        shutil.copytree(trained(method, arch)[1], dst)
        compile_bundle(dst, "host", log=lambda _m: None)
        out[arch] = dst
    return out


def torch_reference(graph, params, head, x, labels, wanted):
    """Mean softmax cross-entropy, logits, and the gradients w.r.t. the parameters in
    ``wanted`` and the head: the graph run through each op's ``torch`` form."""
    import torch.nn.functional as F

    leaves = {n: torch.tensor(np.asarray(a, np.float32), requires_grad=n in wanted)
              for n, a in params.items()}
    env = {graph.input.name: torch.from_numpy(np.ascontiguousarray(x)), **leaves}
    for node in graph.backbone_nodes:
        env.update(zip(node.outputs, get_op(node.op).torch([env[i] for i in node.inputs], node.attrs),
                       strict=True))
    hw, hb = (torch.tensor(np.asarray(h, np.float32), requires_grad=True) for h in head)
    logits = F.linear(env[graph.features], hw, hb)
    loss = F.cross_entropy(logits, torch.from_numpy(labels.astype(np.int64)))
    loss.backward()
    grads = {n: t.grad.numpy() for n, t in leaves.items() if n in wanted}
    grads.update({"head.weight": hw.grad.numpy(), "head.bias": hb.grad.numpy()})
    return loss.item(), grads, logits.detach().numpy()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_loss_and_gradients_match_torch_on_every_task(compiled, arch):
    bundle = Bundle.open(compiled[arch])
    graph = bundle.graph
    entry = bundle.manifest["targets"]["host"]["train_step"]
    assert entry["file"] in bundle.manifest["files"] and entry["batch"] == 32
    assert entry["inputs"] == ["x", "y", *tvm_build.backbone_params(graph), "head.weight", "head.bias"]
    assert entry["gradients"] == [*tvm_train.grad_params(graph), "head.weight", "head.bias"]
    step = load_train_step(bundle, "host")
    rt = Runtime(bundle)
    rng = np.random.default_rng(0)
    worst = {"loss": 0.0, "grad": 0.0}
    for task in bundle.task_names:
        a = rt.activate(task)
        classes = len(a.info["classes"])
        for n in (5, 32, 45):  # padded, exact, and two chunks
            x = rng.random((n, *graph.input_shape), dtype=np.float32)
            labels = rng.integers(0, classes, n)
            loss, grads, logits = step(x, labels, a.params, a.head, return_logits=True)
            want_loss, want, want_logits = torch_reference(graph, a.params, a.head, x, labels,
                                                           set(step.gradients))
            assert set(grads) == set(want) == set(step.gradients)
            assert abs(loss - want_loss) <= 1e-4, (task, n, loss, want_loss)
            np.testing.assert_allclose(logits, want_logits, atol=1e-4)
            for k in want:
                assert grads[k].shape == want[k].shape, k
                np.testing.assert_allclose(grads[k], want[k], rtol=0, atol=1e-4, err_msg=f"{task} n={n} {k}")
                worst["grad"] = max(worst["grad"], float(np.abs(grads[k] - want[k]).max()))
            worst["loss"] = max(worst["loss"], abs(loss - want_loss))
    print(f"{arch}: max |loss diff| {worst['loss']:.2e}, max |grad diff| {worst['grad']:.2e}")


def numpy_reference(graph, params, head, x, labels, wanted):
    """The same through the numpy executor's forward and the registry's backward (the
    device learner's reference), in float64 where it can."""
    from edgecl.runtime import executor

    tape = executor.Tape([])
    feat = executor.features(graph, params, x, tape=tape)
    hw, hb = head
    logits = (feat @ hw.T + hb).astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n = len(x)
    loss = float(-np.log(p[np.arange(n), labels]).mean())
    g = p.copy()
    g[np.arange(n), labels] -= 1
    g = (g / n).astype(np.float32)
    grads = executor.backward(graph, params, tape, g @ hw, set(wanted))
    grads.update({"head.weight": g.T @ feat, "head.bias": g.sum(axis=0)})
    return loss, grads


@pytest.mark.parametrize("name", list(SMALL))
def test_small_graphs_train_step_matches_torch(name):
    """Depthwise/grouped/dilated convs with asymmetric pads, BatchNormalization, ReLU6,
    HardSwish, residuals, Concat, MaxPool, GAP; attention, LayerNormalization, Gelu,
    ReduceMean; padded and ceil-mode pooling: every gradient matches the registry's
    numpy backward (the device learner's reference)."""
    import tvm
    from tvm import relax

    graph = SMALL[name]()
    batch, rows = 4, 8
    mod, target = tvm_train.lower_and_schedule(graph, "host", rows, batch=batch)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    params, head = random_params(graph), random_head(graph)
    x = np.random.default_rng(0).standard_normal((batch, *graph.input_shape)).astype(np.float32)
    labels = np.array([0, 1, 2, 1])
    y = np.zeros((batch, rows), np.float32)
    y[np.arange(batch), labels] = 1 / batch
    hw = np.zeros((rows, graph.feature_dim), np.float32)
    hb = np.full(rows, tvm_train.PAD_LOGIT, np.float32)
    hw[:3], hb[:3] = head
    args = [x, y, *(params[n] for n in tvm_build.backbone_params(graph)), hw, hb]
    (loss, _), grads = vm[tvm_train.FUNCTION](*(tvm.runtime.tensor(a) for a in args))
    names = [*tvm_train.grad_params(graph), "head.weight", "head.bias"]
    want_loss, want = numpy_reference(graph, params, head, x, labels, set(names[:-2]))
    assert abs(float(loss.numpy()) - want_loss) <= 1e-5
    for name, g in zip(names, grads, strict=True):
        g = g.numpy()[:3] if name.startswith("head.") else g.numpy()
        np.testing.assert_allclose(g, want[name], rtol=0, atol=1e-5, err_msg=f"{graph.name} {name}")


def test_one_hot_labels_equal_int_labels_and_a_step_descends(compiled):
    bundle = Bundle.open(compiled["mlp"])
    step = load_train_step(bundle)  # this machine's target
    a = Runtime(bundle).activate(1)
    rng = np.random.default_rng(1)
    x = rng.random((16, *bundle.graph.input_shape), dtype=np.float32)
    labels = rng.integers(0, 2, 16)
    loss, grads = step(x, labels, a.params, a.head)
    loss2, grads2 = step(x, np.eye(2, dtype=np.float32)[labels], a.params, a.head)
    assert loss == loss2 and all(np.array_equal(grads[k], grads2[k]) for k in grads)
    # a small gradient descent step (length 1e-2) on the effective weights and head lowers the loss
    lr = 1e-2 / np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    params = {k: w - lr * grads[k] if k in grads else w for k, w in a.params.items()}
    head = (a.head[0] - lr * grads["head.weight"], a.head[1] - lr * grads["head.bias"])
    assert step(x, labels, params, head)[0] < loss
    with pytest.raises(ValueError, match="labels"):
        step(x, labels + 5, a.params, a.head)
    with pytest.raises(KeyError, match="fc2.weight"):
        step(x, labels, {k: v for k, v in a.params.items() if k != "fc2.weight"}, a.head)
    # the gradients are the VM's output tensors (no copy): a later step must not overwrite them
    kept = {k: v.copy() for k, v in grads.items()}
    for _ in range(3):
        step(rng.random(x.shape, dtype=np.float32), 1 - labels, a.params, a.head)
    assert all(np.array_equal(grads[k], kept[k]) for k in grads)


def test_method_helpers(compiled):
    bundle = Bundle.open(compiled["mlp"])
    a = Runtime(bundle).activate(0)
    x = np.random.default_rng(2).random((4, 64), dtype=np.float32)
    _, grads = load_train_step(bundle)(x, np.array([0, 1, 1, 0]), a.params, a.head)
    free = {"fc1.weight": np.random.default_rng(3).random((256, 64)) < 0.5}
    upd = packnet_update(grads, free)
    f = free["fc1.weight"]
    assert np.all(upd["fc1.weight"][~f] == 0)
    assert np.array_equal(upd["fc1.weight"][f], grads["fc1.weight"][f])
    assert np.array_equal(packnet_update(grads, {"fc1": f})["fc1.weight"], upd["fc1.weight"])  # layer name
    s = score_grad(grads, bundle.backbone, "fc2.weight")
    np.testing.assert_array_equal(s, grads["fc2.weight"] * bundle.backbone["fc2.weight"])


def test_train_step_runs_without_tvm_compiler_or_torch(compiled, tmp_path):
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        from edgecl.runtime.backends.tvm_train import load_train_step
        from edgecl.runtime.session import Runtime
        rt = Runtime(sys.argv[1])
        a = rt.activate(2)
        x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
        loss, grads = load_train_step(rt.bundle)(x, np.arange(7) % 2, a.params, a.head)
        assert not any(m in ("torch", "tvm") or m.startswith(("tvm.", "torch.")) for m in sys.modules)
        print(json.dumps({"loss": loss, "g": float(np.abs(grads["conv1.weight"]).sum())}))
    """)
    r = run_on_device(tmp_path, code, compiled["cnn"])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    bundle = Bundle.open(compiled["cnn"])
    a = Runtime(bundle).activate(2)
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    want_loss, want, _ = torch_reference(bundle.graph, a.params, a.head, x, np.arange(7) % 2,
                                         {"conv1.weight"})
    assert abs(got["loss"] - want_loss) <= 1e-4
    assert abs(got["g"] - float(np.abs(want["conv1.weight"]).sum())) <= 1e-3 * max(1.0, got["g"])


def test_without_train_the_entry_is_null(trained, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(trained("supsup")[1], dst)
    compile_bundle(dst, "host", log=lambda _m: None, train=False)
    assert Bundle.open(dst).manifest["targets"]["host"]["train_step"] is None
    with pytest.raises(Exception, match="no TVM train step"):
        load_train_step(dst)
