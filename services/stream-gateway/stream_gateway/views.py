"""HTTP views of the gateway: the status stream and the stats."""

from __future__ import annotations

import asyncio
import random
import time

import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pymongo.errors import PyMongoError

from shared.appkeys import SETTINGS
from shared.model import StatusEvent, is_valid_uuid
from shared.settings import Settings
from shared.web import add_cors_headers, json_error

from .appkeys import GATEWAY_METRICS, HUB, STATUS_READER, STREAMS
from .hub import Listener
from .metrics import GatewayMetrics

log = structlog.get_logger(__name__)

# A client that does not take a write for this long is cut off (aiohttp-sse also sets it as
# TCP_USER_TIMEOUT, so a vanished peer is noticed at the first unacknowledged write).
SEND_TIMEOUT_SECONDS = 30.0
# Browsers reconnect after `retry` ms: spread them so a restart is not a thundering herd.
RETRY_JITTER = 0.25


async def stream_status(request: web.Request) -> web.StreamResponse:
    """`GET /api/webhooks/stream?uuid=`: the session's status now, then every change."""
    app = request.app
    uuid = request.query.get("uuid", "")
    if not is_valid_uuid(uuid):
        return json_error(400, "`uuid` must be a session uuid (uuid4)")
    hub = app[HUB]
    if hub.closing:
        return json_error(503, "shutting down, connect again", retryable=True)
    after = _last_event_id(request)
    listener = Listener(uuid, after_version=after or 0)
    # Subscribe first, then read: a change landing in between is queued, never lost.
    await hub.join(listener)
    try:
        try:
            status = await app[STATUS_READER].read(uuid)
        except PyMongoError as exc:
            log.warning("status_unavailable", uuid=uuid, error=str(exc))
            return json_error(503, "status unavailable, try again", retryable=True)
        if status is None:
            return json_error(404, "no session with this uuid")
        if status.status.terminal and after is not None and status.version <= after:
            # Final and already seen: 204 tells EventSource to stop reconnecting.
            return web.Response(status=204)
        listener.offer(status)
        return await _stream(request, listener)
    finally:
        hub.leave(listener)


async def _stream(request: web.Request, listener: Listener) -> EventSourceResponse:
    app = request.app
    settings = app[SETTINGS]
    metrics = app[GATEWAY_METRICS]
    stream = EventSourceResponse(
        ping_interval=settings.sse_keepalive_seconds, send_timeout=SEND_TIMEOUT_SECONDS
    )
    add_cors_headers(request, stream, settings.cors_origins)
    await stream.prepare(request)
    streams = app[STREAMS]
    streams.add(stream)
    # The stream ends when the client goes or shutdown stops it: wake the listener then.
    gone = asyncio.ensure_future(stream.wait())
    gone.add_done_callback(lambda _: listener.close())
    deadline = asyncio.timeout(settings.sse_max_wait_seconds)
    try:
        async with stream, deadline:
            await _pump(stream, listener, settings, metrics)
    except TimeoutError:
        if not deadline.expired():
            raise
        log.info("stream_max_wait", uuid=listener.uuid)
    except ConnectionResetError:
        log.info("stream_client_gone", uuid=listener.uuid)
    finally:
        streams.discard(stream)
        gone.cancel()
    return stream


async def _pump(
    stream: EventSourceResponse, listener: Listener, settings: Settings, metrics: GatewayMetrics
) -> None:
    retry: int | None = round(
        settings.sse_retry_ms * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
    )
    if not listener.pending:
        # Nothing new for a resuming client: still hand it the reconnect hint.
        await stream.write(f"retry: {retry}{stream.DEFAULT_SEPARATOR * 2}".encode())
        retry = None
    while (item := await listener.next()) is not None:
        event, pushed = item
        await stream.send(event.to_json(), id=str(event.version), retry=retry)
        retry = None
        _delivered(metrics, event, pushed)
        if event.status.terminal:
            return


def _delivered(metrics: GatewayMetrics, event: StatusEvent, pushed: bool) -> None:
    metrics.events.labels("push" if pushed else "read").inc()
    if pushed:
        metrics.latency.observe(max(0.0, time.time() - event.updated_at.timestamp()))


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", "").strip()
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


async def stats(request: web.Request) -> web.Response:
    """`GET /api/stats`: open streams and live subscriptions of this process."""
    hub = request.app[HUB]
    return web.json_response(
        {
            "success": True,
            "connectionCount": len(request.app[STREAMS]),
            "activeSubscriptions": hub.subscription_count,
            "pubsubConnected": hub.connected,
        }
    )
