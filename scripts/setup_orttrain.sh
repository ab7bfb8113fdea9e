#!/usr/bin/env bash
# Set up .venv-orttrain: ONNX Runtime's on-device training (onnxruntime-training 1.19.2,
# its last release), the peer of `edgecl bench learn --zoo`. It lives in its OWN venv:
# the package provides the `onnxruntime` module too (it would clash with onnxruntime in
# .venv), and 1.19.2 needs numpy<2 and onnx 1.16 (a newer onnx writes IR version 14, which
# 1.19 refuses). torch is not needed there: the bench exports the forward ONNX model from
# .venv and hands it over as a file. Idempotent: a second run only checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv-orttrain/bin/python ]; then
  "$PY" -m venv .venv-orttrain
fi
.venv-orttrain/bin/python -m pip install --quiet --disable-pip-version-check \
  "onnxruntime-training==1.19.2" "numpy<2" "onnx==1.16.*"
# The wheel ships the CUDA provider (774 MB); the bench runs on the CPU provider only.
rm -f .venv-orttrain/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so
.venv-orttrain/bin/python -c "import onnxruntime, onnx, numpy; \
from onnxruntime.capi._pybind_state import TrainingParameters; \
print('onnxruntime-training', onnxruntime.__version__, 'onnx', onnx.__version__, 'numpy', numpy.__version__)"
