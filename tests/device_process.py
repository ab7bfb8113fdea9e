"""Run code in a Python process that behaves like a device: importing the blocked
packages (torch, and by default TVM's Python package) fails there, and so in every
child it starts (the blocker is a sitecustomize on PYTHONPATH)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

_BLOCKER = """
import sys
_BLOCKED = {blocked!r}
class _Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in _BLOCKED):
            raise ImportError(f"{{name}} is blocked: this is a device")
sys.meta_path.insert(0, _Block())
"""


def run_on_device(tmp_path: Path, code: str, *args: str, blocked: Sequence[str] = ("torch", "tvm"),
                  timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -c code args...`` with the ``blocked`` packages (and their submodules)
    unimportable."""
    site = tmp_path / "device-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(blocked=tuple(blocked)))
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)
