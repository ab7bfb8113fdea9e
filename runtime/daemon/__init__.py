"""``edgecl daemon``: serve inference over a local socket, take labelled samples into a
durable store, learn new tasks when a policy says so, commit, hot-swap, roll back.

    python -m edgecl.runtime.daemon BUNDLE [--socket PATH | --port N] [--config FILE]

The package splits what needs the web stack from what does not, so the device runtime
imports without FastAPI/uvicorn (they are the optional ``daemon`` extra, imported only by
:mod:`.api` and :mod:`.service` when a daemon starts) and never imports torch:

- :mod:`.config`  the configuration (TOML or JSON), every knob with its default
- :mod:`.store`   the SQLite sample and job store (WAL, ``synchronous=FULL``)
- :mod:`.policy`  the trigger policy and its sysfs readers (power supply, thermal zones)
- :mod:`.core`    the daemon's state: the session, hot swap, the learning jobs
- :mod:`.worker`  the learning worker process (``edgecl.runtime.learn.learn``)
- :mod:`.notify`  systemd's notify protocol (READY=1, WATCHDOG=1) in a few lines
- :mod:`.api`     the FastAPI app; :mod:`.service` the process (socket, uvicorn, watchdog)
- :mod:`.client`  a small stdlib HTTP client over the Unix socket (tests, bench, deploy)

See ``docs/daemon.md``.
"""

from __future__ import annotations

from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
