#!/usr/bin/env bash
# A second virtual environment, .venv310, on Python 3.10 (JetPack 6's Python) with only
# the device set (`pip install -e .`: numpy, cffi, safetensors) and pytest: the one
# tests/test_py310.py runs the device side and the CLI's start-up in.
# Idempotent: a second run only checks that it is there and up to date.
# Python 3.10 is found as $PYTHON310, else `python3.10` on PATH, else pyenv's 3.10.x
# (also in $PYENV_ROOT/versions when pyenv is not on PATH);
# without one it says so and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv310

is310() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; }

find310() {
  local c
  if [ -n "${PYTHON310:-}" ]; then
    is310 "$PYTHON310" && { echo "$PYTHON310"; return 0; }
    echo "setup310: PYTHON310=$PYTHON310 is not a Python 3.10" >&2
    return 1
  fi
  if c=$(command -v python3.10 2>/dev/null) && is310 "$c"; then echo "$c"; return 0; fi
  if command -v pyenv >/dev/null 2>&1; then
    local root v
    root=$(pyenv root 2>/dev/null || true)
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.10(\.[0-9]+)?$' | sort -t. -k3,3nr); do
      c="$root/versions/$v/bin/python3.10"
      if is310 "$c"; then echo "$c"; return 0; fi
    done
  fi
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do  # pyenv not on PATH
    if is310 "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

if ! is310 "$VENV/bin/python"; then
  if ! PY=$(find310); then
    cat >&2 <<'EOF'
setup310: no Python 3.10 found (tried $PYTHON310, python3.10 on PATH, and pyenv's 3.10.x).
Install one (e.g. `pyenv install 3.10`) or point PYTHON310 at it, then run
`bash scripts/setup310.sh` again; tests/test_py310.py fails until .venv310 exists.
EOF
    exit 1
  fi
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

# Reinstall only when the package metadata or the C kernels changed since the last
# install (or the environment is broken); the stamp is kept inside the venv.
stamp=$(cat pyproject.toml setup.py kernels/build_kernels.py kernels/edgecl_kernels.c \
  kernels/edgecl_kernels.h | sha256sum | cut -d' ' -f1)
check='import edgecl.runtime, edgecl.kernels, pytest, sys
sys.exit(not edgecl.kernels.available())'
if [ "$(cat "$VENV/.edgecl-stamp" 2>/dev/null)" != "$stamp" ] || ! EDGECL_KERNELS=auto "$VENV/bin/python" -c "$check" 2>/dev/null
then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel >/dev/null
  "$VENV/bin/python" -m pip install --quiet -e . "pytest>=8"
  EDGECL_KERNELS=auto "$VENV/bin/python" -c "$check"
  echo "$stamp" > "$VENV/.edgecl-stamp"
fi
