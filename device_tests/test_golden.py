"""Every task on every backend reproduces the golden outputs the compiler stored (1e-4)."""

from __future__ import annotations

import pytest

from edgecl.compiler.golden import load_golden
from edgecl.device_tests.smoke import ALL_BACKENDS, TOLERANCE, check_backend
from edgecl.runtime.backends import available
from edgecl.runtime.bundle import Bundle


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_backend_matches_golden(bundle_path, target, required_backends, backend):
    bundle = Bundle.open(bundle_path)
    try:
        x, golden = load_golden(bundle)
    except KeyError as e:
        pytest.fail(str(e.args[0]))
    assert set(golden) == set(bundle.task_names), "golden outputs do not cover every task"
    why = available(bundle).get(backend)
    must = backend == "numpy" or (required_backends is not None and backend in required_backends)
    if why is not None:
        if must:
            pytest.fail(f"backend {backend} must run on this device but cannot: {why}")
        pytest.skip(f"{backend}: {why}")
    if required_backends is not None and backend not in required_backends:
        pytest.skip(f"{backend}: not asked for (--backends {','.join(required_backends)})")
    tvm_target = None
    if target:
        from edgecl.runtime.profiles import get

        tvm_target = get(target).tvm_target
    r = check_backend(bundle, backend, tvm_target, x, golden)
    assert "error" not in r, f"{backend}: {r.get('error')}"
    assert r["ok"], (f"{backend}: max |logits - golden| = {r['max_abs_err']:.3g} > {TOLERANCE} "
                     f"({r['per_task']})")
