"""runtime/heap.py: freed heap is kept, so a training loop's fresh arrays stop faulting pages in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_LOOP = r"""
import json, resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from edgecl.runtime.heap import keep_freed_heap
    assert keep_freed_heap()
def step():  # as a training step: 16 activations of 1 MiB held together, then all freed
    held = [np.ones(1 << 18, np.float32) for _ in range(16)]
    return sum(float(a[-1]) for a in held)
for _ in range(3):  # warm up: the first steps may grow the heap
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_heap_stops_page_faults_of_fresh_arrays():
    def faults(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", _LOOP, mode], capture_output=True, text=True,
                             env=env, check=True).stdout
        return json.loads(out)

    default, kept = faults("default"), faults("keep")
    pages = 20 * 16 * (1 << 20) // 4096
    assert default >= pages // 2, default  # glibc's defaults: the freed heap is trimmed, faulted in again
    assert kept < pages // 20, kept  # kept: the same heap pages serve every array
