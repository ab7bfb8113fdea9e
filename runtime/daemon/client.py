"""A small HTTP/1.1 client for the daemon over its Unix socket (or loopback TCP), on the
standard library alone: tests, ``edgecl bench daemon`` and deploy's checks use it, and a
device needs nothing more to call its daemon. One connection, kept alive.

    c = Client("/run/edgecl/daemon.sock")
    c.post("/infer", {"x": [[0.0] * 64]})      # -> (status, parsed JSON body)
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class Client:
    def __init__(self, socket_path: str | None = None, *, port: int | None = None, host: str = "127.0.0.1",
                 token: str | None = None, timeout: float = 30.0) -> None:
        if (socket_path is None) == (port is None):
            raise ValueError("give a socket path or a port")
        self.socket_path, self.port, self.host = socket_path, port, host
        self.token, self.timeout = token, timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.conn is None:
            if self.socket_path is not None:
                self.conn = _UnixConnection(str(self.socket_path), self.timeout)
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, raw body). Retries once on a connection the server closed."""
        h = {"Content-Type": "application/json", **(headers or {})}
        if self.token:
            h.setdefault("Authorization", f"Bearer {self.token}")
        for attempt in (0, 1):
            conn = self._connect()
            try:
                conn.request(method, path, body=body, headers=h)
                r = conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return r.status, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest,
                    BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data = self.request(method, path, body)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data.decode(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)

    def post(self, path: str, payload: Any = None) -> tuple[int, Any]:
        return self.call("POST", path, {} if payload is None else payload)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
