"""Energy meters: what learning draws from its joule budget.

Every meter reads a real counter or rail of the machine it runs on, below a root path
(default ``/``; tests point it at a fake sysfs tree), or says it is absent and why —
a missing meter is never faked. The modelled meter is the fallback and says it is an
estimate.

* :class:`RaplMeter` — Linux powercap RAPL: ``sys/class/powercap/intel-rapl:N/energy_uj``
  (package zones only; their sub-zones are parts of them), with wraparound at
  ``max_energy_range_uj``. Reading needs permission (root-only since Linux 5.10).
* :class:`Ina3221Meter` — Jetson INA3221 power monitors. The older L4T driver
  (``ina3221x``, TX2/Xavier): ``sys/bus/i2c/drivers/ina3221x/*/iio:device*/in_power<k>_input``
  in mW. The mainline hwmon driver (Orin, JetPack 5+): ``sys/class/hwmon/hwmon*/`` whose
  ``name`` is ``ina3221``, with ``in<k>_input`` bus volts in mV and ``curr<k>_input`` in mA
  (k = 1..3). Power is sampled at every read and integrated over time (trapezoids).
* :class:`PmicMeter` — Raspberry Pi 5 PMIC: the output of ``vcgencmd pmic_read_adc``
  (``<RAIL>_A current(i)=...A`` and ``<RAIL>_V volt(i)=...V`` lines); power is the sum of
  V×I over rails that have both, integrated over time.
* :class:`ModelMeter` — CPU seconds of this process × a platform's wattage from
  :data:`CALIBRATION_W` (an estimate, stated as such).

A meter: ``start()``, then ``joules()`` = energy since ``start()``.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# Watts drawn per busy CPU-second, by platform: the modelled meter's calibration table.
# Rough package-level figures (busy core(s) under a numpy workload), not measurements of
# this machine: the modelled meter is an estimate and reports itself as one.
CALIBRATION_W = {
    "host": 15.0,          # x86_64 server/desktop core, package share
    "rpi4": 3.5,           # Cortex-A72 board, one busy core over idle
    "rpi5": 4.5,           # Cortex-A76 board
    "jetson-orin": 6.0,    # Cortex-A78AE cluster, CPU rail
}


class MeterUnavailable(Exception):
    """This meter has no counter or rail on this machine (or may not read it)."""


class Meter:
    name = "meter"
    estimate = False

    def __init__(self) -> None:
        self._start: float | None = None

    def describe(self) -> str:
        return self.name

    def start(self) -> None:
        raise NotImplementedError

    def joules(self) -> float:
        raise NotImplementedError


def _read_int(path: str | Path) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _read_float(path: str | Path) -> float:
    with open(path) as f:
        return float(f.read().strip())


class RaplMeter(Meter):
    name = "rapl"

    def __init__(self, root: str | Path = "/") -> None:
        super().__init__()
        base = Path(root) / "sys/class/powercap"
        zones = sorted(p for p in glob.glob(str(base / "intel-rapl:*"))
                       if re.fullmatch(r"intel-rapl:\d+", os.path.basename(p)))
        if not zones:
            raise MeterUnavailable(f"no RAPL package zones under {base}")
        self.zones = []
        for z in zones:
            try:
                _read_int(os.path.join(z, "energy_uj"))
                top = _read_int(os.path.join(z, "max_energy_range_uj"))
            except PermissionError:
                raise MeterUnavailable(f"{z}/energy_uj is not readable (needs root)") from None
            except (OSError, ValueError) as e:
                raise MeterUnavailable(f"{z}: {e}") from None
            self.zones.append((z, top))
        self._last: list[int] = []
        self._total_uj = 0

    def describe(self) -> str:
        return f"rapl ({', '.join(os.path.basename(z) for z, _ in self.zones)})"

    def start(self) -> None:
        self._last = [_read_int(os.path.join(z, "energy_uj")) for z, _ in self.zones]
        self._total_uj = 0

    def joules(self) -> float:
        for i, (z, top) in enumerate(self.zones):
            cur = _read_int(os.path.join(z, "energy_uj"))
            prev = self._last[i]
            self._total_uj += cur - prev if cur >= prev else cur + (top - prev)  # wrapped
            self._last[i] = cur
        return self._total_uj / 1e6


class _Integrating(Meter):
    """Power sampled at each read, integrated over wall time (trapezoid rule)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._t = 0.0
        self._p = 0.0
        self._j = 0.0

    def watts(self) -> float:
        raise NotImplementedError

    def start(self) -> None:
        self._t, self._p, self._j = self.clock(), self.watts(), 0.0

    def joules(self) -> float:
        t, p = self.clock(), self.watts()
        self._j += 0.5 * (p + self._p) * max(0.0, t - self._t)
        self._t, self._p = t, p
        return self._j


class Ina3221Meter(_Integrating):
    name = "ina3221"

    def __init__(self, root: str | Path = "/", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        r = Path(root)
        self.power_files = sorted(glob.glob(str(r / "sys/bus/i2c/drivers/ina3221x/*/iio:device*/"
                                                    "in_power[0-9]_input")))
        self.pairs: list[tuple[str, str]] = []
        for hw in sorted(glob.glob(str(r / "sys/class/hwmon/hwmon*"))):
            try:
                if Path(hw, "name").read_text().strip() != "ina3221":
                    continue
            except OSError:
                continue
            for k in (1, 2, 3):
                v, c = os.path.join(hw, f"in{k}_input"), os.path.join(hw, f"curr{k}_input")
                if os.path.exists(v) and os.path.exists(c):
                    self.pairs.append((v, c))
        if not self.power_files and not self.pairs:
            raise MeterUnavailable(f"no INA3221 rails under {r / 'sys'} (ina3221x iio or hwmon)")
        try:
            self.watts()
        except (OSError, ValueError) as e:
            raise MeterUnavailable(f"INA3221 rails not readable: {e}") from None

    def describe(self) -> str:
        n = len(self.power_files) + len(self.pairs)
        return f"ina3221 ({n} rails, {'iio in_power' if self.power_files else 'hwmon V*I'})"

    def watts(self) -> float:
        mw = sum(_read_float(p) for p in self.power_files)
        mw += sum(_read_float(v) * _read_float(c) / 1000.0 for v, c in self.pairs)  # mV*mA/1000
        return mw / 1000.0


_PMIC = re.compile(r"^\s*(?P<rail>\S+?)_(?P<kind>[AV])\s+(?:current|volt|voltage)\(\d+\)="
                   r"(?P<val>[-+0-9.eE]+)[AV]\s*$")
_PMIC_EQ = re.compile(r"^\s*(?P<rail>\S+?)_(?P<kind>[AV])=(?P<val>[-+0-9.eE]+)[AV]\s*$")


def parse_pmic_adc(text: str) -> dict[str, tuple[float, float]]:
    """``vcgencmd pmic_read_adc`` output -> {rail: (amps, volts)} for rails with both."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _PMIC.match(line) or _PMIC_EQ.match(line)
        if m:
            (amps if m["kind"] == "A" else volts)[m["rail"]] = float(m["val"])
    return {r: (amps[r], volts[r]) for r in sorted(amps) if r in volts}


class PmicMeter(_Integrating):
    name = "pmic"

    def __init__(self, root: str | Path = "/", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        r = Path(root)
        cands = [r / "usr/bin/vcgencmd", r / "opt/vc/bin/vcgencmd"]
        self.tool = next((str(p) for p in cands if os.access(p, os.X_OK)), None)
        if self.tool is None:
            raise MeterUnavailable(f"no vcgencmd under {r} (usr/bin or opt/vc/bin)")
        try:
            rails = parse_pmic_adc(self._read())
        except (OSError, subprocess.SubprocessError) as e:
            raise MeterUnavailable(f"{self.tool} pmic_read_adc failed: {e}") from None
        if not rails:
            raise MeterUnavailable(f"{self.tool} pmic_read_adc gave no rails (not a Pi 5?)")
        self.rails = list(rails)

    def _read(self) -> str:
        return subprocess.run([self.tool, "pmic_read_adc"], capture_output=True, text=True,
                              timeout=5, check=True).stdout

    def describe(self) -> str:
        return f"pmic (vcgencmd pmic_read_adc, {len(self.rails)} rails)"

    def watts(self) -> float:
        return sum(a * v for a, v in parse_pmic_adc(self._read()).values())


def detect_platform(root: str | Path = "/") -> str:
    """host / rpi4 / rpi5 / jetson-orin, from the device-tree model when there is one."""
    try:
        model = Path(root, "proc/device-tree/model").read_bytes().decode(errors="replace")
    except OSError:
        model = ""
    if "Raspberry Pi 5" in model:
        return "rpi5"
    if "Raspberry Pi 4" in model:
        return "rpi4"
    if "Orin" in model or "Jetson" in model:
        return "jetson-orin"
    return "host"


class ModelMeter(Meter):
    """CPU seconds × watts: an estimate. ``cpu_time`` may be injected (tests)."""

    name = "model"
    estimate = True

    def __init__(self, platform_name: str | None = None, watts: float | None = None,
                 cpu_time: Callable[[], float] | None = None, root: str | Path = "/") -> None:
        super().__init__()
        self.platform = platform_name or detect_platform(root)
        if watts is None and self.platform not in CALIBRATION_W:
            raise MeterUnavailable(f"no calibration for platform {self.platform!r}")
        self.watts = float(watts if watts is not None else CALIBRATION_W[self.platform])
        self.cpu_time = cpu_time or time.process_time
        self._c0 = 0.0

    def describe(self) -> str:
        return f"model (estimate: CPU seconds x {self.watts:g} W, platform {self.platform})"

    def start(self) -> None:
        self._c0 = self.cpu_time()

    def joules(self) -> float:
        return (self.cpu_time() - self._c0) * self.watts


class TickClock:
    """A deterministic CPU clock for tests: advances ``per_read`` seconds at every read."""

    def __init__(self, per_read: float) -> None:
        self.per_read, self.t = float(per_read), 0.0

    def __call__(self) -> float:
        self.t += self.per_read
        return self.t


READERS = {"rapl": RaplMeter, "ina3221": Ina3221Meter, "pmic": PmicMeter}


def probe(root: str | Path = "/") -> dict[str, str]:
    """Every reader: 'available: <what>' or 'absent: <why>' (nothing is faked)."""
    out = {}
    for name, cls in READERS.items():
        try:
            out[name] = f"available: {cls(root).describe()}"
        except MeterUnavailable as e:
            out[name] = f"absent: {e}"
    try:
        out["model"] = f"available: {ModelMeter(root=root).describe()}"
    except MeterUnavailable as e:
        out["model"] = f"absent: {e}"
    return out


def make_meter(spec: str | dict = "auto", root: str | Path = "/") -> Meter:
    """``auto`` (the first real reader present, else the model), a reader's name, or a
    dict ``{"kind": "model", "watts": W, "tick_s": S}`` (a deterministic model for tests)."""
    if isinstance(spec, dict):
        kind = spec.get("kind", "model")
        if kind != "model":
            return make_meter(kind, spec.get("root", root))
        clock = TickClock(spec["tick_s"]) if spec.get("tick_s") else None
        return ModelMeter(spec.get("platform"), spec.get("watts"), clock, root)
    if spec == "auto":
        for cls in READERS.values():
            try:
                return cls(root)
            except MeterUnavailable:
                continue
        return ModelMeter(root=root)
    if spec == "model":
        return ModelMeter(root=root)
    if spec in READERS:
        return READERS[spec](root)
    raise ValueError(f"unknown meter {spec!r}; choose auto, {', '.join(READERS)} or model")
