"""A browser's EventSource over httpx + httpx-sse, for tests and benchmarks.

It behaves as the HTML standard's EventSource does for what the gateway uses: each event's
`id:` becomes the last event id, `retry:` the reconnection delay; when the connection ends
or breaks it waits that delay and reconnects with `Last-Event-ID`; HTTP 204 stops it for good,
and so does any other status but 200 (the browser's "fail the connection"; the deposit page
then polls). On top of that it stops by itself once it has seen a final status (`done` or
`expired`), as the deposit page closes its EventSource then.

Thousands share one `sse_http_client()` (no connection limit, nothing kept idle), so they
fit in one process. Where the bytes on the wire are what is measured, bench.stream keeps a
raw socket reader of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

# Chromium's reconnection delay before a server sends `retry:`.
DEFAULT_RETRY_MS = 3000
FINAL = frozenset({"done", "expired"})
CONNECT_TIMEOUT = 5.0


class StreamEnded(Exception):
    """The server ended the stream (cleanly, or closed it mid-body): reconnect after `retry`."""


class StreamBroken(Exception):
    """No answer: refused, reset or timed out before or while reading (a load balancer would
    send the next attempt elsewhere); reconnect after `retry`."""


def sse_http_client(base_url: str = "") -> httpx.AsyncClient:
    """A client for many concurrent streams: no read timeout, no limit, no idle connection."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(CONNECT_TIMEOUT, read=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
    )


@dataclass
class EventSourceClient:
    """One waiting browser: connects, reads, reconnects, until a final status or a stop."""

    url: str  # http://host:port/api/webhooks/stream?uuid=…
    http: httpx.AsyncClient | None = None  # shared by many; None: one of its own per run
    retry_ms: int = DEFAULT_RETRY_MS
    last_event_id: str = ""
    statuses: list[str] = field(default_factory=list)
    connects: int = 0  # connections that answered 200
    attempts: int = 0  # connection attempts (failed ones included)
    outcome: str = ""  # "final", "204", "http <status>", "" while running
    final_at: float | None = None  # time.monotonic() of the final status
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    first_event: asyncio.Event = field(default_factory=asyncio.Event)
    sent_last_event_ids: list[str] = field(default_factory=list)

    @property
    def status(self) -> str | None:
        return self.statuses[-1] if self.statuses else None

    async def run(self) -> str:
        """Until the stream is over; returns the outcome."""
        if self.http is not None:
            return await self._reconnecting()
        async with sse_http_client() as http:
            self.http = http
            try:
                return await self._reconnecting()
            finally:
                self.http = None

    async def _reconnecting(self) -> str:
        while True:
            self.connected.clear()
            try:
                outcome = await self._connect_once()
            except (StreamEnded, StreamBroken):
                await asyncio.sleep(self.retry_ms / 1000)
                continue
            self.outcome = outcome
            return outcome

    async def _connect_once(self) -> str:
        """One connection: its outcome, or StreamEnded / StreamBroken to reconnect."""
        assert self.http is not None
        self.attempts += 1
        headers = {}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
            self.sent_last_event_ids.append(self.last_event_id)
        answered = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    source = await stack.enter_async_context(
                        aconnect_sse(self.http, "GET", self.url, headers=headers)
                    )
                status = source.response.status_code
                if status == 204:
                    return "204"
                if status != 200:
                    return f"http {status}"
                answered = True
                self.connects += 1
                self.connected.set()
                async for sse in source.aiter_sse():
                    if sse.id:
                        self.last_event_id = sse.id
                    if sse.retry is not None and sse.retry >= 0:
                        self.retry_ms = sse.retry
                    # A bare `retry:` or `id:` dispatches nothing, as in EventSource.
                    if sse.data and self._dispatch(sse.data):
                        return "final"
        except httpx.RemoteProtocolError as exc:
            # The server closed the connection mid-body: the stream ended.
            if answered:
                raise StreamEnded from exc
            raise StreamBroken from exc
        except (httpx.TransportError, SSEError, OSError, TimeoutError) as exc:
            raise StreamBroken from exc
        raise StreamEnded

    def _dispatch(self, data: str) -> bool:
        """Handle one event's data; True once it is a final status."""
        event: dict[str, Any] = json.loads(data)
        status = str(event.get("status"))
        self.statuses.append(status)
        self.first_event.set()
        if status in FINAL:
            self.final_at = time.monotonic()
            return True
        return False
