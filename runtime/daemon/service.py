"""The daemon process: the socket, uvicorn, readiness and the watchdog.

Start-up order: config -> store -> the listening socket (a Unix socket created with the
configured mode from the first instant, or loopback TCP with a token) -> uvicorn -> the
bundle loads in the background (``/healthz`` answers at once, the API once it is loaded)
-> an interrupted job is recovered -> ``/readyz`` answers 200 and ``READY=1`` goes to
systemd -> the learning thread. The watchdog thread sends ``WATCHDOG=1`` only while the
event loop's heartbeat is fresh, so a wedged loop gets the daemon restarted
(``Restart=on-failure``). SIGTERM (systemctl stop) stops uvicorn gracefully; a running
learning worker is killed and its job resumes at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

from ..errors import EdgeclError
from .config import Config, ConfigError, load_config
from .notify import notify, watchdog_interval


def listen_unix(path: Path, mode: int, group: str = "") -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode`` (and ``group``) from its creation:
    the umask is set around bind, so there is no instant where others may connect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise EdgeclError(f"{path}: exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a stale socket of a daemon that died
        else:
            raise EdgeclError(f"{path}: another daemon is serving on this socket")
        finally:
            probe.close()
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise EdgeclError(f"server.socket_group {group!r}: no such group") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if gid >= 0:
        os.chown(path, -1, gid)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(cfg: Config, *, log=None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    try:
        import uvicorn
    except ImportError as e:
        raise EdgeclError(f"the daemon needs its web stack: pip install 'edgecl[daemon]' ({e})") from None
    from .api import make_app
    from .core import Daemon

    say = log or (lambda msg: print(f"edgecl daemon: {msg}", file=sys.stderr, flush=True))
    token = None
    if cfg.server.port:
        token = cfg.token()
        if len(token) < 16:
            raise ConfigError(f"{cfg.source}: TCP (port {cfg.server.port}) needs a bearer token of at least "
                              "16 characters: server.token, server.token_file or $EDGECL_DAEMON_TOKEN")
    daemon = Daemon(cfg)
    if cfg.server.port:
        sock = listen_tcp(cfg.server.host, cfg.server.port)
        where = f"http://{cfg.server.host}:{sock.getsockname()[1]} (bearer token required)"
    else:
        sock = listen_unix(cfg.socket_path, int(cfg.server.socket_mode, 8), cfg.server.socket_group)
        ours = os.stat(cfg.socket_path).st_ino  # removed at exit only if still ours
        where = f"unix:{cfg.socket_path} (mode {cfg.server.socket_mode})"
    heartbeat = {"t": time.monotonic()}
    stopping = threading.Event()

    async def beat() -> None:
        while True:
            heartbeat["t"] = time.monotonic()
            await asyncio.sleep(0.5)

    def load() -> None:
        t0 = time.monotonic()
        try:
            daemon.load()
        except Exception as e:  # reported by /readyz and the log; the process stays up for diagnosis
            say(f"cannot load {cfg.bundle}: {e}")
            notify(f"STATUS=cannot load the bundle: {e}")
            return
        try:
            for note in daemon.recover():
                say(f"recovered {note}")
        except Exception as e:  # reported; the daemon serves the bundle as it is
            daemon.recovered = True
            say(f"recovering interrupted jobs failed: {type(e).__name__}: {e}")
        s = daemon.session
        say(f"serving {daemon.root} version {s.bundle.version} ({len(s.tasks)} tasks; {s.describe()}) on "
            f"{where}; loaded in {time.monotonic() - t0:.2f} s")
        notify(f"READY=1\nSTATUS=serving version {s.bundle.version} on {where}\nMAINPID={os.getpid()}")
        if not stopping.is_set():
            daemon.start()

    def watchdog() -> None:
        every = watchdog_interval()
        if every is None:
            return
        limit = every * 2
        while not stopping.wait(every):
            if time.monotonic() - heartbeat["t"] < limit:
                notify("WATCHDOG=1")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        tasks = [asyncio.create_task(beat())]
        threading.Thread(target=load, name="edgecl-load", daemon=True).start()
        threading.Thread(target=watchdog, name="edgecl-watchdog", daemon=True).start()
        try:
            yield
        finally:
            stopping.set()
            notify("STOPPING=1")
            for t in tasks:
                t.cancel()
            await asyncio.to_thread(daemon.stop)

    app = make_app(daemon, token=token, lifespan=lifespan)
    config = uvicorn.Config(app, log_level=os.environ.get("EDGECL_DAEMON_LOG", "warning"), access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on", server_header=False,
                            date_header=False, h11_max_incomplete_event_size=64 * 1024)
    server = uvicorn.Server(config)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, with the handlers it found
    # installed: make those a no-op, so the socket is removed and the store closed below, and
    # a stop is exit code 0 rather than death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        if not cfg.server.port:
            with contextlib.suppress(OSError):
                if os.stat(cfg.socket_path).st_ino == ours:
                    cfg.socket_path.unlink()
        sock.close()
        daemon.store.close()
    return 0 if server.started else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", help="bundle directory (or `bundle` in the config)")
    p.add_argument("--socket", metavar="PATH", help="Unix socket (default: server.socket, else "
                                                    "<state_dir>/daemon.sock)")
    p.add_argument("--port", type=int, metavar="N", help="serve on loopback TCP instead (needs a token)")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON config (deploy/daemon.example.toml)")
    p.add_argument("--state-dir", metavar="DIR", help="where the sample store and job files live")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {"bundle": args.bundle, "server__socket": args.socket, "server__port": args.port,
                 "store__state_dir": getattr(args, "state_dir", None)}
    return load_config(args.config, **overrides)


def run_args(args: argparse.Namespace) -> int:
    return serve(config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgecl daemon", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_args(args)
    except EdgeclError as e:
        print(f"edgecl daemon: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
