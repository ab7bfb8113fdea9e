"""The compile targets: TVM target dicts (JSON dicts, never strings), cross compilers.

``host`` is this machine's CPU (``llvm_get_system_cpu()``); the others are aarch64
boards cross-compiled with Debian's ``aarch64-linux-gnu-g++``
(``scripts/install_toolchains.sh``).
"""

from __future__ import annotations

import platform
import shutil

AARCH64_CXX = "aarch64-linux-gnu-g++"

# name -> (llvm target dict without the host cpu, machine of the .so, default schedule)
_ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "num-cores": 4}
TARGETS: dict[str, dict] = {
    "host": {"cpu": None, "machine": "x86_64"},
    "rpi4": {"cpu": dict(_ARM, mcpu="cortex-a72", mattr=["+neon"]), "machine": "aarch64"},
    "rpi5": {"cpu": dict(_ARM, mcpu="cortex-a76", mattr=["+neon", "+dotprod"]), "machine": "aarch64"},
    "jetson-orin": {"cpu": dict(_ARM, mcpu="cortex-a78ae", mattr=["+neon", "+dotprod"]),
                    "machine": "aarch64", "cuda": {"kind": "cuda", "arch": "sm_87"}},
}


def names() -> list[str]:
    return list(TARGETS)


def host_machine() -> str:
    return platform.machine()


def cpu_target(name: str) -> dict:
    """The llvm target dict of ``name`` (``host``: this CPU, single-threaded code)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    spec = TARGETS[name]["cpu"]
    if spec is None:
        from tvm.target import codegen

        return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": 1}
    return dict(spec)


def is_native(name: str) -> bool:
    """Whether code for ``name`` runs on this machine (so it can be measured and tuned)."""
    return name == "host" or TARGETS[name]["machine"] == host_machine()


def cross_compiler(name: str) -> str | None:
    """The C++ driver that links ``name``'s shared object; None means the host's default."""
    if name == "host" or TARGETS[name]["machine"] == host_machine():
        return None
    if shutil.which(AARCH64_CXX) is None:
        raise RuntimeError(f"{AARCH64_CXX} not found: run scripts/install_toolchains.sh "
                           f"(apt-get install g++-aarch64-linux-gnu) to build for {name}")
    return AARCH64_CXX


def default_schedule(name: str, target: dict) -> dict:
    """The schedule rules' parameters before any tuning (``compiler/tvm_build.py``):
    ``vec`` lanes per vector, register tiles of ``rows`` x up to ``acc / rows`` vectors."""
    if target.get("mtriple", "").startswith("aarch64"):
        return {"vec": 8, "rows": 8, "acc": 8}  # NEON: 128-bit registers (2 per vector), 32 of them
    return {"vec": 16, "rows": 8, "acc": 16}  # AVX-512: 32 registers of 16 lanes
