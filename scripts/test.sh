#!/usr/bin/env bash
# The test job, from a fresh clone: set up, lint, then run the whole test suite
# (slow end-to-end tests included; pass -m "not slow" to skip them locally).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
