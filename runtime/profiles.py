"""Target profiles: what the runtime needs to know about a board (device side, no torch).

    from edgecl.runtime import profiles
    p = profiles.get("rpi4")            # cpu, TVM target name, energy meter, RAM budget
    here = profiles.detect()            # facts about this machine (uname, CPU part, model, emulated)
    profiles.mismatch("rpi4", here)     # None when this machine can be an rpi4, else why not

A profile's ``tvm_target`` names the bundle's compiled library (``manifest.targets``,
see ``edgecl.compiler.targets``); ``energy_meter`` is one of ``rapl``, ``ina3221``,
``pi5-pmic``, ``model`` (a calibrated model when the board has no meter);
``ram_budget_bytes`` is the default budget of on-device learning.

``detect`` and ``mismatch`` also run on the *host* side of ``edgecl deploy``, over facts
gathered with ``ssh`` (``facts_from_text``), before anything is copied to a device.
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The file the emulator (edgecl.tools.emulator) puts in its root file system.
EMULATOR_MARKER = "/etc/edgecl-emulator.json"

MiB = 1 << 20


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    machine: str                         # uname -m
    cpu: str                             # core name (llvm -mcpu)
    cpu_parts: tuple[str, ...]           # /proc/cpuinfo "CPU part" values of that core (ARM)
    tvm_target: str                      # key of manifest["targets"] (compiler/targets.py)
    energy_meter: str                    # rapl | ina3221 | pi5-pmic | model
    ram_budget_bytes: int                # default on-device learning budget
    qemu_cpu: str | None = None          # QEMU_CPU for the emulated stand-in
    model_patterns: tuple[str, ...] = ()  # /proc/device-tree/model must match one (when present)
    os_hint: str = ""
    python_hint: str = "3.11"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "rpi4": Profile(
        name="rpi4", description="Raspberry Pi 4 Model B (BCM2711, 4x Cortex-A72 @ 1.5-1.8 GHz)",
        machine="aarch64", cpu="cortex-a72", cpu_parts=("0xd08",), tvm_target="rpi4",
        energy_meter="model", ram_budget_bytes=256 * MiB, qemu_cpu="cortex-a72",
        model_patterns=(r"Raspberry Pi 4", r"Raspberry Pi Compute Module 4", r"Raspberry Pi 400"),
        os_hint="Raspberry Pi OS (64-bit, bookworm)", python_hint="3.11",
        notes=("no power meter on the board: energy is a calibrated model (or an external USB meter)",)),
    "rpi5": Profile(
        name="rpi5", description="Raspberry Pi 5 (BCM2712, 4x Cortex-A76 @ 2.4 GHz)",
        machine="aarch64", cpu="cortex-a76", cpu_parts=("0xd0b",), tvm_target="rpi5",
        energy_meter="pi5-pmic", ram_budget_bytes=512 * MiB, qemu_cpu="cortex-a76",
        model_patterns=(r"Raspberry Pi 5", r"Raspberry Pi Compute Module 5", r"Raspberry Pi 500"),
        os_hint="Raspberry Pi OS (64-bit, bookworm)", python_hint="3.11",
        notes=("energy from the PMIC rails: vcgencmd pmic_read_adc",)),
    "jetson-orin": Profile(
        name="jetson-orin",
        description="NVIDIA Jetson Orin (Nano/NX/AGX; 6-12x Cortex-A78AE, Ampere GPU sm_87)",
        machine="aarch64", cpu="cortex-a78ae", cpu_parts=("0xd42",), tvm_target="jetson-orin",
        energy_meter="ina3221", ram_budget_bytes=1024 * MiB, qemu_cpu="cortex-a76",
        model_patterns=(r"NVIDIA", r"Jetson", r"Orin"),
        os_hint="JetPack 6 (Ubuntu 22.04)", python_hint="3.10",
        notes=("energy from the INA3221 rails under /sys/bus/i2c/drivers/ina3221/*/hwmon",
               "JetPack 6 ships Python 3.10: the C kernels are cross-built for 3.11 only, so they "
               "fall back to numpy there unless built on the device",
               "the emulator has no cortex-a78ae model: it stands in with cortex-a76")),
    # This machine kind (x86_64), e.g. an x86 edge box; used by the host-side tests.
    "host": Profile(
        name="host", description="an x86_64 Linux machine", machine="x86_64", cpu="x86-64",
        cpu_parts=(), tvm_target="host", energy_meter="rapl", ram_budget_bytes=1024 * MiB,
        os_hint="Debian/Ubuntu", python_hint="3.11",
        notes=("energy from RAPL (/sys/class/powercap/intel-rapl:0/energy_uj) when readable",)),
}

ENERGY_METERS = ("rapl", "ina3221", "pi5-pmic", "model")


def names() -> list[str]:
    return list(PROFILES)


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown target profile {name!r}; choose from {', '.join(PROFILES)}") from None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def facts_from_text(uname_m: str, cpuinfo: str = "", model: str = "", emulator: str = "",
                    python: str = "", libc: str = "") -> dict:
    """Normalize raw facts (as read locally or over ssh) into the dict ``detect`` returns."""
    found = re.finditer(r"^CPU part\s*:\s*(0x[0-9a-fA-F]+)", cpuinfo, re.M)
    parts = sorted({m.group(1).lower() for m in found})
    emu = None
    if emulator.strip():
        try:
            emu = json.loads(emulator)
        except ValueError:
            emu = {"raw": emulator.strip()}
    return {"machine": uname_m.strip(), "cpu_parts": parts, "model": model.replace("\x00", "").strip(),
            "emulated": emu is not None, "emulator": emu, "python": python.strip(), "libc": libc.strip()}


def detect() -> dict:
    """Facts about the machine this runs on."""
    libc = "-".join(platform.libc_ver())
    return facts_from_text(platform.machine(), _read("/proc/cpuinfo"), _read("/proc/device-tree/model"),
                           _read(EMULATOR_MARKER), platform.python_version(), libc)


def identify(facts: dict) -> str | None:
    """The profile this machine matches best (None if none)."""
    for p in PROFILES.values():
        if p.machine == facts["machine"] and p.cpu_parts and set(p.cpu_parts) & set(facts["cpu_parts"]):
            return p.name
    emu = facts.get("emulator") or {}
    if emu.get("profile") in PROFILES:
        return emu["profile"]
    return "host" if facts["machine"] == "x86_64" else None


def mismatch(name: str, facts: dict) -> str | None:
    """None when a machine with ``facts`` can run target ``name``, else a sentence saying why not."""
    p = get(name)
    if facts["machine"] != p.machine:
        return (f"the device is {facts['machine'] or 'unknown'} (uname -m) but target {name} is "
                f"{p.machine} ({p.description})")
    if p.cpu_parts and facts["cpu_parts"] and not set(p.cpu_parts) & set(facts["cpu_parts"]):
        other = identify(facts)
        seen = ", ".join(facts["cpu_parts"])
        return (f"the device's CPU (CPU part {seen}{f', a {other}' if other else ''}) is not target "
                f"{name}'s {p.cpu} (CPU part {', '.join(p.cpu_parts)}): its library may use "
                f"instructions this CPU lacks; deploy with --target {other or '...'}")
    model = facts["model"]
    if p.model_patterns and model and not any(re.search(m, model) for m in p.model_patterns):
        return f"the device says it is {facts['model']!r}, not a {p.description}"
    return None


def emulated() -> bool:
    return os.path.exists(EMULATOR_MARKER)
