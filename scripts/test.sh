#!/usr/bin/env bash
# The test job, from a fresh clone: set up, lint, then run the whole test suite
# (slow end-to-end tests included; pass -m "not slow" to skip them locally).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup310.sh  # .venv310: Python 3.10, device set only (tests/test_py310.py)
.venv/bin/ruff check .
# Two workers (pytest-xdist): the suite is CPU-bound and every test process uses one
# thread (tests/conftest.py); EDGECL_TEST_WORKERS=0 runs it in one process.
exec .venv/bin/pytest -n "${EDGECL_TEST_WORKERS:-2}" --dist loadgroup "$@"
