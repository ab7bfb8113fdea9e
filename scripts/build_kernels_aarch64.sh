#!/usr/bin/env bash
# Cross-build the C kernels (edgecl.kernels._native) for an arm64 device: Debian bookworm,
# CPython 3.11 (Raspberry Pi 4/5, Jetson Orin). Output:
#   dist/aarch64/_native.cpython-311-aarch64-linux-gnu.so
# Install it on the device next to the package's kernels (site-packages/edgecl/kernels/),
# or build there with `pip install .` if the device has a compiler.
#
# How (all offline from Debian's archive, as root):
#  1. The cross compiler: Debian's gcc-aarch64-linux-gnu (+ libc6-dev-arm64-cross),
#     installed with apt-get when `aarch64-linux-gnu-gcc` is missing.
#  2. Python headers for the *target*: Python.h is portable but pyconfig.h is not. We take
#     both from Debian's libpython3.11-dev for arm64 (the device's own Python headers):
#     `dpkg --add-architecture arm64` (if needed), `apt-get update`, then
#     `apt-get download libpython3.11-dev:arm64` and `dpkg -x` into .cache/aarch64-python/
#     (nothing is installed for arm64; the .deb is only unpacked). Its
#     usr/include/python3.11/pyconfig.h is Debian's multiarch wrapper, which includes
#     usr/include/aarch64-linux-gnu/python3.11/pyconfig.h when __aarch64__ is defined.
#  3. cffi (from the host venv) writes the module's C source (API mode, the same
#     kernels/build_kernels.py that `pip install` uses), and aarch64-linux-gnu-gcc
#     compiles it with kernels/edgecl_kernels.c into a shared object. No -march: the
#     baseline ARMv8-A has NEON, which -O3 auto-vectorizes for; set CFLAGS_EXTRA (e.g.
#     "-mcpu=cortex-a72") to tune for one board.
#  4. `file` must report "ARM aarch64"; the script checks it and the exported init symbol.
#
# Env: PYTHON (host python with cffi; default .venv/bin/python), OUT (default dist/aarch64),
#      PYDEV_DEB (a libpython3.11-dev arm64 .deb to use instead of downloading one).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/dist/aarch64}
CACHE=$ROOT/.cache/aarch64-python
CC=aarch64-linux-gnu-gcc
PYVER=3.11
apt_updated=0

apt_update_once() {
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
}

# 1. cross compiler
if ! command -v "$CC" >/dev/null; then
  echo "installing the cross compiler (gcc-aarch64-linux-gnu)..."
  apt_update_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi

# 2. target Python headers
PYINC=$CACHE/usr/include/python$PYVER
if [ ! -f "$CACHE/usr/include/aarch64-linux-gnu/python$PYVER/pyconfig.h" ]; then
  echo "fetching arm64 Python $PYVER headers (libpython$PYVER-dev:arm64)..."
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  deb=${PYDEV_DEB:-}
  if [ -z "$deb" ]; then
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
      dpkg --add-architecture arm64
      apt_updated=0
    fi
    apt_update_once
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "libpython$PYVER-dev:arm64")
    deb=$(ls "$tmp"/libpython"$PYVER"-dev_*_arm64.deb)
  fi
  rm -rf "$CACHE"
  mkdir -p "$CACHE"
  dpkg -x "$deb" "$CACHE"
fi
test -f "$PYINC/Python.h" || { echo "no Python.h under $PYINC" >&2; exit 1; }

# 3. generate the cffi C source and cross-compile
mkdir -p "$OUT"
work=$(mktemp -d)
gen=$work/edgecl.kernels._native.c
"$PYTHON" - "$gen" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("build_kernels", "kernels/build_kernels.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.make_builder(absolute=True).emit_c_code(sys.argv[1])
EOF
CFLAGS=$("$PYTHON" -c "import importlib.util as u; s=u.spec_from_file_location('b','kernels/build_kernels.py'); m=u.module_from_spec(s); s.loader.exec_module(m); print(' '.join(m.CFLAGS))")
so=$OUT/_native.cpython-311-aarch64-linux-gnu.so
# shellcheck disable=SC2086
"$CC" -shared -fPIC -DNDEBUG -fwrapv $CFLAGS ${CFLAGS_EXTRA:-} \
  -I "$ROOT/kernels" -I "$PYINC" -I "$CACHE/usr/include" \
  "$gen" "$ROOT/kernels/edgecl_kernels.c" -lm -o "$so"
rm -rf "$work"

# 4. check
desc=$(file -b "$so")
echo "$so: $desc"
case "$desc" in *"ARM aarch64"*) ;; *) echo "not an aarch64 object" >&2; exit 1 ;; esac
aarch64-linux-gnu-nm -D --defined-only "$so" | grep -q " T PyInit__native$" \
  || { echo "PyInit__native missing" >&2; exit 1; }
