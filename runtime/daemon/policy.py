"""When to learn: the trigger policy and what it reads from sysfs.

Every check is reported (``/status``), passed or not, with the value it saw and what it
needs, so a user can tell why a device has not learned yet. The readers take a root
path (default ``/``; tests point it at a fake tree) and never guess: a board without a
power-supply class or thermal zones says so, and the check then passes *as unknown*
(a Raspberry Pi has no ``/sys/class/power_supply`` at all — it is always on its supply).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import PolicyConfig
from .store import DONE, TaskSamples


@dataclass
class Check:
    ok: bool
    value: object
    need: str
    note: str = ""

    def as_dict(self) -> dict:
        d = {"ok": self.ok, "value": self.value, "need": self.need}
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class Decision:
    go: bool
    task: str | None
    checks: dict[str, Check] = field(default_factory=dict)
    candidates: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"go": self.go, "task": self.task, "checks": {k: c.as_dict() for k, c in self.checks.items()},
                "candidates": self.candidates}


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def power_state(root: str | Path = "/") -> tuple[bool | None, str]:
    """(on mains?, what was seen). ``None``: no power-supply class to tell."""
    base = Path(root) / "sys/class/power_supply"
    if not base.is_dir():
        return None, f"no {base}"
    seen, mains, batteries, discharging = [], False, 0, False
    for d in sorted(base.iterdir()):
        typ = _read(d / "type") or "?"
        online = _read(d / "online")
        status = _read(d / "status")
        seen.append(f"{d.name}:{typ}" + (f" online={online}" if online is not None else "")
                    + (f" status={status}" if status is not None else ""))
        if typ in ("Mains", "USB", "USB_C", "USB_PD", "USB_DCP", "USB_CDP", "USB_ACA") and online == "1":
            mains = True
        if typ == "Battery":
            batteries += 1
            discharging |= status == "Discharging"
    if not seen:
        return None, f"{base} is empty"
    if mains:
        return True, "; ".join(seen)
    # no supply online: a battery that charges (or is full) is on power all the same
    return (not discharging if batteries else None), "; ".join(seen)


def max_temperature_c(root: str | Path = "/") -> tuple[float | None, str]:
    """(hottest thermal zone in °C, which). ``None``: no thermal zones."""
    base = Path(root) / "sys/class/thermal"
    best: tuple[float, str] | None = None
    for d in sorted(base.glob("thermal_zone*")):
        raw = _read(d / "temp")
        try:
            t = int(raw) / 1000.0 if raw is not None else None
        except ValueError:
            t = None
        if t is None:
            continue
        name = _read(d / "type") or d.name
        if best is None or t > best[0]:
            best = (t, f"{d.name} ({name})")
    if best is None:
        return None, f"no readable {base}/thermal_zone*/temp"
    return best


class Policy:
    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg

    def decide(self, samples: dict[str, TaskSamples], *, bundle_tasks: list[str], last_infer: float,
               energy_spent: float, busy: bool, last_jobs: dict[str, dict], manual: bool = False,
               now: float | None = None) -> Decision:
        """Whether to learn now, and which task. ``samples`` per task in the store;
        ``last_jobs`` the newest job of each task; ``energy_spent`` the joules drawn by
        learning in the configured window; ``manual``: POST /learn (the sample count and
        idle checks are skipped, the safety checks are not)."""
        c = self.cfg
        now = time.time() if now is None else now
        checks: dict[str, Check] = {}
        candidates: dict[str, dict] = {}
        ready: list[tuple[int, str]] = []
        for name, ts in sorted(samples.items()):
            info = {"stored": ts.count, "classes": len(ts.per_class)}
            if name in bundle_tasks:
                info["state"] = "in the bundle (samples kept, not learned again)"
                candidates[name] = info
                continue
            last = last_jobs.get(name)
            # after a rejected or failed job, only samples that came since count as new
            new = ts.count - (last["n_samples"] if last is not None and last["state"] in DONE else 0)
            info["new"] = new
            small = min(ts.per_class.values()) if ts.per_class else 0
            why = []
            if len(ts.per_class) < 2:
                why.append(f"{len(ts.per_class)} class(es), a task needs 2")
            if small < c.min_per_class:
                why.append(f"a class has {small} sample(s), need {c.min_per_class}")
            if not manual and new < c.min_samples:
                why.append(f"{new} new sample(s), need {c.min_samples}")
            if last is not None and last["state"] in ("failed", "rejected") and last.get("finished"):
                wait = last["finished"] + c.retry_after_s - now
                if wait > 0 and not manual:
                    why.append(f"the last job {last['state']} ({last.get('error') or ''}); "
                               f"retry in {wait:.0f} s")
            if last is not None and last["state"] in ("queued", "running"):
                why.append(f"job {last['id']} is {last['state']}")
            info["ready"] = not why
            if why:
                info["waiting"] = why
            else:
                ready.append((new, name))
            candidates[name] = info
        task = max(ready)[1] if ready else None
        checks["samples"] = Check(task is not None, {k: v.get("new", 0) for k, v in candidates.items()},
                                  f">= {c.min_samples} new samples of a task not in the bundle, "
                                  f">= 2 classes, >= {c.min_per_class} per class"
                                  + (" (manual: the count is not required)" if manual else ""))
        idle = now - last_infer if last_infer else None
        checks["idle"] = Check(manual or idle is None or idle >= c.idle_s,
                               None if idle is None else round(idle, 1),
                               f">= {c.idle_s:g} s since the last /infer",
                               "manual trigger" if manual else ("no /infer yet" if idle is None else ""))
        if c.energy_budget_j > 0:
            checks["energy"] = Check(energy_spent < c.energy_budget_j, round(energy_spent, 3),
                                     f"< {c.energy_budget_j:g} J drawn in the last {c.energy_window_s:g} s")
        else:
            checks["energy"] = Check(True, round(energy_spent, 3), "no energy budget configured")
        mains, seen = power_state(c.sysfs_root)
        if c.require_mains:
            checks["power"] = Check(mains is not False, mains, "on mains power",
                                    seen if mains is not None else f"unknown, taken as mains ({seen})")
        else:
            checks["power"] = Check(True, mains, "not required", seen)
        temp, where = max_temperature_c(c.sysfs_root)
        checks["thermal"] = Check(temp is None or temp < c.max_temp_c, temp, f"< {c.max_temp_c:g} °C",
                                  where if temp is not None else f"unknown ({where})")
        checks["not_busy"] = Check(not busy, busy, "no learning job running")
        if not c.enabled and not manual:
            checks["enabled"] = Check(False, False, "policy.enabled (else only POST /learn)")
        go = all(ch.ok for ch in checks.values())
        return Decision(go, task, checks, candidates)
