"""The daemon's configuration: four sections, every key with a default, read from TOML
(``tomllib``; ``tomli`` on Python 3.10) or JSON. An unknown section or key, or a value of
the wrong type, is an error naming the file and the key: a typo must not silently fall
back to a default on a device nobody watches."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeclError


class ConfigError(EdgeclError):
    """The daemon's configuration is unreadable or wrong."""


@dataclass
class ServerConfig:
    socket: str = ""  # default: <state_dir>/daemon.sock
    socket_mode: str = "0660"  # who may call: the owner and the socket's group
    socket_group: str = ""  # group that owns the socket (default: the process's)
    port: int = 0  # > 0: loopback TCP instead of the socket, and a bearer token is required
    host: str = "127.0.0.1"
    token: str = ""
    token_file: str = ""
    max_body_bytes: int = 1 << 20
    max_batch: int = 256
    max_in_flight: int = 64  # concurrent requests before 503
    providers: list[str] = field(default_factory=list)  # empty: the session times them and keeps the fastest
    threads: int = 1
    threshold: float = 0.5  # the router's confidence threshold when /infer names no task


@dataclass
class StoreConfig:
    state_dir: str = ""  # default: <bundle>.daemon next to the bundle
    max_pending_samples: int = 200_000  # samples not learned yet: above this, /samples is 503
    min_free_mb: float = 16.0  # free space the store's disk keeps: below it, /samples is 503


@dataclass
class PolicyConfig:
    enabled: bool = True  # False: learn only on POST /learn
    check_interval_s: float = 5.0
    min_samples: int = 200  # new samples of a task before it is learned
    min_per_class: int = 5
    idle_s: float = 10.0  # no /infer for this long
    require_mains: bool = True
    max_temp_c: float = 80.0
    energy_budget_j: float = 0.0  # joules learning may draw per energy_window_s; 0 = no limit
    energy_window_s: float = 86400.0
    retry_after_s: float = 600.0  # after a failed or rejected job of a task
    sysfs_root: str = "/"


@dataclass
class LearnConfig:
    method: str = "supsup"
    epochs: int | None = None
    ram_mb: float | None = 256.0
    energy_j: float | None = None  # per run: the learner checkpoints and pauses when spent
    holdout: float = 0.1
    min_holdout_acc: float = 0.8
    seed: int = 0
    meter: str = "auto"
    train_last: int | None = None
    batch_size: int = 32
    nice: int = 10  # the worker's niceness: inference keeps its latency while learning runs
    timeout_s: float = 3600.0
    max_attempts: int = 3  # a job interrupted this often (crashes, kills) fails
    debug_alloc_mb: float = 0.0  # learn()'s debugging aid: the child allocates this much extra


@dataclass
class Config:
    bundle: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    source: str = "defaults"

    @property
    def state_dir(self) -> Path:
        if self.store.state_dir:
            return Path(self.store.state_dir)
        b = Path(self.bundle).resolve()
        return b.parent / f"{b.name}.daemon"

    @property
    def socket_path(self) -> Path:
        return Path(self.server.socket) if self.server.socket else self.state_dir / "daemon.sock"

    def token(self) -> str:
        if self.server.token:
            return self.server.token
        if self.server.token_file:
            try:
                return Path(self.server.token_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"{self.source}: server.token_file {self.server.token_file}: {e}") from e
        return os.environ.get("EDGECL_DAEMON_TOKEN", "")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["server"]["token"] = "***" if self.server.token else ""
        return d


_SECTIONS = {"server": ServerConfig, "store": StoreConfig, "policy": PolicyConfig, "learn": LearnConfig}


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e}") from e
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
    try:
        import tomllib
    except ImportError:  # Python 3.10 (JetPack 6)
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"{path}: reading TOML needs Python 3.11+ or the tomli package; "
                              "or write the config as .json") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def _coerce(where: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against a dataclass field type (int, float, bool, str, list[str],
    and their ``| None``)."""
    text = str(typ)
    optional = "None" in text
    if value is None and optional:
        return None
    if "list" in text:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return value
    if "bool" in text:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if "float" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if "int" in text:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(data: dict, source: str = "config") -> Config:
    cfg = Config(source=source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(data).__name__}")
    for name, table in data.items():
        if name == "bundle":
            cfg.bundle = _coerce(f"{source}: bundle", table, str)
            continue
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; expected {', '.join(_SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        section = getattr(cfg, name)
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {name}.{key}; known: {', '.join(fields)}")
            setattr(section, key, _coerce(f"{source}: {name}.{key}", value, fields[key].type))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    s, st, p, ln = cfg.server, cfg.store, cfg.policy, cfg.learn
    src = cfg.source
    try:
        mode = int(s.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"{src}: server.socket_mode {s.socket_mode!r} is not an octal mode such as 0660"
                          ) from None
    if mode & ~0o777 or mode & 0o007:
        raise ConfigError(f"{src}: server.socket_mode {s.socket_mode}: others may not call the daemon "
                          "(use 0660 or 0600; the group says who may)")
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"{src}: server.port {s.port} is out of range")
    if s.port and s.host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(f"{src}: server.host {s.host!r}: TCP is served on loopback only")
    for key, v, lo in (("server.max_body_bytes", s.max_body_bytes, 1024),
                       ("server.max_batch", s.max_batch, 1), ("server.max_in_flight", s.max_in_flight, 1),
                       ("server.threads", s.threads, 1),
                       ("policy.min_samples", p.min_samples, 2), ("learn.batch_size", ln.batch_size, 1),
                       ("learn.max_attempts", ln.max_attempts, 1),
                       ("store.max_pending_samples", st.max_pending_samples, 1)):
        if v < lo:
            raise ConfigError(f"{src}: {key} must be at least {lo}, got {v}")
    from ..learn import METHODS  # the learner's own list: a method it gains is a method the daemon takes

    if ln.method not in METHODS:
        raise ConfigError(f"{src}: learn.method {ln.method!r}; choose from {', '.join(METHODS)}")
    if not 0.0 <= ln.holdout < 1.0:
        raise ConfigError(f"{src}: learn.holdout {ln.holdout} must be in [0, 1)")
    if ln.min_holdout_acc > 0 and ln.holdout == 0:
        raise ConfigError(f"{src}: learn.min_holdout_acc {ln.min_holdout_acc} needs held-out samples "
                          "(learn.holdout > 0), or set it to 0 to accept every learned task")
    if not 0.0 <= ln.min_holdout_acc <= 1.0:
        raise ConfigError(f"{src}: learn.min_holdout_acc {ln.min_holdout_acc} must be in [0, 1]")
    if not 0.0 <= s.threshold <= 1.0:
        raise ConfigError(f"{src}: server.threshold {s.threshold} must be in [0, 1]")


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """The config at ``path`` (or the defaults), then ``overrides`` as ``section.key``
    (dots spelled ``__``: ``server__socket="/tmp/s"``) or ``bundle``."""
    if path is None:
        data: dict = {}
        source = "defaults"
    else:
        data = _read(Path(path))
        source = str(path)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "bundle":
            data["bundle"] = value
            continue
        sec, _, name = key.partition("__")
        data.setdefault(sec, {})[name] = value
    return from_dict(data, source)
