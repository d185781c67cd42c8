"""Every open stream of the process, kept alive by one pass and capped by one deadline wheel.

aiohttp-sse starts a ping task per stream (a task, a sleep timer and a timeout object each,
every 15 s); with 10,000 streams that is 10,000 tasks waking one by one. Here the response is
still aiohttp-sse's, minus its ping task: `OpenStreams.run` (one supervised task) writes the
keep-alive comment to every stream in one pass per interval, and ends the streams whose
10-minute cap has passed. Every stream has the same cap, so the streams, kept in the order
they opened, are also in deadline order: the wheel is that order, woken at the oldest
stream's deadline.

A write that fails ends its stream at once (`stop_streaming`), as aiohttp-sse's ping task did:
a vanished client is cut at the first failed write. A stream whose previous bytes still sit
unsent in its socket buffer is skipped for that pass rather than waited on (the pass never
blocks on one slow client); the TCP_USER_TIMEOUT aiohttp-sse sets cuts a dead peer. A pass
writes in slices, giving the loop a turn between them, so events are not held up by it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import structlog
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web import BaseRequest
from aiohttp_sse import EventSourceResponse

log = structlog.get_logger(__name__)

KEEPALIVE = b": ping\r\n\r\n"
# Streams written per slice of a keep-alive pass. A slice runs without a break (~15 µs a
# stream), then the loop has a turn: an event waits for one slice (~4 ms), not for the whole
# pass (10,000 streams: ~150 ms, every stream of the process stalled).
KEEPALIVE_SLICE = 256


class SseStream(EventSourceResponse):
    """aiohttp-sse's response with no task of its own: `wait()` waits on a plain future,
    `stop_streaming()` cancels it, and keep-alives come from `OpenStreams`."""

    # Set by the deadline wheel when the cap ended the stream.
    expired = False
    # The headers go out with the first event, in one write (aiohttp's Response does the
    # same): a stream opens with one send, not two.
    _send_headers_immediately = False

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        self._set_tcp_user_timeout(request)
        # StreamResponse.prepare itself: aiohttp-sse's would start its ping task.
        writer = await super(EventSourceResponse, self).prepare(request)
        # A future stands in for the ping task: awaited by wait(), cancelled by
        # stop_streaming(), done once the stream is over, all as the task was.
        self._ping_task = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
        self.enable_chunked_encoding()
        return writer

    @property
    def transport(self) -> asyncio.Transport | None:
        """The connection's transport (None once it is gone, or before `prepare`)."""
        req = self._req
        return req.transport if req is not None else None

    def writable(self) -> bool | None:
        """True if a keep-alive can be written now without waiting, False if this stream's
        socket still holds unsent bytes, None if it is gone (or not started)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._eof_sent:
            return None
        return not transport.get_write_buffer_size()


class OpenStreams:
    """The open streams, in the order they opened (so also in deadline order)."""

    def __init__(self, keepalive_seconds: float, max_wait_seconds: float) -> None:
        self.keepalive_seconds = keepalive_seconds
        self.max_wait_seconds = max_wait_seconds
        self._deadlines: dict[SseStream, float] = {}
        self._wake = asyncio.Event()
        self.passes = 0  # keep-alive passes made (for tests)

    def __len__(self) -> int:
        return len(self._deadlines)

    def __iter__(self) -> Iterator[SseStream]:
        return iter(list(self._deadlines))

    def add(self, stream: SseStream) -> None:
        """Keep `stream` alive from now on; its cap runs from now."""
        first = not self._deadlines
        deadline = asyncio.get_running_loop().time() + self.max_wait_seconds
        self._deadlines[stream] = deadline
        if first:
            self._wake.set()  # the wheel slept without a deadline: it has one now

    def discard(self, stream: SseStream) -> None:
        self._deadlines.pop(stream, None)

    async def run(self) -> None:
        """Keep-alive passes and the cap, until cancelled (supervised)."""
        loop = asyncio.get_running_loop()
        next_pass = loop.time() + self.keepalive_seconds
        while True:
            now = loop.time()
            head = self._expire(now)
            if now >= next_pass:
                await self._keepalive_pass()
                next_pass += self.keepalive_seconds
                if next_pass <= now:  # late (a stalled process): one pass, not a burst
                    next_pass = now + self.keepalive_seconds
            wake_at = min(next_pass, head)
            self._wake.clear()
            try:
                async with asyncio.timeout_at(wake_at):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _expire(self, now: float) -> float:
        """End every stream past its cap; the next deadline (inf when none)."""
        expired: list[SseStream] = []
        head = math.inf
        for stream, deadline in self._deadlines.items():
            if deadline > now:
                head = deadline
                break
            expired.append(stream)
        for stream in expired:
            del self._deadlines[stream]
            stream.expired = True
            stream.stop_streaming()
        return head

    async def _keepalive_pass(self) -> None:
        self.passes += 1
        cut = 0
        streams = list(self._deadlines)
        for i, stream in enumerate(streams):
            if i and not i % KEEPALIVE_SLICE:
                await asyncio.sleep(0)
            if stream not in self._deadlines:
                continue  # ended during the pass
            state = stream.writable()
            if not state:
                if state is None:
                    cut += 1
                    stream.stop_streaming()
                continue
            try:
                # Nothing waits here: the socket's buffer is empty, so aiohttp writes at once.
                await stream.write(KEEPALIVE)
            except (ConnectionResetError, RuntimeError):
                # RuntimeError: a write after EOF (the stream was ending anyway).
                cut += 1
                stream.stop_streaming()
        if cut:
            log.info("keepalive_cut_streams", streams=cut)
