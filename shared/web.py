"""What every service's HTTP edge shares: request ids, JSON errors, CORS, health and metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from .appkeys import METRICS, REDIS, SETTINGS, STORE, SUPERVISOR
from .errors import BodyTooLarge, ServiceError
from .tasks import Supervisor

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ReadinessCheck = Callable[[web.Application], Awaitable[None]]

REQUEST_ID_HEADER = "X-Request-ID"
READINESS_TIMEOUT = 1.0
# Every latency histogram's buckets (seconds): 1 ms to 5 s, one scale for every service.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def ascii_int(raw: str, max_digits: int) -> int | None:
    """`raw` as a number if it is 1 to `max_digits` ASCII digits, else None. Not
    `str.isdigit` alone: it also takes "²" (which `int()` refuses) and other scripts' digits."""
    if 0 < len(raw) <= max_digits and raw.isascii() and raw.isdigit():
        return int(raw)
    return None


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """The one error shape of every service: `{success: false, error, ...}`."""
    return web.json_response({"success": False, "error": message, **extra}, status=status)


def error_response(exc: ServiceError) -> web.Response:
    """The answer to a domain error: its status, message, fields, `retryable` and headers.
    The one place an error becomes HTTP (`error_middleware` calls it for every handler)."""
    if exc.log_event is not None:
        log.error(exc.log_event, error=str(exc))
    extra = exc.fields()
    if exc.retryable is not None:
        extra["retryable"] = exc.retryable
    response = json_error(exc.status, exc.public_message(), **extra)
    response.headers.update(exc.headers())
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer any domain error a handler (or an inner middleware) raises. Innermost but for
    the body limit, so the answer still passes through CORS and the request log."""
    try:
        return await handler(request)
    except ServiceError as exc:
        return error_response(exc)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or BodyTooLarge (`client_max_size` is `limit`: a body that declared no
    length is cut off while read)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(limit) from None


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id to every log line and turn every error into the JSON error shape."""
    request_id = request.headers.get(REQUEST_ID_HEADER, "")[:64] or uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        response = json_error(exc.status, exc.text or exc.reason or "error")
        for name in ("Allow", "Retry-After", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    except asyncio.CancelledError:
        # The client went away (handler cancellation): nginx's "client closed request".
        status = 499
        raise
    except Exception:
        log.exception("unhandled_error", method=request.method, path=request.path)
        response = json_error(500, "internal error")
    finally:
        if request.path not in ("/healthz", "/readyz", "/metrics"):
            log.info(
                "request",
                method=request.method,
                path=request.path,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def cors_middleware(origins: Iterable[str]) -> Callable[..., Any]:
    """CORS for the site's own origins only: echo an allowed Origin, never `*`."""
    allowed = frozenset(origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if origin not in allowed:
                return json_error(403, "origin not allowed")
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = (
                "Content-Type, Authorization, Last-Event-ID, X-Request-ID"
            )
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if origin in allowed and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    return middleware


def add_cors_headers(
    request: web.Request, response: web.StreamResponse, origins: Iterable[str]
) -> None:
    """CORS headers for a response the handler prepares itself (an SSE stream)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin in frozenset(origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


async def redis_ready(app: web.Application) -> None:
    await app[REDIS].ping()


async def mongo_ready(app: web.Application) -> None:
    store = app[STORE]
    await store.ping()
    if not store.indexes_ready:
        raise RuntimeError("indexes not created yet")


def add_ops_routes(
    app: web.Application,
    required: dict[str, ReadinessCheck] | None = None,
    watched: dict[str, ReadinessCheck] | None = None,
) -> None:
    """`/healthz` (alive: every supervised task running), `/readyz` (able to do its job) and
    `/metrics` (Prometheus): on the app's own port, or on OPS_PORT when it is set.

    `/readyz` answers 503 only when a `required` check fails: what this pod cannot do its job
    without. A `watched` backend that is down is reported (in the body and as
    `paypush_dependency_up`) but leaves the pod ready: a cluster-wide outage of a backend the
    service can work around (Redis for every service) must not take every pod out of its
    Service, which would turn a degraded system into a dead one (issue 15).
    """
    if required is None:
        required = {"mongodb": mongo_ready}
    if watched is None:
        watched = {"redis": redis_ready}
    everything = {**required, **watched}
    up = Gauge(
        "paypush_dependency_up",
        "1 when the last check of a backend passed (refreshed by /readyz and /metrics)",
        ["dependency", "required"],
        registry=app[METRICS],
    )

    async def run_checks(app: web.Application) -> dict[str, str]:
        results: dict[str, str] = {}

        async def run(name: str, check: ReadinessCheck) -> None:
            try:
                await asyncio.wait_for(check(app), READINESS_TIMEOUT)
            except Exception as exc:
                results[name] = f"down: {type(exc).__name__}"
            else:
                results[name] = "ok"
            up.labels(name, "true" if name in required else "false").set(
                1 if results[name] == "ok" else 0
            )

        await asyncio.gather(*(run(n, c) for n, c in everything.items()))
        return {name: results[name] for name in everything}

    async def healthz(request: web.Request) -> web.Response:
        supervisor = app.get(SUPERVISOR)
        tasks = supervisor.states() if supervisor is not None else {}
        healthy = supervisor is None or supervisor.healthy
        return web.json_response(
            {"status": "ok" if healthy else "unhealthy", "tasks": tasks},
            status=200 if healthy else 500,
        )

    async def readyz(request: web.Request) -> web.Response:
        results = await run_checks(app)
        ready = all(results[name] == "ok" for name in required)
        degraded = any(results[name] != "ok" for name in watched)
        return web.json_response(
            {
                "status": ("degraded" if degraded else "ready") if ready else "not ready",
                "checks": results,
                "required": list(required),
            },
            status=200 if ready else 503,
        )

    async def metrics(request: web.Request) -> web.Response:
        await run_checks(app)
        body = generate_latest(app[METRICS])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    routes = [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
    ]
    settings = app.get(SETTINGS)
    if settings is None or not settings.ops_port:
        app.router.add_routes(routes)
        return
    # OPS_PORT: health, readiness and metrics on an internal port of their own, which no
    # Ingress routes and only the kubelet and Prometheus reach (issue 15); the public port
    # answers 404 for them. Started after the app's own start-up, stopped at its cleanup.
    ops = web.Application()
    ops.router.add_routes(routes)
    runner = web.AppRunner(ops, access_log=None)

    async def start_ops(_app: web.Application) -> None:
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.ops_port).start()

    async def stop_ops(_app: web.Application) -> None:
        await runner.cleanup()

    app.on_startup.append(start_ops)
    app.on_cleanup.append(stop_ops)


def new_registry(app: web.Application) -> CollectorRegistry:
    """A metrics registry of this app's own (several apps may live in one test process),
    and the supervisor of its background tasks, whose restarts it counts."""
    registry = CollectorRegistry()
    app[METRICS] = registry
    app[SUPERVISOR] = Supervisor(registry)
    return registry
