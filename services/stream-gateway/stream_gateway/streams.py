"""Every open stream of the process, kept alive by one task and capped by one deadline wheel.

aiohttp-sse starts a ping task per stream (a task, a sleep timer and a timeout object each,
every 15 s); with 10,000 streams that is 10,000 tasks waking one by one. Here the response is
still aiohttp-sse's, minus its ping task: `OpenStreams.run` (one supervised task) writes the
keep-alive comments and ends the streams whose 10-minute cap has passed.

Keep-alives are spread over the interval: the streams are dealt round-robin into
`KEEPALIVE_TICKS` groups and one group is written per tick (interval / ticks), so each stream
gets its comment once per interval and the process never writes all of them at once (10,000
in one go held the loop ~150 ms, and every event with it). Every stream has the same cap, so
the streams, kept in the order they opened, are also in deadline order: the wheel is that
order, woken at the oldest stream's deadline.

A write that fails ends its stream at once (`stop_streaming`), as aiohttp-sse's ping task did:
a vanished client is cut at the first failed write. A stream whose previous bytes still sit
unsent in its socket buffer is skipped for that round rather than waited on (the task never
blocks on one slow client); the TCP_USER_TIMEOUT aiohttp-sse sets cuts a dead peer.
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
# Groups of streams per keep-alive interval, one written per tick: 10,000 streams are ~310
# writes (~4.5 ms) every 0.47 s at the default 15 s. Measured (bench-peer, 10,000 streams):
# 64 groups cost ~20 µs a keep-alive against 17.5 µs at 32 (more, smaller rounds), 16 held
# 1 % of events past 12 ms against 6 ms at 32.
KEEPALIVE_TICKS = 32
# At most this many writes without giving the loop a turn (15-25 µs each): an event waits for
# one slice (~1-1.5 ms), whatever the size of a group. bench-peer, 10,000 streams, two runs
# each: max publish -> received 23.0 / 10.1 ms at 256, 11.4 / 9.3 ms at 64.
KEEPALIVE_SLICE = 64


class SseStream(EventSourceResponse):
    """aiohttp-sse's response with no task of its own: `wait()` waits on a plain future,
    `stop_streaming()` cancels it, and keep-alives come from `OpenStreams`."""

    # Set by the deadline wheel when the cap ended the stream.
    expired = False
    # Its keep-alive group (`OpenStreams`).
    keepalive_group = 0
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
    """The open streams, in the order they opened (so also in deadline order), and their
    keep-alive groups."""

    def __init__(self, keepalive_seconds: float, max_wait_seconds: float) -> None:
        self.keepalive_seconds = keepalive_seconds
        self.max_wait_seconds = max_wait_seconds
        self._deadlines: dict[SseStream, float] = {}
        self._groups: list[dict[SseStream, None]] = [{} for _ in range(KEEPALIVE_TICKS)]
        self._dealt = 0
        self._wake = asyncio.Event()
        self.ticks = 0  # groups written, in order from the first (for tests)

    def __len__(self) -> int:
        return len(self._deadlines)

    @property
    def passes(self) -> int:
        """Rounds of keep-alives begun, each writing every group once (for tests)."""
        return -(-self.ticks // KEEPALIVE_TICKS)

    def __iter__(self) -> Iterator[SseStream]:
        return iter(list(self._deadlines))

    def add(self, stream: SseStream) -> None:
        """Keep `stream` alive from now on; its cap runs from now."""
        first = not self._deadlines
        deadline = asyncio.get_running_loop().time() + self.max_wait_seconds
        self._deadlines[stream] = deadline
        # Round-robin, not by opening time: a reconnect storm's streams are spread too.
        group = stream.keepalive_group = self._dealt % KEEPALIVE_TICKS
        self._dealt += 1
        self._groups[group][stream] = None
        if first:
            self._wake.set()  # the wheel slept without a deadline: it has one now

    def discard(self, stream: SseStream) -> None:
        if self._deadlines.pop(stream, None) is not None:
            self._groups[stream.keepalive_group].pop(stream, None)

    async def run(self) -> None:
        """Keep-alive ticks and the cap, until cancelled (supervised)."""
        loop = asyncio.get_running_loop()
        tick = self.keepalive_seconds / KEEPALIVE_TICKS
        group = 0
        next_tick = loop.time() + tick
        while True:
            now = loop.time()
            head = self._expire(now)
            if now >= next_tick:
                # Late (a stalled process): the groups that were due are written now, each
                # once; nothing is written twice to catch up.
                due = min(KEEPALIVE_TICKS, 1 + int((now - next_tick) / tick))
                for _ in range(due):
                    await self._keepalive_group(group)
                    group = (group + 1) % KEEPALIVE_TICKS
                next_tick += due * tick
                if next_tick <= now:
                    next_tick = now + tick
            wake_at = min(next_tick, head)
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
            self.discard(stream)
            stream.expired = True
            stream.stop_streaming()
        return head

    async def _keepalive_group(self, group: int) -> None:
        self.ticks += 1
        members = self._groups[group]
        cut = 0
        for i, stream in enumerate(list(members)):
            if i and not i % KEEPALIVE_SLICE:
                await asyncio.sleep(0)
            if stream not in members:
                continue  # ended during this tick
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
