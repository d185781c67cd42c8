"""HTTP views of the gateway: the status stream and the stats."""

from __future__ import annotations

import random
import time

import structlog
from aiohttp import web
from pymongo.errors import PyMongoError

from shared.appkeys import SETTINGS
from shared.errors import InvalidInput, NotFound
from shared.model import StatusEvent, is_valid_uuid
from shared.web import add_cors_headers, ascii_int

from .appkeys import ADMISSION, GATEWAY_METRICS, HUB, OPENING_READS, STREAMS
from .errors import StreamUnavailable
from .hub import Listener
from .metrics import GatewayMetrics
from .streams import SseStream

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
        raise InvalidInput("`uuid` must be a session uuid (uuid4)")
    hub = app[HUB]
    metrics = app[GATEWAY_METRICS]
    if hub.closing:
        metrics.rejected.labels("closing").inc()
        raise _unavailable(app, "shutting down, connect again")
    admission = app[ADMISSION]
    if not admission.try_enter():
        metrics.rejected.labels("full").inc()
        raise _unavailable(app, "this gateway holds all the streams it can, connect again")
    try:
        return await _admitted(request, uuid)
    finally:
        admission.leave()


def _unavailable(app: web.Application, message: str) -> StreamUnavailable:
    """503 before any stream starts, its `Retry-After` spread like the streams' `retry`."""
    retry_ms = app[SETTINGS].sse_retry_ms * random.uniform(1, 1 + 2 * RETRY_JITTER)
    return StreamUnavailable(message, retry_after=max(1, round(retry_ms / 1000)))


async def _admitted(request: web.Request, uuid: str) -> web.StreamResponse:
    app = request.app
    hub = app[HUB]
    after = _last_event_id(request)
    listener = Listener(uuid, after_version=after or 0)
    try:
        # Subscribe first, then read: a change landing in between is queued, never lost.
        # Inside the `try`: a browser that leaves during the join leaves nothing behind.
        await hub.join(listener)
        try:
            status = await app[OPENING_READS].read(uuid)
        except PyMongoError as exc:
            log.warning("status_unavailable", uuid=uuid, error=str(exc))
            raise _unavailable(app, "status unavailable, try again") from exc
        if status is None:
            raise NotFound("no session with this uuid")
        if status.status.terminal and after is not None and status.version <= after:
            # Final and already seen: 204 tells EventSource to stop reconnecting.
            return web.Response(status=204)
        listener.offer(status)
        return await _stream(request, listener)
    finally:
        hub.leave(listener)


async def _stream(request: web.Request, listener: Listener) -> SseStream:
    app = request.app
    settings = app[SETTINGS]
    metrics = app[GATEWAY_METRICS]
    hub = app[HUB]
    # Keep-alives and the cap come from the process's one task over `STREAMS`.
    stream = SseStream(send_timeout=SEND_TIMEOUT_SECONDS)
    add_cors_headers(request, stream, settings.cors_origins)
    await stream.prepare(request)
    streams = app[STREAMS]
    streams.add(stream)
    retry = round(settings.sse_retry_ms * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER))
    hint: list[int] = [retry]

    async def send(event: StatusEvent, pushed: bool) -> bool:
        """Write one event; True once the stream is over (final status, or client gone)."""
        try:
            await stream.send(
                event.to_json(), id=str(event.version), retry=hint.pop() if hint else None
            )
        except (ConnectionResetError, TimeoutError):
            # aiohttp-sse has stopped the stream already; the handler's wait() returns.
            return True
        except Exception:
            # Unforeseen: end the stream (the browser reconnects and reads the status)
            # rather than leave it open with nobody writing to it.
            log.exception("stream_write_failed", uuid=listener.uuid)
            stream.stop_streaming()
            return True
        _delivered(metrics, event, pushed)
        if event.status.terminal or hub.closing:
            # Shutting down: a stream that was still joining when `_close_streams` ran ends
            # here, after its first event (or it would hold the drain to the timeout).
            stream.stop_streaming()
            return True
        return False

    try:
        async with stream:
            if not listener.pending:
                # Nothing new for a resuming client: still hand it the reconnect hint.
                await stream.write(f"retry: {hint.pop()}{stream.DEFAULT_SEPARATOR * 2}".encode())
                if hub.closing:
                    stream.stop_streaming()
            await listener.start(send)
            # Until the client goes, a final status is written, shutdown stops the stream,
            # or the cap (SSE_MAX_WAIT_SECONDS) does.
            await stream.wait()
        if stream.expired:
            log.info("stream_max_wait", uuid=listener.uuid)
    except ConnectionResetError:
        log.info("stream_client_gone", uuid=listener.uuid)
    finally:
        streams.discard(stream)
        await listener.close()
    return stream


def _delivered(metrics: GatewayMetrics, event: StatusEvent, pushed: bool) -> None:
    metrics.events.labels("push" if pushed else "read").inc()
    if pushed:
        metrics.latency.observe(max(0.0, time.time() - event.updated_at.timestamp()))


def _last_event_id(request: web.Request) -> int | None:
    """The version the browser has: EventSource's `Last-Event-ID` on its own reconnects, else
    `?lastEventId=` — the page sends that when it opens a new EventSource after one gave up
    (a 503 from a stopping gateway), which cannot set the header."""
    raw = request.headers.get("Last-Event-ID", "").strip() or request.query.get("lastEventId", "")
    return ascii_int(raw, 18)


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
