#!/usr/bin/env bash
# Cross toolchain for the aarch64 targets (rpi4, rpi5, jetson-orin): Debian's
# gcc/g++-aarch64-linux-gnu, which links TVM's cross-compiled shared objects.
# Idempotent: does nothing when aarch64-linux-gnu-g++ is already on PATH.
set -euo pipefail
if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu g++-aarch64-linux-gnu \
  libc6-dev-arm64-cross >/dev/null
aarch64-linux-gnu-g++ --version | head -n 1
