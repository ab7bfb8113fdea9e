"""The HTTP API (FastAPI; imported only when a daemon starts — the ``daemon`` extra).

    POST /infer     {"x": [[...]] | "b64": "...", "shape": [n, ...], "dtype": "float32",
                     "task"?: name, "threshold"?: 0.5, "logits"?: false}
    POST /samples   {"task": name, "x" | "b64"+"shape", "y": [labels] | label}   (stored before the answer)
    POST /learn     {"task"?: name, "force"?: false}                          (202: a job is queued)
    POST /rollback  {"to"?: version}
    GET  /status, /metrics (Prometheus text), /healthz (alive), /readyz (bundle loaded)

Every bad input is a 4xx whose JSON body's ``detail`` says what was wrong (422 a bad
value or shape, 404 an unknown task, 413 a body over ``server.max_body_bytes``, 401 a
missing token on TCP); a full queue, a full disk or a daemon still loading is 503 with
the reason; a conflicting request (a job running) is 409.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, UnknownTaskError
from .core import Busy, Conflict, Daemon, NotFound
from .store import StoreError, StoreFull

PATHS = ("/infer", "/samples", "/learn", "/rollback", "/status", "/metrics", "/healthz", "/readyz")
OPEN_PATHS = ("/healthz", "/readyz")  # probes answer without the TCP token
MAX_DIMS = 8


class Tensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: list[Any] | None = Field(None, description="a batch [n, ...] (or one input) as nested lists")
    b64: str | None = Field(None, description="base64 of the batch's little-endian bytes, C order")
    shape: list[StrictInt] | None = Field(None, description="the shape of b64's batch")
    dtype: Literal["float32", "int64"] = "float32"


class InferRequest(Tensor):
    task: str | None = Field(None, min_length=1, max_length=128)
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    logits: StrictBool = False


class SamplesRequest(Tensor):
    task: str = Field(min_length=1, max_length=128)
    y: list[StrictInt] | StrictInt


class LearnRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str | None = Field(None, min_length=1, max_length=128)
    force: StrictBool = False


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: StrictInt | None = Field(None, ge=1)


def to_array(t: Tensor) -> np.ndarray:
    """The request's batch as an array, or an InputError saying what is wrong with it."""
    if (t.x is None) == (t.b64 is None):
        raise InputError("give exactly one of `x` (nested lists) or `b64` (with `shape`)")
    if t.x is not None:
        if t.shape is not None:
            raise InputError("`shape` goes with `b64`; `x` carries its own shape")
        try:
            a = np.asarray(t.x)
        except (ValueError, TypeError, RecursionError) as e:
            raise InputError(f"x is not a rectangular array of numbers: {e}") from None
        if a.dtype.kind not in "fiu":
            names = {"b": "booleans", "U": "strings", "O": "mixed or missing values"}
            what = names.get(a.dtype.kind, str(a.dtype))
            raise InputError(f"x holds {what}; expected numbers")
        if a.ndim > MAX_DIMS:
            raise InputError(f"x has {a.ndim} dimensions; at most {MAX_DIMS}")
        if a.size == 0:
            raise InputError(f"x is empty (shape {a.shape})")
        if a.dtype.kind == "f" or t.dtype == "float32":
            with np.errstate(over="ignore", invalid="ignore"):
                f = a.astype(np.float32)
            if a.dtype.kind == "f" and not np.isfinite(f).all():
                bad = "NaN" if np.isnan(a.astype(np.float64)).any() else "infinite or beyond float32's range"
                raise InputError(f"x holds {bad} values")
            return f
        return a.astype(np.int64)
    if t.shape is None:
        raise InputError("`b64` needs `shape` (e.g. [1, 64])")
    if not 1 <= len(t.shape) <= MAX_DIMS or min(t.shape) < 1:
        raise InputError(f"shape {t.shape}: 1 to {MAX_DIMS} positive dimensions")
    try:
        raw = base64.b64decode(t.b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"b64 is not valid base64: {e}") from None
    dt = np.dtype("<f4" if t.dtype == "float32" else "<i8")
    n = int(np.prod(t.shape, dtype=np.float64))
    if len(raw) != n * dt.itemsize:
        raise InputError(f"b64 holds {len(raw)} bytes; shape {t.shape} of {t.dtype} needs {n * dt.itemsize}")
    a = np.frombuffer(raw, dtype=dt).reshape(t.shape)
    if dt.kind == "f" and not np.isfinite(a).all():
        raise InputError("b64 holds NaN or infinite values")
    return a.astype(dt.newbyteorder("="), copy=False)


def _batch(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One input of the model's shape becomes a batch of one; a flat [n, prod(shape)] batch
    is reshaped (the session names the model's shape when neither fits)."""
    if a.shape == shape:
        return a[None]
    if a.ndim == 2 and a.shape[1] == int(np.prod(shape)) and a.shape[1:] != shape:
        return a.reshape(len(a), *shape)
    if a.ndim == 1 and a.size == int(np.prod(shape)):
        return a.reshape(1, *shape)
    return a


def _detail(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        if e.get("type") == "json_invalid":
            pos = e.get("loc", ("body", "?"))[-1]
            why = e.get("ctx", {}).get("error", "?")
            parts.append(f"the body is not valid JSON (at character {pos}: {why})")
            continue
        if tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing":
            parts.append("the request needs a JSON object as its body")
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = len(err.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class _Metrics:
    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgecl_requests", "HTTP requests answered", ["path", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("edgecl_request_duration_seconds", "time to answer a request", ["path"],
                                 buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                                          0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=self.registry)
        self.registry.register(_DaemonCollector(daemon))


class _DaemonCollector:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def describe(self) -> list:
        return []

    def collect(self):
        d = self.d
        s = d.session
        yield GaugeMetricFamily("edgecl_samples_stored", "labelled samples in the store",
                                value=d.counters["samples_stored"])
        c = CounterMetricFamily("edgecl_learning_runs", "learning job runs by outcome", labels=["outcome"])
        for outcome in ("committed", "rejected", "failed", "paused", "interrupted"):
            c.add_metric([outcome], d.counters["learning_runs"].get(outcome, 0))
        yield c
        yield CounterMetricFamily("edgecl_learning_energy_joules", "joules drawn by learning (store total)",
                                  value=d.store.energy_total())
        yield GaugeMetricFamily("edgecl_learning_peak_rss_bytes", "largest peak RSS of a learning child",
                                value=d.peak_rss_bytes)
        yield GaugeMetricFamily("edgecl_learning_running", "1 while a learning job runs",
                                value=1 if d.job_id is not None else 0)
        yield GaugeMetricFamily("edgecl_bundle_version", "the bundle version being served",
                                value=s.bundle.version if s else 0)
        yield GaugeMetricFamily("edgecl_tasks", "tasks in the served version", value=len(s.tasks) if s else 0)
        yield CounterMetricFamily("edgecl_hot_swaps", "sessions swapped in without a restart",
                                  value=d.counters["swaps"])
        yield CounterMetricFamily("edgecl_rollbacks", "rollbacks committed", value=d.counters["rollbacks"])
        yield GaugeMetricFamily("edgecl_ready", "1 once the bundle is loaded", value=1 if s else 0)


def _json(status: int, detail: str, **extra) -> tuple[int, bytes]:
    return status, json.dumps({"detail": detail, **extra}).encode()


class Guard:
    """The ASGI layer in front of the app: the TCP token, the in-flight limit, the body
    size limit (checked before the app reads anything: Content-Length first, then the
    bytes as they come), and the request metrics. The body is read whole here (it is at
    most ``max_body_bytes``) and replayed to the app."""

    def __init__(self, app, metrics: _Metrics, *, max_body: int, max_in_flight: int,
                 token: str | None = None) -> None:
        self.app, self.metrics = app, metrics
        self.max_body, self.max_in_flight = max_body, max_in_flight
        self.token = token.encode() if token else None
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        label = path if path in PATHS else "other"
        status = {"code": 500}

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def answer(code: int, body: bytes, headers: list | None = None) -> None:
            await send_counted({"type": "http.response.start", "status": code,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
            await send_counted({"type": "http.response.body", "body": body})

        self.in_flight += 1
        try:
            if self.token is not None and path not in OPEN_PATHS:
                got = dict(scope.get("headers") or []).get(b"authorization", b"")
                if not hmac.compare_digest(got, b"Bearer " + self.token):
                    why = "missing or wrong bearer token (Authorization: Bearer ...)"
                    return await answer(*_json(401, why), [(b"www-authenticate", b"Bearer")])
            if self.in_flight > self.max_in_flight:
                return await answer(*_json(503, f"busy: {self.in_flight - 1} requests in flight (limit "
                                                f"{self.max_in_flight}, server.max_in_flight); retry later"))
            length = None
            for k, v in scope.get("headers") or []:
                if k == b"content-length":
                    try:
                        length = int(v)
                    except ValueError:
                        return await answer(*_json(400, f"bad Content-Length {v[:40]!r}"))
            if length is not None and length > self.max_body:
                return await answer(*_json(413, f"body of {length} bytes; the limit is {self.max_body} "
                                                "(server.max_body_bytes)"))
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return  # the client went away (a truncated body): nothing to answer
                body = msg.get("body", b"")
                size += len(body)
                if size > self.max_body:
                    return await answer(*_json(413, f"body over the limit of {self.max_body} bytes "
                                                    "(server.max_body_bytes)"))
                chunks.append(body)
                more = msg.get("more_body", False)
            if length is not None and size != length:
                return await answer(*_json(400, f"body of {size} bytes, Content-Length said {length}"))
            whole = b"".join(chunks)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": whole, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_counted)
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(label, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)


def make_app(daemon: Daemon, *, token: str | None = None, lifespan=None) -> Guard:
    """The daemon's ASGI app (FastAPI behind :class:`Guard`)."""
    app = FastAPI(title="edgecl daemon", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    metrics = _Metrics(daemon)
    cfg = daemon.cfg.server

    def err(status: int):
        async def handler(_request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)
        return handler

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _detail(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        cause = exc.__cause__
        if exc.status_code == 400 and cause is not None:  # FastAPI's "error parsing the body": say which
            what = ("nested too deeply" if isinstance(cause, RecursionError)
                    else f"{type(cause).__name__}: {cause}")
            detail = f"the body is not valid JSON ({what})"[:500]
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    for exc_type, status in ((InputError, 422), (UnknownTaskError, 404), (NotFound, 404), (Conflict, 409),
                             (Busy, 503), (StoreFull, 503), (StoreError, 503)):
        app.add_exception_handler(exc_type, err(status))

    @app.post("/infer")
    async def infer(req: InferRequest) -> dict:
        # on the event loop, one request at a time: the session's task activation is never shared
        s = daemon._session()
        x = _batch(to_array(req), tuple(s.input_shape))
        return daemon.infer(x, req.task, req.threshold, req.logits)

    @app.post("/samples")
    def samples(req: SamplesRequest) -> dict:
        # a thread: the store's commit waits for fsync, inference goes on meanwhile
        s = daemon._session()
        x = _batch(to_array(req), tuple(s.input_shape))
        y = np.asarray([req.y] if isinstance(req.y, int) else req.y, dtype=np.int64)
        return daemon.add_samples(req.task, x, y)

    @app.post("/learn", status_code=202)
    def learn(req: LearnRequest | None = None) -> dict:
        req = req or LearnRequest()
        return daemon.request_learning(req.task, req.force)

    @app.post("/rollback")
    def rollback(req: RollbackRequest | None = None) -> dict:
        return daemon.rollback((req or RollbackRequest()).to)

    @app.get("/status")
    def status() -> dict:
        return daemon.status()

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        s = daemon.session
        if s is None or not daemon.recovered:
            why = daemon.load_error or ("loading the bundle" if s is None
                                        else "recovering an interrupted job")
            return JSONResponse({"ready": False, "detail": why}, status_code=503)
        return JSONResponse({"ready": True, "version": s.bundle.version, "tasks": s.tasks})

    return Guard(app, metrics, max_body=cfg.max_body_bytes, max_in_flight=cfg.max_in_flight, token=token)
