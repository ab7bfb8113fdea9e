"""The device side and the CLI's start-up on Python 3.10 (JetPack 6's Python).

Everything here runs in ``.venv310`` (``bash scripts/setup310.sh``: Python 3.10 with the
device set only, numpy + cffi + safetensors, and pytest), in subprocesses where torch, TVM
and ``tomli`` (which pytest brings along on 3.10) cannot be imported. A missing
``.venv310`` fails these tests, never skips them: ``scripts/test.sh`` makes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgecl.compiler.golden import add_golden
from edgecl.tools.cli import main

from .conftest import _quiet
from .device_process import _BLOCKER

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv310"
BLOCKED = ("torch", "tvm", "tomli", "sklearn", "onnx", "onnxruntime")
COMMANDS = ["train", "bundle", "eval", "infer", "inspect", "compile", "bench", "learn", "deploy",
            "device-test", "demo"]


@pytest.fixture(scope="module")
def py310() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: run `bash scripts/setup310.sh` (scripts/test.sh does) "
                    "to test the device side on Python 3.10")
    return python


def _run(py310: Path, tmp_path: Path, argv: list[str], *, blocked=BLOCKED, timeout: int = 300,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``argv`` (its first item relative to .venv310/bin) under Python 3.10, with the
    ``blocked`` packages unimportable."""
    site = tmp_path / "device-site-310"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=tuple(blocked)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    return subprocess.run([str(py310.parent / argv[0]), *map(str, argv[1:])], capture_output=True,
                          text=True, env=env, cwd=cwd or tmp_path, timeout=timeout)


def _code(py310, tmp_path, code: str, *args) -> subprocess.CompletedProcess:
    return _run(py310, tmp_path, ["python", "-c", textwrap.dedent(code), *args])


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_venv310_is_python_310_on_this_tree(py310, tmp_path):
    out = _ok(_code(py310, tmp_path, """
        import json, sys
        import edgecl, edgecl.runtime, edgecl.kernels
        print(json.dumps({"version": list(sys.version_info[:2]), "edgecl": edgecl.runtime.__file__,
                          "native": edgecl.kernels.available(), "status": edgecl.kernels.status()}))
    """))
    got = json.loads(out)
    assert got["version"] == [3, 10]
    assert Path(got["edgecl"]).resolve().is_relative_to(ROOT.resolve()), got["edgecl"]
    assert got["native"], got["status"]


def test_device_modules_import_on_310(py310, tmp_path):
    """Every module of the device side (runtime, kernels, device_tests) and the CLI imports
    on 3.10 without torch, TVM or tomli, and none of them pulls one in."""
    out = _ok(_code(py310, tmp_path, """
        import importlib, json, pkgutil, sys
        failed, seen, optional = {}, [], {}
        OPTIONAL = {"fastapi", "uvicorn", "prometheus_client", "pydantic", "starlette"}  # edgecl[daemon]
        for pkg in ("edgecl.runtime", "edgecl.kernels", "edgecl.device_tests"):
            root = importlib.import_module(pkg)
            for info in pkgutil.walk_packages(root.__path__, pkg + "."):
                if info.name.rsplit(".", 1)[-1].startswith(("test_", "conftest", "__main__")):
                    continue  # pytest's files (run below, by pytest); a __main__ runs a program
                try:
                    importlib.import_module(info.name)
                    seen.append(info.name)
                except ModuleNotFoundError as e:  # an optional extra's own layer (the daemon's API)
                    (optional if e.name in OPTIONAL else failed)[info.name] = f"{type(e).__name__}: {e}"
                except Exception as e:
                    failed[info.name] = f"{type(e).__name__}: {e}"
        import edgecl.tools.cli
        edgecl.tools.cli.build_parser()
        leaked = [m for m in ("torch", "tvm", "tomli", "tomllib") if m in sys.modules]
        print(json.dumps({"failed": failed, "seen": seen, "leaked": leaked, "optional": optional}))
    """))
    got = json.loads(out)
    assert got["failed"] == {}
    # only the daemon's web layer needs its extra; the rest of the daemon imports without it
    assert set(got["optional"]) <= {"edgecl.runtime.daemon.api"}, got["optional"]
    assert {"edgecl.runtime.daemon.store", "edgecl.runtime.daemon.policy"} <= set(got["seen"])
    assert {"edgecl.runtime.session", "edgecl.runtime.threads", "edgecl.runtime.learn.child",
            "edgecl.kernels.native", "edgecl.device_tests.smoke"} <= set(got["seen"])
    assert got["leaked"] == []


def test_cli_help_on_310(py310, tmp_path):
    out = _ok(_run(py310, tmp_path, ["edgecl", "--help"]))
    assert "--threads" in out and all(c in out for c in COMMANDS)
    out = _ok(_code(py310, tmp_path, """
        import contextlib, io, sys
        from edgecl.tools.cli import main
        for command in sys.argv[1:]:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                try:
                    main([command, "--help"])
                except SystemExit as e:
                    assert e.code == 0, (command, e.code)
            assert buf.getvalue().startswith("usage: edgecl " + command), command
            print(command)
    """, *COMMANDS))
    assert out.split() == COMMANDS


def test_cli_inspect_and_infer_on_310(py310, tmp_path, trained, digits, capsys):
    bundle = trained("hat")[1]
    t = digits.tasks[1]
    np.save(tmp_path / "x.npy", t.x_test[:8])
    out = _ok(_run(py310, tmp_path, ["edgecl", "--threads", "1", "inspect", bundle]))
    assert "digits-8-9" in out and "unit_gates" in out and "threads: 1 (--threads 1;" in out
    assert "kernels: native" in out
    argv = ["infer", str(bundle), "--task", "digits-2-3", "--input", str(tmp_path / "x.npy"), "--json"]
    got = json.loads(_ok(_run(py310, tmp_path, ["edgecl", *argv])))
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out)
    assert got["predictions"] == want["predictions"]
    assert np.allclose(got["logits"], want["logits"], rtol=0, atol=1e-5)
    # no task given: the router decides, as on 3.11
    argv = ["infer", str(bundle), "--input", str(tmp_path / "x.npy"), "--json"]
    got = json.loads(_ok(_run(py310, tmp_path, ["edgecl", *argv])))
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out)
    assert [(i["task"], i["prediction"]) for i in got["inputs"]] == \
        [(i["task"], i["prediction"]) for i in want["inputs"]]


@pytest.fixture(scope="module")
def npz_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(data.npz, bundle) of two tasks learned from a user's .npz (eval on the device needs
    data it can load without scikit-learn)."""
    from edgecl.compiler.from_run import bundle_run
    from edgecl.models.data import split_digits
    from edgecl.models.training import train

    root = tmp_path_factory.mktemp("py310-npz")
    tasks = split_digits(0).tasks[:2]
    data = root / "digits.npz"
    np.savez(data, x=np.concatenate([np.concatenate([t.x_train, t.x_test]) for t in tasks]),
             y=np.concatenate([np.asarray(t.classes)[np.concatenate([t.y_train, t.y_test])]
                               for t in tasks]))
    train(str(data), "packnet", root / "run", seed=0, log=_quiet)
    bundle_run(root / "run", root / "bundle")
    return data, root / "bundle"


def test_cli_eval_on_310(py310, tmp_path, npz_bundle, capsys):
    data, bundle = npz_bundle
    _ok(_run(py310, tmp_path, ["edgecl", "eval", bundle, "--data", data, "--json", tmp_path / "310.json"]))
    assert main(["eval", str(bundle), "--data", str(data), "--json", str(tmp_path / "311.json")]) == 0
    got = json.loads((tmp_path / "310.json").read_text())
    want = json.loads((tmp_path / "311.json").read_text())
    assert got["acc_matrix"] == want["acc_matrix"] and len(got["acc_matrix"]) == 2
    assert got["acc"] == want["acc"] > 0.9 and got["bwt"] == 0.0


def test_device_tests_pass_on_310(py310, tmp_path, bundle_copy):
    """``device_tests/`` (golden outputs, bundle checks, on-device learning) and the kernel
    tests, which need no host fixture, run by 3.10's pytest. Nothing is blocked here: the
    venv has no torch or TVM (checked), and a test that importorskips one skips as on a
    device (a blocked import would raise ImportError, which importorskip does not skip)."""
    present = _ok(_run(py310, tmp_path, ["python", "-c", "import importlib.util as u; print("
                                         "[m for m in ('torch', 'tvm') if u.find_spec(m)])"], blocked=()))
    assert present.strip() == "[]", f".venv310 must hold the device set only, not {present}"
    bundle = bundle_copy("supsup")
    add_golden(bundle)
    r = _run(py310, tmp_path, ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "device_tests", "--bundle", bundle, "--backends", "numpy"],
             blocked=(), cwd=ROOT, timeout=600)
    out = _ok(r)
    assert " passed" in out and "failed" not in out
    r = _run(py310, tmp_path, ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--noconftest", "tests/test_kernels.py"],
             blocked=(), cwd=ROOT, timeout=600)
    out = _ok(r)
    assert " passed" in out and "failed" not in out


def test_deploy_needs_tomllib_only_when_it_builds(py310, tmp_path):
    """tools/deploy.py reads pyproject.toml with tomllib (3.11) or tomli; on a 3.10 without
    tomli that is a clear error, not an ImportError at start-up."""
    r = _code(py310, tmp_path, """
        import sys
        from edgecl.tools import deploy
        try:
            deploy.build_edgecl_wheel(__import__("pathlib").Path(sys.argv[1]), "3.10")
        except deploy.DeployError as e:
            print(e)
    """, tmp_path)
    assert "tomli" in _ok(r)



def test_the_project_still_targets_310():
    import tomllib  # the host test process is 3.11

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["project"]["requires-python"] == ">=3.10"
    assert cfg["tool"]["ruff"]["target-version"] == "py310"
