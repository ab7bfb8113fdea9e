"""Starting Flower's processes for a fleet: the SuperLink (server), a SuperNode per device,
and ``flwr run`` of the fleet app (:mod:`.apps`). Flower is found next to this Python
(``pip install edgecl[fleet]``) or in ``$EDGECL_FLEET_BIN`` (a directory holding
``flower-superlink``, ``flower-supernode`` and ``flwr``, e.g. a Python 3.11 environment
beside a 3.10 device runtime, docs/fleet.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .sync import FleetError

APP_MODULE = "edgecl_fleet_app"
# every run-config key the server app reads (flwr run only overrides keys the app declares)
RUN_CONFIG = {"bundle": "", "trust-store": "", "key": "", "state-dir": "", "report": "", "mode": "sync",
              "rounds": 1, "min-nodes": 1, "wait-s": 60.0, "round-timeout-s": 60.0}


def flower_bin(name: str) -> str:
    """The path of Flower's executable ``name``; FleetError saying how to install it."""
    dirs = [os.environ.get("EDGECL_FLEET_BIN", ""), str(Path(sys.executable).parent)]
    for d in dirs:
        if d and (Path(d) / name).is_file():
            return str(Path(d) / name)
    found = shutil.which(name)
    if found:
        return found
    raise FleetError(f"Flower's {name!r} not found (looked in $EDGECL_FLEET_BIN, {dirs[1]} and PATH): "
                     "install it with pip install 'edgecl[fleet]' (flwr==1.42.0), or point "
                     "$EDGECL_FLEET_BIN at the bin directory of an environment that has it")


def flower_env(home: Path) -> dict[str, str]:
    """The environment of Flower's processes: its bin directory first on PATH (the
    SuperLink starts ``flower-superexec`` by name) and its own home (``$FLWR_HOME``)."""
    home.mkdir(parents=True, exist_ok=True)
    bindir = str(Path(flower_bin("flower-superlink")).parent)
    return dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), FLWR_HOME=str(home),
                PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0")


def write_app(app_dir: Path) -> Path:
    """The Flower app project ``flwr run`` packs: a pyproject naming the edgecl apps, and a
    one-line module importing them (the code itself is edgecl's, installed on both sides)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    cfg = "\n".join(f"{k} = {json.dumps(v)}" for k, v in RUN_CONFIG.items())
    (app_dir / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgecl-fleet"
version = "1.0.0"
description = "edgecl fleet: sync the tasks devices learn (docs/fleet.md)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgecl"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server"
clientapp = "{APP_MODULE}:client"

[tool.flwr.app.config]
{cfg}
""")
    # Flower checks the names by reading the module (an assignment or __all__), not importing it
    (app_dir / f"{APP_MODULE}.py").write_text("from edgecl.runtime.fleet.apps import client, server\n\n"
                                              '__all__ = ["client", "server"]\n')
    return app_dir


def write_connection(home: Path, address: str) -> None:
    """The ``flwr`` CLI's SuperLink connection (``$FLWR_HOME/config.toml``), insecure: loopback
    or a network the operator trusts (docs/fleet.md says what TLS needs)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\n'
                                      f'address = "{address}"\ninsecure = true\n')


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FleetError(f"the process serving {host}:{port} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FleetError(f"nothing answers on {host}:{port} after {timeout:g} s")


def _popen(cmd: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    # its own session: stopping the fleet stops Flower's children (superexec, apps) too
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_superlink(port: int, state: Path, *, host: str = "127.0.0.1", log: Path | None = None
                    ) -> subprocess.Popen:
    """A SuperLink on ``host:port`` (Flower 1.42 serves its Fleet, Control and runtime APIs
    there), its state in ``state/superlink.db`` so a restarted one knows its nodes."""
    env = flower_env(state / "flwr-home")
    cmd = [flower_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
           "--host", host, "--port", str(port), "--database", str(state / "superlink.db")]
    p = _popen(cmd, env, log)
    wait_port(host, port, 60, p)
    return p


def start_supernode(bundle: Path, server: str, *, port: int, key: Path, trust_store: Path,
                    home: Path, delay_s: float = 0.0, log: Path | None = None) -> subprocess.Popen:
    """A SuperNode for the device bundle ``bundle``, connected to the SuperLink at ``server``;
    its runtime API on loopback ``port``."""
    env = flower_env(home)
    cfg = (f'bundle="{Path(bundle).resolve()}" key="{Path(key).resolve()}" '
           f'trust-store="{Path(trust_store).resolve()}" delay-s={float(delay_s)}')
    cmd = [flower_bin("flower-supernode"), "--insecure", "--superlink", server, "--port", str(port),
           "--node-config", cfg]
    return _popen(cmd, env, log)


def run_fleet_app(state: Path, address: str, run_config: dict, *, timeout: float,
                  log: Path | None = None) -> int:
    """``flwr run`` the fleet app on the SuperLink at ``address`` and wait for it (--stream);
    returns flwr's exit code."""
    home = state / "flwr-cli"
    write_connection(home, address)
    app = write_app(state / "app")
    env = flower_env(home)
    conf = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    cmd = [flower_bin("flwr"), "run", str(app), "fleet", "--run-config", conf, "--stream"]
    out = open(log, "ab") if log else None  # noqa: SIM115
    try:
        return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    finally:
        if out:
            out.close()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Flower's SuperExec starts its own session, so a process
    group does not hold them all)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(procs: subprocess.Popen | list[subprocess.Popen], sig: int = signal.SIGTERM,
         timeout: float = 10) -> None:
    """Stop processes started here and every process below them: ``sig`` first, SIGKILL
    for whatever is left after ``timeout`` seconds (a SuperNode may take its time)."""
    procs = procs if isinstance(procs, list) else [procs]
    tree = {p.pid: [p.pid, *_descendants(p.pid)] for p in procs}
    for pids in tree.values():
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pids in tree.values():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        p.wait()
