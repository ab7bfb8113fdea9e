"""Progress: loss, samples/s, joules and RSS, on tqdm when it is installed (host extra),
else one line on stderr at most every second."""

from __future__ import annotations

import sys
import time


def rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``), or 0 off Linux."""
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak RSS of this process: ``VmHWM`` in /proc, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Progress:
    def __init__(self, total: int, done: int = 0, *, quiet: bool = False, desc: str = "learn") -> None:
        self.total, self.done, self.quiet = total, done, quiet
        self.t0 = time.monotonic()
        self.samples = 0
        self._last = 0.0
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm

                # tqdm's monitor thread wakes after 10 s and allocates: in the learning
                # child that makes a glibc arena (64 MiB of address space) the probe never
                # had, past RLIMIT_AS on a slow run. The bar refreshes on update() anyway.
                tqdm.monitor_interval = 0
                self.bar = tqdm(total=total, initial=done, desc=desc, unit="step", file=sys.stderr,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, loss: float, batch: int, joules: float) -> None:
        self.done += 1
        self.samples += batch
        if self.quiet:
            return
        dt = max(1e-9, time.monotonic() - self.t0)
        info = {"loss": f"{loss:.4f}", "samples/s": f"{self.samples / dt:.0f}",
                "J": f"{joules:.2f}", "rss": f"{rss_bytes() / 2**20:.0f}MiB"}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= 1.0 or self.done == self.total:
            self._last = now
            print(f"learn {self.done}/{self.total} " + " ".join(f"{k}={v}" for k, v in info.items()),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
