"""The command line: --help everywhere, clear errors, and the whole path end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgecl.tools.cli import main

COMMANDS = ["train", "bundle", "eval", "infer", "inspect", "compile", "bench", "learn", "deploy",
            "device-test", "demo", "keygen", "sign", "verify", "log", "gc", "rollback", "pack", "unpack",
            "migrate", "daemon"]


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "edgecl.tools.cli", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: edgecl " + command in capsys.readouterr().out


def test_an_unknown_method_is_refused_with_the_list(tmp_path, capsys):
    """The method names come from the registry (which imports torch), so the check runs in
    the command, not in argparse: same exit status and `error:` line, nothing written."""
    assert main(["train", "--data", "split-digits", "--method", "ewc", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "edgecl train: error: unknown method 'ewc'; choose from packnet, supsup" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "split-digits", "--out", "x"], "--method"),
    (["train", "--data", "split-digits", "--method", "hat", "--out", "x", "--tasks", "0"],
     "must be at least 1"),
    (["train", "--data", "split-digits", "--method", "hat", "--out", "x", "--hidden", "a,b"],
     "comma-separated"),
    (["infer", "b"], "--task"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def _err(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_runtime_errors_are_clear(tmp_path, trained, capsys):
    bundle = str(trained("supsup")[1])
    assert "unknown data 'mnist'" in _err(
        ["train", "--data", "mnist", "--method", "hat", "--out", str(tmp_path / "r")], capsys)
    assert "no such bundle directory" in _err(["inspect", str(tmp_path / "nope")], capsys)
    assert "run.json: missing" in _err(["bundle", str(tmp_path), "--out", str(tmp_path / "b")], capsys)
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    err = _err(["infer", bundle, "--task", "cats", "--input", str(tmp_path / "x.npy")], capsys)
    assert "unknown task 'cats'" in err and "digits-0-1" in err
    np.save(tmp_path / "bad.npy", np.zeros((2, 65), np.float32))
    assert "the model takes (batch, 64)" in _err(
        ["infer", bundle, "--task", "0", "--input", str(tmp_path / "bad.npy")], capsys)
    nan = np.zeros((3, 64), np.float32)
    nan[1, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    assert "NaN or infinite values in rows [1]" in _err(
        ["infer", bundle, "--task", "0", "--input", str(tmp_path / "nan.npy")], capsys)
    assert "no such file" in _err(
        ["infer", bundle, "--task", "0", "--input", str(tmp_path / "none.npy")], capsys)


def test_train_bundle_eval_infer_inspect(tmp_path, capsys):
    run, bundle, out = tmp_path / "run", tmp_path / "bundle", tmp_path / "eval.json"
    assert main(["train", "--data", "split-digits", "--method", "packnet", "--out", str(run),
                 "--tasks", "2"]) == 0
    assert main(["bundle", str(run), "--out", str(bundle)]) == 0
    said = capsys.readouterr().out
    assert "version 1: task digits-0-1 with the routers" in said and "version 2: task digits-2-3" in said
    assert "version 3: golden outputs" in said
    assert main(["eval", str(bundle), "--data", "split-digits", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("acc_matrix", "acc", "bwt", "fwt", "bits_per_weight_per_task", "per_task"):
        assert key in r
    assert r["bwt"] == 0.0 and len(r["acc_matrix"]) == 2 and r["acc"] > 0.9
    assert all(b <= 1.0 for b in r["bits_per_weight_per_task"])
    capsys.readouterr()
    from edgecl.models.data import split_digits

    t = split_digits(0).tasks[1]
    np.save(tmp_path / "x.npy", t.x_test[:10])  # 8x8 images: reshaped for the MLP
    assert main(["infer", str(bundle), "--task", "digits-2-3", "--input", str(tmp_path / "x.npy"),
                 "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)["predictions"]
    assert np.mean(np.array(pred) == np.array(t.classes)[t.y_test[:10]]) >= 0.9
    assert main(["inspect", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "digits-2-3" in text and "packnet" in text and "1.0000" in text and "sha256" in text
    assert "packnet trained with: batch_size=32, epochs=30, lr=0.001, prune=0.6" in text  # the run's knobs
    # a second bundle call adds nothing; a continued run adds one version
    assert main(["bundle", str(run), "--out", str(bundle)]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert main(["train", "--data", "split-digits", "--method", "packnet", "--out", str(run),
                 "--tasks", "3"]) == 0
    assert main(["bundle", str(run), "--out", str(bundle)]) == 0
    said = capsys.readouterr().out
    assert "version 4: task digits-4-5" in said and "version 5: golden" in said
    assert "holds a run of" in _err(["train", "--data", "split-digits", "--method", "hat",
                                     "--out", str(run)], capsys)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The demo's machinery end to end on one method of each task kind family (every
    method's own accuracy is asserted in its test file; `edgecl demo` runs them all)."""
    methods = ("packnet", "hat", "pnn", "lora")
    r = subprocess.run([sys.executable, "-m", "edgecl.tools.cli", "--threads", "1", "demo", "--out",
                        str(tmp_path), "--methods", ",".join(methods)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("=== Split-Digits")[-1]
    for method in methods:
        row = next(line for line in table.splitlines() if line.strip().startswith(method))
        acc, bwt = row.split()[1:3]
        assert float(acc) >= 0.97 and float(bwt) == 0.0


def test_errors_point_at_the_cli_and_say_the_valid_range(tmp_path, trained, capsys):
    run, bundle = (str(p) for p in trained("supsup"))
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    err = _err(["infer", bundle, "--task", "7", "--input", str(tmp_path / "x.npy")], capsys)
    assert "no task 7" in err and "indices 0..4" in err
    err = _err(["infer", run, "--task", "0", "--input", str(tmp_path / "x.npy")], capsys)
    assert "a training run, not a bundle" in err and f"edgecl bundle {run} --out BUNDLE" in err
    # a misspelled backend is a bad argument; a row that cannot run says what to do
    err = _err(["bench", bundle, "--backends", "numpy,cuda"], capsys)
    assert "unknown --backends cuda" in err and "choose from" in err
    err = _err(["bench", bundle, "--backends", "tvm", "--batch", "1", "--seconds", "0.05"], capsys)
    assert err.startswith("edgecl bench: error: none of the asked --backends could run")
    assert f"edgecl compile {bundle} --target host" in err


def test_infer_reads_a_batch_of_the_models_size_in_c_order_and_says_so(tmp_path, trained, capsys):
    bundle = str(trained("supsup")[1])
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    np.save(tmp_path / "flat.npy", x)
    np.save(tmp_path / "img.npy", x.reshape(3, 8, 8))
    assert main(["infer", bundle, "--task", "1", "--input", str(tmp_path / "flat.npy"), "--json"]) == 0
    flat = json.loads(capsys.readouterr().out)["logits"]
    assert main(["infer", bundle, "--task", "1", "--input", str(tmp_path / "img.npy")]) == 0
    assert "input (3, 8, 8) read as (3, 64)" in capsys.readouterr().err
    assert main(["infer", bundle, "--task", "1", "--input", str(tmp_path / "img.npy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["logits"] == flat


def test_eval_says_why_fwt_is_not_defined(tmp_path, bundle_copy, capsys):
    from edgecl.runtime import Bundle
    from edgecl.runtime.bundle_write import Transaction

    root = bundle_copy("supsup")
    b = Bundle.open(root)
    last = dict(b.tasks[-1], metrics=dict(b.tasks[-1]["metrics"], before_acc=None, learned_on="device",
                                          importance_drift=0.25))
    with Transaction(root, key=None) as tx:  # as a task learned on the device records it
        tx.add_task(last, b.task_tensors(last["name"]), supersede=True)
    assert main(["eval", str(root), "--data", "split-digits"]) == 0
    out = capsys.readouterr().out
    assert "FWT -" in out and f"FWT not defined: {last['name']} has no accuracy measured before" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(last["name"]) and "0.2500" in line]
    assert "importance_drift" in out and rows  # a method's own per-task figures are shown
