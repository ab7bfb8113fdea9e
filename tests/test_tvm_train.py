"""The compiled TVM training step: loss and gradients match PyTorch autograd to 1e-4.

The step differentiates the masked model with respect to its effective weights
W_eff = W ⊙ M (biases and head included); see compiler/tvm_train.py. TVM is part of the
test setup (the ``tvm`` extra): these tests fail, not skip, without it.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch

from edgecl.compiler.tvm_build import compile_bundle
from edgecl.runtime.backends.tvm_train import load_train_step, packnet_update, score_grad
from edgecl.runtime.bundle import Bundle
from edgecl.runtime.session import Runtime

from .device_process import run_on_device


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


def torch_reference(layers, params, head, x, labels):
    """Mean softmax cross-entropy and its gradients w.r.t. W_eff, biases and head."""
    import torch.nn.functional as F

    leaves = {}

    def leaf(name, a):
        leaves[name] = torch.tensor(np.asarray(a, np.float32), requires_grad=True)
        return leaves[name]

    h = torch.from_numpy(x)
    for layer in layers:
        op = layer["op"]
        if op in ("linear", "conv2d"):
            w, b = params[layer["name"]]
            w = leaf(f"{layer['name']}.weight", w)
            b = None if b is None else leaf(f"{layer['name']}.bias", b)
            if op == "linear":
                h = F.linear(h, w, b)
            else:
                h = F.conv2d(h, w, b, stride=int(layer.get("stride", 1)),
                             padding=int(layer.get("padding", 0)))
        elif op == "relu":
            h = F.relu(h)
        elif op == "maxpool2d":
            h = F.max_pool2d(h, int(layer["kernel_size"]))
        elif op == "flatten":
            h = h.flatten(1)
    logits = F.linear(h, leaf("head.weight", head[0]), leaf("head.bias", head[1]))
    loss = F.cross_entropy(logits, torch.from_numpy(labels.astype(np.int64)))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in leaves.items()}, logits.detach().numpy()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_loss_and_gradients_match_torch_on_every_task(compiled, arch):
    bundle = Bundle.open(compiled[arch])
    entry = bundle.manifest["targets"]["host"]["train_step"]
    assert entry["file"] in bundle.manifest["files"] and entry["batch"] == 32
    step = load_train_step(bundle, "host")
    rt = Runtime(bundle)
    rng = np.random.default_rng(0)
    worst = {"loss": 0.0, "grad": 0.0}
    for task in bundle.task_names:
        a = rt.activate(task)
        classes = len(a.info["classes"])
        for n in (5, 32, 45):  # padded, exact, and two chunks
            x = rng.random((n, *bundle.model["input_shape"]), dtype=np.float32)
            labels = rng.integers(0, classes, n)
            loss, grads, logits = step(x, labels, a.params, a.head, return_logits=True)
            want_loss, want, want_logits = torch_reference(bundle.model["layers"], a.params, a.head,
                                                           x, labels)
            assert set(grads) == set(want)
            assert abs(loss - want_loss) <= 1e-4, (task, n, loss, want_loss)
            np.testing.assert_allclose(logits, want_logits, atol=1e-4)
            for k in want:
                assert grads[k].shape == want[k].shape, k
                np.testing.assert_allclose(grads[k], want[k], rtol=0, atol=1e-4, err_msg=f"{task} n={n} {k}")
                worst["grad"] = max(worst["grad"], float(np.abs(grads[k] - want[k]).max()))
            worst["loss"] = max(worst["loss"], abs(loss - want_loss))
    print(f"{arch}: max |loss diff| {worst['loss']:.2e}, max |grad diff| {worst['grad']:.2e}")


def test_one_hot_labels_equal_int_labels_and_a_step_descends(compiled):
    bundle = Bundle.open(compiled["mlp"])
    step = load_train_step(bundle)  # this machine's target
    a = Runtime(bundle).activate(1)
    rng = np.random.default_rng(1)
    x = rng.random((16, *bundle.model["input_shape"]), dtype=np.float32)
    labels = rng.integers(0, 2, 16)
    loss, grads = step(x, labels, a.params, a.head)
    loss2, grads2 = step(x, np.eye(2, dtype=np.float32)[labels], a.params, a.head)
    assert loss == loss2 and all(np.array_equal(grads[k], grads2[k]) for k in grads)
    # a small gradient descent step (length 1e-2) on the effective weights and head lowers the loss
    lr = 1e-2 / np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    params = {k: (w - lr * grads[f"{k}.weight"], b) for k, (w, b) in a.params.items()}
    head = (a.head[0] - lr * grads["head.weight"], a.head[1] - lr * grads["head.bias"])
    assert step(x, labels, params, head)[0] < loss
    with pytest.raises(ValueError, match="labels"):
        step(x, labels + 5, a.params, a.head)
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
    free = {"fc1": np.random.default_rng(3).random((256, 64)) < 0.5}
    upd = packnet_update(grads, free)
    assert np.all(upd["fc1.weight"][~free["fc1"]] == 0)
    assert np.array_equal(upd["fc1.weight"][free["fc1"]], grads["fc1.weight"][free["fc1"]])
    s = score_grad(grads, bundle.backbone, "fc2")
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
    a = Runtime(compiled["cnn"]).activate(2)
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    want_loss, want, _ = torch_reference(Bundle.open(compiled["cnn"]).model["layers"], a.params, a.head, x,
                                         np.arange(7) % 2)
    assert abs(got["loss"] - want_loss) <= 1e-4
    assert abs(got["g"] - float(np.abs(want["conv1.weight"]).sum())) <= 1e-3 * max(1.0, got["g"])


def test_without_train_the_entry_is_null(trained, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(trained("supsup")[1], dst)
    compile_bundle(dst, "host", log=lambda _m: None, train=False)
    assert Bundle.open(dst).manifest["targets"]["host"]["train_step"] is None
    with pytest.raises(Exception, match="no TVM train step"):
        load_train_step(dst)
