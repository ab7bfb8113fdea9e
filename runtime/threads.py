"""How many threads edgecl's numeric libraries use: the cores that are actually free.

torch, OpenBLAS/MKL (numpy's BLAS), OpenMP and TVM's runtime each start one thread per
core by default. On a busy device that oversubscribes the CPU and every thread waits for
the others: on a 2-core machine with one other busy process, host training took 101 s
with torch's default threads against 7.8 s with one.

The rule (``edgecl --threads N`` overrides it)::

    cores = CPUs this process may run on (sched_getaffinity; a cgroup CPU quota caps it)
    busy  = round(1-minute load average (/proc/loadavg) * cores / CPUs online)
    N     = max(1, cores - busy)

A user's own ``OMP_NUM_THREADS`` (a positive integer already in the environment) is kept
as the default instead. :func:`configure` writes N into ``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``TVM_NUM_THREADS``, so child processes
(the learner's child) inherit it, and libraries read it when they load: the CLI therefore
configures before numpy is imported. Where a BLAS is already loaded, ``threadpoolctl``
(when installed; it is not part of the device set) limits it; without it that BLAS keeps
its own count. A torch already imported gets ``torch.set_num_threads(N)``
(:func:`apply_torch`); a torch imported later reads ``OMP_NUM_THREADS``.

Device side: this module imports nothing beyond the standard library at load time.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS")
OPTION = "--threads"


@dataclass(frozen=True)
class Choice:
    n: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "free cores"
    cores: int
    busy: int
    blas: str = "env"  # how an already loaded BLAS was limited: env | threadpoolctl | unchanged

    def describe(self) -> str:
        """``1 (2 cores, 1 busy)``: the count and why (one line for ``edgecl inspect``)."""
        why = f"{self.cores} core{'s' if self.cores != 1 else ''}, {self.busy} busy"
        if self.source == "--threads":
            why = f"{OPTION} {self.n}; {why}"
        elif self.source != "free cores":
            why = f"{self.source}={self.n}; {why}"
        if self.blas == "unchanged":
            why += "; numpy's BLAS was loaded first and keeps its own count"
        return f"{self.n} ({why})"


_current: Choice | None = None
_ours: dict[str, str] = {}  # the values configure() itself wrote into os.environ
_blas_n: int | None = None  # the count in the environment when numpy (its BLAS) was loaded


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def load_average() -> float | None:
    """The 1-minute load average (runnable tasks, whole machine), or None where unknown."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_cores(cores: int | None = None, load: float | None = None) -> int:
    """Of ``cores``, how many other work keeps busy: the load average, scaled from all
    online CPUs to the ones this process may use."""
    cores = usable_cores() if cores is None else cores
    load = load_average() if load is None else load
    if not load:
        return 0
    online = max(os.cpu_count() or cores, cores)
    return min(cores, int(load * cores / online + 0.5))


def free_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores not kept busy by other work; at least 1."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores - busy_cores(cores, load))


def _env_threads() -> int | None:
    """A positive OMP_NUM_THREADS the user set (not one configure() wrote)."""
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not raw or _ours.get("OMP_NUM_THREADS") == raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


def choose(n: int | None = None) -> Choice:
    """The count :func:`configure` would apply, and why; changes nothing."""
    cores = usable_cores()
    busy = busy_cores(cores)
    if n is not None:
        if int(n) < 1:
            raise ValueError(f"threads must be at least 1, got {n}")
        return Choice(int(n), "--threads", cores, busy)
    env = _env_threads()
    if env is not None:
        return Choice(env, "OMP_NUM_THREADS", cores, busy)
    return Choice(max(1, cores - busy), "free cores", cores, busy)


def from_argv(argv: Sequence[str]) -> int | None:
    """The value of ``--threads N`` / ``--threads=N`` in a command line, if valid (argparse
    reports a bad one later); for start-up, before the parser (and numpy) is loaded."""
    value = None
    it = iter(argv)
    for arg in it:
        if arg == "--":
            break
        if arg == OPTION:
            value = next(it, None)
        elif arg.startswith(OPTION + "="):
            value = arg[len(OPTION) + 1:]
    try:
        n = int(value) if value is not None else None
    except ValueError:
        return None
    return n if n is not None and n >= 1 else None


def _limit_loaded_blas(n: int):
    """Limit the BLAS/OpenMP libraries already loaded (numpy imported before configure) to
    ``n`` threads with threadpoolctl: its limiter (to put them back), False where it is not
    installed, None where nothing was loaded yet (the environment variables suffice)."""
    global _blas_n
    if "numpy" not in sys.modules:
        _blas_n = n
        return None
    if _blas_n == n:
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    return threadpool_limits(limits=n)


def apply_torch(n: int | None = None) -> bool:
    """``torch.set_num_threads(n)`` (default: the configured count) if torch is imported;
    host commands call it after importing torch. True when torch was set."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "set_num_threads"):
        return False
    if n is None:
        n = current().n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return True


def _configure(n: int | None):
    global _current
    c = choose(n)
    for var in ENV_VARS:
        if n is not None or var not in os.environ or os.environ[var] == _ours.get(var):
            os.environ[var] = _ours[var] = str(c.n)
    limiter = _limit_loaded_blas(c.n)
    blas = "env" if limiter is None else "unchanged" if limiter is False else "threadpoolctl"
    _current = Choice(c.n, c.source, c.cores, c.busy, blas)
    apply_torch(c.n)
    return c.n, (None if limiter is False else limiter)


def configure(n: int | None = None) -> int:
    """Use ``n`` threads (None: the rule above) in this process and its children; returns
    the count. ``--threads`` overwrites the variables; the default fills only those the
    user did not set."""
    return _configure(n)[0]


def current() -> Choice:
    """The configured choice (or, before :func:`configure`, what it would choose)."""
    return _current or choose()


def describe() -> str:
    return current().describe()


@contextlib.contextmanager
def configured(n: int | None = None) -> Iterator[int]:
    """:func:`configure` for the duration of a block (a CLI command run in-process, as the
    tests do); the variables, torch's count and the BLAS limits are put back after."""
    global _current
    saved_env = {v: os.environ.get(v) for v in ENV_VARS}
    saved_ours, saved_current = dict(_ours), _current
    torch = sys.modules.get("torch")
    saved_torch = torch.get_num_threads() if hasattr(torch, "get_num_threads") else None
    limiter = None
    try:
        count, limiter = _configure(n)
        yield count
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        _ours.clear()
        _ours.update(saved_ours)
        _current = saved_current
        if saved_torch is not None:
            torch.set_num_threads(saved_torch)
        if limiter is not None:
            limiter.restore_original_limits()
