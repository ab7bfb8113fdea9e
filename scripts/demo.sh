#!/usr/bin/env bash
# The main job, from a fresh clone: set up, then train/bundle/evaluate every method on
# Split-Digits through the device runtime. Extra arguments go to `edgecl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgecl demo "$@"
