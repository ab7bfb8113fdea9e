"""The README's worked example and its Python example run as written (extracted from the
README itself, in a fresh directory), and their output agrees with what the README says.

Left out, and said here: ``edgecl compile`` and ``edgecl bench`` lines (minutes of TVM
builds and timing; tests/test_tvm_graph.py and tests/test_bench.py run them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIPPED = ("source .venv/bin/activate", "edgecl compile ", "edgecl bench ")


def _blocks(section: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block in the README section ``section``."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else None]
    return re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)


def _commands(script: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and skipped lines out."""
    lines, cur = [], ""
    for raw in script.splitlines():
        line = raw.split("  #")[0].rstrip() if not raw.lstrip().startswith("python") else raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(cur.strip())
            cur = ""
    return [c for c in lines if not c.startswith(SKIPPED)]


def _run(cmd: str, cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout + r.stderr


@pytest.mark.slow
def test_the_worked_example_and_the_python_example_run_as_written(tmp_path):
    blocks = _blocks("A worked example")
    shell = [b for lang, b in blocks if lang == "bash"]
    python = [b for lang, b in blocks if lang == "python"]
    assert len(shell) == 2 and len(python) == 1
    ran = [(cmd, _run(cmd, tmp_path)) for cmd in _commands(shell[0]) + _commands(shell[1])]
    out = dict(ran)
    first, second = [v for k, v in ran if k.startswith("edgecl bundle runs/supsup")]
    # what the README's comments say about versions
    assert "version 1: task digits-0-1" in first and "version 4: task digits-6-7" in first
    assert "version 5: golden outputs" in first
    assert "version 6: task digits-8-9" in second and "version 7: golden outputs" in second
    routed = out["edgecl infer bundles/supsup --input x.npy"]
    assert "confidence = the router's probability" in routed and "task digits-8-9" in routed
    learned = next(v for k, v in out.items() if k.startswith("edgecl learn bundles/s4"))
    assert "learned 'digits-8-9' (supsup)" in learned
    (tmp_path / "example.py").write_text(python[0])
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "provider" in r.stdout
