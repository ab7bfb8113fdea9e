"""Shared fixtures: runs trained once per session on Split-Digits, and their bundles."""

from __future__ import annotations

import os

# One thread for torch, BLAS and TVM in every test process (and the processes tests
# start): on a 2-core CI box their default (every core each) made the shared training
# fixture ~20x slower. Set before torch or numpy load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from edgecl.runtime.heap import keep_freed_heap  # noqa: E402

keep_freed_heap()  # as models.training.train does, for the tests that train without it (runtime/heap.py)

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from edgecl.compiler.from_run import bundle_run  # noqa: E402
from edgecl.models.data import split_digits  # noqa: E402
from edgecl.models.training import load_run, train  # noqa: E402

METHODS = ["packnet", "supsup", "piggyback", "hat"]


def _quiet(_msg: str) -> None:
    pass


# The tests that boot the emulated Pi share its root file system, its cache and its ssh
# port: under pytest-xdist (scripts/test.sh runs two workers) they go to one worker.
EMULATED = ("test_deploy_emulated.py", "test_daemon.py::test_deploy_service_on_the_emulated_pi",
            "test_fleet.py::test_the_emulated_pi_is_a_fleet_node")


def pytest_collection_modifyitems(config, items):
    """Slow tests first, so the two workers share the long ones instead of one worker
    finishing the suite alone with them; the emulated-Pi tests in one xdist group; the
    other tests of a module in one group, so a module-scoped fixture (a trained run) is
    made once, not once per worker (slow tests, which mostly train their own, stay free)."""
    for item in items:
        if any(e in item.nodeid for e in EMULATED):
            item.add_marker(pytest.mark.xdist_group("emulated-pi"))
        elif item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept otherwise


@pytest.fixture(scope="session")
def digits():
    return split_digits(0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """method -> (run dir, bundle dir): default MLP, seed 0, all 5 Split-Digits tasks."""
    root = tmp_path_factory.mktemp("trained")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(method: str, arch: str = "mlp") -> tuple[Path, Path]:
        key = f"{method}-{arch}"
        if key not in cache:
            run_dir, bundle_dir = root / "runs" / key, root / "bundles" / key
            train("split-digits", method, run_dir, seed=0, arch=arch, log=_quiet)
            bundle_run(run_dir, bundle_dir)
            cache[key] = (run_dir, bundle_dir)
        return cache[key]

    return get


@pytest.fixture
def bundle_copy(trained, tmp_path):
    """A private copy of a trained bundle a test may damage."""

    def get(method: str = "supsup", arch: str = "mlp") -> Path:
        dst = tmp_path / f"bundle-{method}-{arch}"
        shutil.copytree(trained(method, arch)[1], dst)
        return dst

    return get


@pytest.fixture
def run_of(trained):
    def get(method: str, arch: str = "mlp"):
        return load_run(trained(method, arch)[0])

    return get
