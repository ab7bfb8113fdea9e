"""--threads and the default thread count (runtime/threads.py): the cores actually free."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from edgecl.runtime import threads
from edgecl.tools.cli import build_parser, main

from .device_process import run_on_device


@pytest.fixture
def clean_env(monkeypatch):
    """No thread variables from the outside (monkeypatch puts them back after)."""
    for var in threads.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_free_cores_is_between_one_and_the_cpu_count():
    n = threads.free_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)
    load = threads.load_average()
    assert load is None or load >= 0


@pytest.mark.parametrize("cores, online, load, busy", [
    (2, 2, 0.0, 0), (2, 2, 0.44, 0), (2, 2, 1.0, 1), (2, 2, 1.6, 2), (2, 2, 7.0, 2), (4, 4, 1.4, 1),
    (2, 64, 32.0, 1), (2, 64, 10.0, 0),  # the machine's load, scaled to the cores we may use
])
def test_free_cores_rule(monkeypatch, cores, online, load, busy):
    monkeypatch.setattr(os, "cpu_count", lambda: online)
    assert threads.busy_cores(cores, load) == busy
    assert threads.free_cores(cores, load) == max(1, cores - busy)


@pytest.mark.parametrize("argv, n", [
    (["--threads", "3", "inspect", "b"], 3), (["inspect", "b", "--threads=2"], 2),
    (["inspect", "b"], None), (["--threads", "0", "inspect"], None), (["--threads", "x"], None),
    (["--threads"], None), (["learn", "--", "--threads", "4"], None),
])
def test_threads_from_a_command_line(argv, n):
    assert threads.from_argv(argv) == n


def test_configure_sets_the_variables(clean_env):
    with threads.configured(1) as n:
        assert n == 1
        assert {v: os.environ[v] for v in threads.ENV_VARS} == dict.fromkeys(threads.ENV_VARS, "1")
        assert threads.current().source == "--threads"
        if "torch" in sys.modules:
            assert sys.modules["torch"].get_num_threads() == 1
    assert not any(v in os.environ for v in threads.ENV_VARS)  # put back


def test_configure_in_a_fresh_process_reaches_torch_blas_and_children(clean_env, tmp_path):
    code = textwrap.dedent("""
        import json, os, subprocess, sys
        from edgecl.runtime import threads
        n = threads.configure(1)
        import torch, threadpoolctl
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"],
                               capture_output=True, text=True).stdout.strip()
        print(json.dumps({"n": n, "env": {v: os.environ[v] for v in threads.ENV_VARS},
                          "torch": torch.get_num_threads(), "child": child,
                          "blas": [i["num_threads"] for i in threadpoolctl.threadpool_info()
                                   if i["user_api"] == "blas"]}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["n"] == 1 and set(got["env"].values()) == {"1"}
    assert got["torch"] == 1 and got["child"] == "1" and got["blas"] and set(got["blas"]) == {1}


def test_the_default_keeps_a_users_omp_num_threads(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "3")
    clean_env.setenv("MKL_NUM_THREADS", "2")
    with threads.configured(None) as n:
        assert n == 3 and threads.describe().startswith("3 (OMP_NUM_THREADS=3; ")
        assert os.environ["OPENBLAS_NUM_THREADS"] == "3" and os.environ["MKL_NUM_THREADS"] == "2"
    with threads.configured(2) as n:  # --threads wins over everything
        assert n == 2 and {os.environ[v] for v in threads.ENV_VARS} == {"2"}
    assert os.environ["OMP_NUM_THREADS"] == "3" and "OPENBLAS_NUM_THREADS" not in os.environ


def test_the_default_is_the_free_cores(clean_env):
    with threads.configured(None) as n:
        assert n == threads.current().n >= 1 and threads.current().source == "free cores"
        c = threads.current()
        assert n == max(1, c.cores - c.busy)
        assert re.fullmatch(r"\d+ \(\d+ cores?, \d+ busy\)", threads.describe())


def test_learner_child_inherits_the_count(clean_env):
    from edgecl.runtime.learn import learner

    with threads.configured(2):
        env = learner.child_env()
    assert {env[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")} == {"2"}
    assert learner.child_env()["OMP_NUM_THREADS"] == "1"  # the learner's own default, unconfigured


def test_threads_module_is_device_safe(tmp_path):
    r = run_on_device(tmp_path, """
        import sys
        from edgecl.runtime import threads
        print(threads.configure(None), threads.describe())
        assert "torch" not in sys.modules and "threadpoolctl" not in sys.modules
    """, blocked=("torch", "tvm", "threadpoolctl"))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv", [["--threads", "1", "inspect", "B"], ["inspect", "B", "--threads", "1"],
                                  ["--threads", "4", "inspect", "B", "--threads=1"]])
def test_inspect_prints_the_threads_line(argv, trained, capsys, clean_env):
    bundle = str(trained("supsup")[1])
    assert main([bundle if a == "B" else a for a in argv]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^threads: 1 \(--threads 1; \d+ cores?, \d+ busy", out, re.M), out
    assert not any(v in os.environ for v in threads.ENV_VARS)  # an in-process run leaves none behind


def test_inspect_default_and_a_fresh_process(trained, tmp_path, clean_env):
    """In a fresh `edgecl` process the count is in the environment before numpy loads:
    its BLAS starts with that many threads."""
    bundle = str(trained("supsup")[1])
    code = textwrap.dedent("""
        import json, sys
        from edgecl.tools.cli import main
        rc = main(sys.argv[1:])
        import threadpoolctl
        print(json.dumps([i["num_threads"] for i in threadpoolctl.threadpool_info()
                          if i["user_api"] == "blas"]))
        sys.exit(rc)
    """)
    r = subprocess.run([sys.executable, "-c", code, "--threads", "1", "inspect", bundle],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "threads: 1 (--threads 1; " in r.stdout and "keeps its own count" not in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [1]
    r = subprocess.run([sys.executable, "-m", "edgecl.tools.cli", "inspect", bundle],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^threads: \d+ \(\d+ cores?, \d+ busy\)$", r.stdout, re.M), r.stdout


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0", "inspect", "b"], "argument --threads: must be at least 1, got 0"),
    (["--threads", "x", "inspect", "b"], "argument --threads: 'x' is not an integer"),
    (["inspect", "b", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["inspect", "b", "--threads", "x"], "argument --threads: 'x' is not an integer"),
    (["train", "--threads", "-2", "--data", "d", "--method", "hat", "--out", "o"], "at least 1"),
])
def test_bad_thread_counts_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: edgecl")


def test_bad_thread_count_from_the_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgecl.tools.cli", "--threads", "0", "inspect", "b"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "argument --threads: must be at least 1" in r.stderr


def test_every_command_takes_threads():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "--threads" in parser.format_help()
    for name, p in sub.choices.items():
        assert "--threads N" in p.format_help(), name
