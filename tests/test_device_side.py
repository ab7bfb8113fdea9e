"""The device side runs where torch (and TVM's compiler) cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from .device_process import run_on_device


def _run_blocked(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    return run_on_device(tmp_path, code, *args, blocked=("torch", "tvm.relax"))


def test_torch_is_really_blocked(tmp_path):
    r = _run_blocked(tmp_path, "import torch")
    assert r.returncode != 0 and "blocked" in r.stderr


def test_runtime_imports_and_infers_without_torch(tmp_path, trained, digits):
    bundle = trained("packnet")[1]
    x = digits.tasks[3].x_test.reshape(-1, 64)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        import edgecl.runtime, edgecl.kernels
        from edgecl.runtime import Runtime
        rt = Runtime(sys.argv[1])
        x = np.load(sys.argv[2])
        out = {t: rt.logits(x, t).tolist() for t in rt.tasks}
        assert "torch" not in sys.modules
        print(json.dumps(out))
    """)
    r = _run_blocked(tmp_path, code, str(bundle), str(tmp_path / "x.npy"))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    from edgecl.runtime import Runtime

    rt = Runtime(bundle)
    for t in rt.tasks:
        assert np.array_equal(np.asarray(got[t], dtype=np.float32), rt.logits(x, t))


def test_device_cli_commands_run_without_torch(tmp_path, trained, digits):
    bundle = trained("hat")[1]
    np.save(tmp_path / "x.npy", digits.tasks[0].x_test[:5])
    code = "import sys; from edgecl.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    r = _run_blocked(tmp_path, code, "infer", str(bundle), "--task", "0", "--input",
                     str(tmp_path / "x.npy"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[1].split() == [str(v) for v in digits.tasks[0].y_test[:5]]
    r = _run_blocked(tmp_path, code, "inspect", str(bundle))
    assert r.returncode == 0, r.stderr
    assert "digits-8-9" in r.stdout and "unit_gates" in r.stdout


def test_no_generic_top_level_names_leak(tmp_path):
    code = textwrap.dedent("""
        import importlib.util
        import edgecl.models, edgecl.tools, edgecl.runtime
        leaked = [n for n in ("models", "tools", "runtime", "kernels", "compiler", "device_tests")
                  if importlib.util.find_spec(n) is not None]
        print(leaked)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
