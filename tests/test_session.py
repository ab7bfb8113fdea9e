"""The engine session (ONNX Runtime style) and the task-file checks of activation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgecl.compiler.from_run import bundle_run, task_entry
from edgecl.models.training import load_run
from edgecl.runtime import Bundle, BundleError, Runtime, Session
from edgecl.runtime.bundle_write import commit


def test_session_picks_the_first_usable_provider_and_says_why(trained, digits):
    bundle = trained("supsup")[1]
    s = Session(bundle, providers=["tflite", "numpy"])
    assert s.provider == "numpy" and "tflite" in s.skipped and "tflite skipped" in s.describe()
    x = digits.tasks[1].x_test[:7].reshape(7, -1)
    assert np.array_equal(s.logits(x, 1), Runtime(bundle).logits(x, 1))
    with pytest.raises(ValueError, match="unknown provider"):
        Session(bundle, providers=["cuda"])


def test_routed_run_gives_task_confidence_reason_and_prediction(trained, digits):
    s = Session(trained("supsup")[1], providers=["numpy"])
    x = np.concatenate([digits.tasks[2].x_test[:6].reshape(6, -1),
                        np.random.default_rng(0).random((2, 64), dtype=np.float32) * 8])
    r = s.run(x)
    assert r.task_names[:6].count("digits-4-5") >= 4
    for i, (name, reason) in enumerate(zip(r.task_names, r.reason, strict=True)):
        assert (reason == "ok") == (name is not None)
        if name is not None:  # the prediction is the chosen task's own
            assert r.prediction[i] == s.predict(x[i : i + 1], name)[0]
    assert r.task_names[6:] == [None, None] and r.prediction[6:] == [None, None]
    assert all(reason in ("novel", "low confidence") for reason in r.reason[6:])
    fb = s.run(x, fallback="digits-0-1")
    assert fb.task_names[6:] == ["digits-0-1"] * 2 and fb.reason[6].endswith("sent to the fallback task")


def test_reload_picks_up_a_new_version_and_verifies_only_new_files(trained, tmp_path, digits):
    run_dir = trained("supsup")[0]
    bundle = tmp_path / "b"
    # a bundle with the first 3 tasks, then the run's other 2 added while a session is open
    run = load_run(run_dir)
    for t in range(3):
        commit(bundle, model=Bundle.open(trained("supsup")[1]).model, backbone=run.method.export_backbone(),
               tasks=[(task_entry(run, t), run.method.export_task(t))], stream=run.config["stream"])
    s = Session(bundle, providers=["numpy"])
    assert len(s.tasks) == 3 and s.reload() is False
    bundle_run(run_dir, bundle, routers=False)
    assert s.reload() is True and len(s.tasks) == 5
    x = digits.tasks[4].x_test[:3].reshape(3, -1)
    assert np.array_equal(s.logits(x, 4), Runtime(bundle).logits(x, 4))


def test_a_tampered_new_file_is_refused_on_reload(trained, tmp_path):
    run_dir = trained("supsup")[0]
    bundle = tmp_path / "b"
    shutil.copytree(trained("supsup")[1], bundle)
    s = Session(bundle, providers=["numpy"])
    run = load_run(run_dir)
    commit(bundle, model=s.bundle.model, backbone=None, tasks=[(dict(task_entry(run, 0), name="again"),
                                                               run.method.export_task(0))])
    new = Bundle.open(bundle, verify=False).task("again")["file"]
    data = bytearray((bundle / new).read_bytes())
    data[-1] ^= 1
    (bundle / new).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        s.reload()


def test_compiled_backend_holds_the_only_copy_of_a_task(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgecl.compiler.onnx_export import export_bundle

    bundle = tmp_path / "b"
    shutil.copytree(trained("supsup")[1], bundle)
    export_bundle(bundle)
    s = Session(bundle, providers=["onnxruntime"])
    s.logits(np.zeros((1, 64), np.float32), 0)
    assert s.provider == "onnxruntime" and not s.backend.runtime._cache


@pytest.mark.parametrize("bad", ["dtype", "size", "missing"])
def test_mask_tensors_of_the_wrong_dtype_or_size_are_refused(trained, tmp_path, bad):
    run = load_run(trained("supsup")[0])
    tensors = dict(run.method.export_task(0))
    if bad == "dtype":
        tensors["mask.fc1"] = tensors["mask.fc1"].astype(np.float32)
    elif bad == "size":
        tensors["mask.fc1"] = tensors["mask.fc1"][:-1]
    else:
        del tensors["mask.fc2"]
    bundle = tmp_path / "b"
    with pytest.raises(BundleError, match=r"tasks/.*mask\.fc"):  # the writer's kind check refuses it
        commit(bundle, model=Bundle.open(trained("supsup")[1]).model, backbone=run.method.export_backbone(),
               tasks=[(task_entry(run, 0), tensors)], stream=run.config["stream"])
    assert not (bundle / "manifest.json").exists()


def test_unit_gates_must_be_zero_or_one(trained, tmp_path):
    run = load_run(trained("hat")[0])
    tensors = dict(run.method.export_task(0))
    tensors["gate.fc1"] = tensors["gate.fc1"] * 3
    bundle = tmp_path / "b"
    with pytest.raises(BundleError, match="gate.fc1.*0 or 1"):
        commit(bundle, model=Bundle.open(trained("hat")[1]).model, backbone=run.method.export_backbone(),
               tasks=[(task_entry(run, 0), tensors)], stream=run.config["stream"])
    assert not (bundle / "manifest.json").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_the_input_check_finds_nan_and_inf_anywhere_and_passes_huge_finite_values(trained, digits):
    """The fast path (the batch's sum as one dot product with ones) and the row-by-row check
    behind it: a NaN or an inf in any row is refused with the row named; finite values whose
    sum overflows float32 still pass."""
    from edgecl.runtime.errors import InputError

    rt = Runtime(trained("supsup")[1])
    x = np.ascontiguousarray(digits.tasks[0].x_test[:6].reshape(6, -1), np.float32)
    assert rt.check_input(x) is x  # the common case: the caller's array, no copy
    for bad, row in [(np.nan, 0), (np.inf, 3), (-np.inf, 5)]:
        y = x.copy()
        y[row, 17] = bad
        with pytest.raises(InputError, match=rf"NaN or infinite values in rows \[{row}\]"):
            rt.check_input(y)
    huge = x.copy()
    huge[2, 5:7] = 3e38  # finite; their sum is inf in float32
    assert rt.check_input(huge) is huge
