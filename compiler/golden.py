"""Golden outputs: canary inputs and every task's numpy-reference logits, in the bundle.

    from edgecl.compiler.golden import add_golden, ensure_golden
    add_golden("bundles/supsup")      # a new version with golden-<sha8>.safetensors
    ensure_golden("bundles/supsup")   # the same, only when missing or stale (returns None if fresh)

The file holds ``x`` (``[n, *input_shape]`` float32, uniform in [0, 1), seeded) and
``logits.<index>`` per task (``[n, classes]`` float32) computed by the numpy runtime
(``edgecl.runtime.Runtime``, the reference) on the host. Manifest key ``golden``:
``{"file", "inputs", "seed", "reference": "numpy", "tasks": [names], "backbone"}``. On a
device, ``device_tests`` run every available backend on ``x`` and compare with these
logits to 1e-4. Golden outputs are stale when the task list or the backbone file changed
since they were made; ``ensure_golden`` then writes them again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

from edgecl.runtime.bundle import Bundle
from edgecl.runtime.bundle_write import commit_files
from edgecl.runtime.session import Runtime

DEFAULT_INPUTS = 16


def bundle_canaries(bundle: Bundle, n: int = DEFAULT_INPUTS, seed: int = 0) -> np.ndarray:
    """Canary inputs fit for the bundle's model (token ids within its embedding table)."""
    from edgecl.runtime.samples import canary

    return canary(bundle, n, seed)


def _covers(bundle: Bundle) -> dict:
    """What golden outputs depend on: each task's file (a superseded task has a new one)
    and each backbone's."""
    return {"tasks": list(bundle.task_names), "task_files": [t["file"] for t in bundle.tasks],
            "backbones": {n: b["file"] for n, b in sorted(bundle.manifest["backbones"].items())}}


def golden_is_fresh(bundle: Bundle) -> bool:
    g = bundle.manifest.get("golden")
    return bool(g) and g.get("file") in bundle.manifest["files"] \
        and all(g.get(k) == v for k, v in _covers(bundle).items())


def add_golden(bundle_dir: str | Path, n: int = DEFAULT_INPUTS, seed: int = 0) -> int:
    """Compute and commit golden outputs for every task; returns the new bundle version."""
    bundle = Bundle.open(bundle_dir)
    rt = Runtime(bundle)
    x = bundle_canaries(bundle, n, seed)
    tensors = {"x": x}
    for info in bundle.tasks:
        tensors[f"logits.{info['index']}"] = np.ascontiguousarray(rt.logits(x, info["name"]), np.float32)
    data = st_save(dict(sorted(tensors.items())), metadata={"edgecl": "golden", "reference": "numpy"})
    rel = f"golden-{hashlib.sha256(data).hexdigest()[:8]}.safetensors"
    entry = {"file": rel, "inputs": int(n), "seed": int(seed), "reference": "numpy", **_covers(bundle)}

    def update(manifest: dict) -> None:
        old = manifest.get("golden")
        if old and old.get("file") != rel:
            manifest["files"].pop(old["file"], None)
        manifest["golden"] = entry

    return commit_files(bundle_dir, {rel: data}, update)


def ensure_golden(bundle_dir: str | Path, n: int = DEFAULT_INPUTS, seed: int = 0) -> int | None:
    """``add_golden`` unless the bundle's golden outputs cover its current tasks and backbone."""
    if golden_is_fresh(Bundle.open(bundle_dir)):
        return None
    return add_golden(bundle_dir, n, seed)


def load_golden(bundle: Bundle) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(x, {task name: logits}) from the bundle's golden file (device side: numpy only)."""
    g = bundle.manifest.get("golden")
    if not g:
        raise KeyError(f"{bundle.root}: the bundle holds no golden outputs "
                       "(run: edgecl bundle, or edgecl compile BUNDLE --target host)")
    tensors, _ = bundle.read_tensors(g["file"])
    by_index = {t["index"]: t["name"] for t in bundle.tasks}
    out = {by_index[int(k.split(".", 1)[1])]: v for k, v in tensors.items() if k.startswith("logits.")}
    return tensors["x"], out
