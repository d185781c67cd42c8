"""The multiplexer: one Redis pub/sub link per process, fanned out to every open stream.

`Hub.join` subscribes a session's channel when its first stream arrives and returns once Redis
has confirmed the subscription (so a status read after it cannot miss a publish); `Hub.leave`
unsubscribes when its last stream goes. One coroutine reads the connection and hands each
event to the listeners of its session; another sends the (batched) SUBSCRIBE/UNSUBSCRIBE
commands. When the connection drops, the reader reconnects with backoff, subscribes every
live channel again and re-reads the status of every session that still has a stream, since
whatever was published meanwhile is gone for good.

The link is one connection to a single Redis, or on a Redis Cluster one connection per
primary with sharded pub/sub (`links.py`); the hub sees no difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import structlog
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from shared.model import StatusEvent
from shared.status import StatusReader

from .links import CONFIRM_TIMEOUT, DEAD_AFTER_SECONDS, IDLE_PING_SECONDS, Link, open_link
from .links import pubsub_client as pubsub_client
from .metrics import GatewayMetrics

log = structlog.get_logger(__name__)

# A stream keeps at most this many undelivered events; each is a full state, so when a slow
# client lets them pile up, dropping the oldest loses nothing the newest does not say.
QUEUE_SIZE = 8
# Channels per SUBSCRIBE/UNSUBSCRIBE command when many change at once (a reconnect).
COMMAND_BATCH = 500
# Reconnect backoff (with full jitter) and the parallelism of the re-read after a reconnect.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
RESYNC_WORKERS = 32
# How long stopping waits for the hub's tasks to end.
STOP_TIMEOUT = 1.0


Sender = Callable[[StatusEvent, bool], Awaitable[bool]]


class Listener:
    """One open stream's inbox: the events of its session newer than what it already has.

    Events wait in a small queue until a sender is attached; then one short-lived task per
    burst writes them in order (an idle stream costs no task of its own beyond the
    connection's handler and its keep-alive).
    """

    __slots__ = ("_closed", "_drain", "_last", "_queue", "_send", "uuid")

    def __init__(self, uuid: str, *, after_version: int = 0) -> None:
        self.uuid = uuid
        self._last = after_version
        self._queue: list[tuple[StatusEvent, bool]] = []
        self._send: Sender | None = None
        self._drain: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Events queued and not yet written."""
        return len(self._queue)

    def offer(self, event: StatusEvent, *, pushed: bool = False) -> bool:
        """Queue `event` if it is newer than every event seen so far; True if queued.

        `pushed` marks an event that came from pub/sub (its delivery latency is measured).
        """
        if self._closed:
            return False
        if event.version <= self._last:
            if not pushed:
                self._learnt_by_reading(event.version)
            return False
        self._last = event.version
        if len(self._queue) >= QUEUE_SIZE:
            del self._queue[0]
        self._queue.append((event, pushed))
        self._kick()
        return True

    def _learnt_by_reading(self, version: int) -> None:
        # The same state pushed first and not yet written (a read's own cache refill
        # publishes it, and may arrive before the read returns): it was learnt by reading,
        # so its delivery is not timed as a push.
        if self._queue and self._queue[-1][0].version == version:
            self._queue[-1] = (self._queue[-1][0], False)

    def attach(self, send: Sender) -> None:
        """Start writing: `send(event, pushed)` writes one event, True once the stream ends."""
        self._send = send
        self._kick()

    async def close(self) -> None:
        """No more events; waits for (or stops) a write in progress."""
        self._closed = True
        drain, self._drain = self._drain, None
        if drain is not None and drain is not asyncio.current_task():
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain

    def _kick(self) -> None:
        if self._send is not None and self._drain is None and self._queue and not self._closed:
            self._drain = asyncio.create_task(self._write_all(self._send))

    async def _write_all(self, send: Sender) -> None:
        try:
            while self._queue and not self._closed:
                event, pushed = self._queue.pop(0)
                if await send(event, pushed):
                    self._closed = True
        finally:
            self._drain = None


class Hub:
    """Every stream of this process, grouped by session, over one pub/sub connection."""

    def __init__(
        self, redis: Redis | RedisCluster, reader: StatusReader, metrics: GatewayMetrics
    ) -> None:
        self._redis = redis
        self._reader = reader
        self._metrics = metrics
        self._listeners: dict[str, set[Listener]] = {}
        # State of the current connection; reset by every reconnect.
        self._link: Link | None = None
        self._told: set[str] = set()  # SUBSCRIBE sent (and no UNSUBSCRIBE since)
        self._inflight: dict[str, int] = {}  # commands sent, confirmation not yet read
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._changed: set[str] = set()  # sessions whose first/last stream came or went
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._resync_task: asyncio.Task[None] | None = None
        self.connected = False
        self.closing = False

    # -- what streams use ----------------------------------------------------------------

    @property
    def subscription_count(self) -> int:
        """Sessions with at least one open stream (each one channel subscription)."""
        return len(self._listeners)

    async def join(self, listener: Listener) -> None:
        """Add a stream; returns once its channel is subscribed (or Redis is unreachable)."""
        uuid = listener.uuid
        group = self._listeners.get(uuid)
        if group is None:
            group = self._listeners[uuid] = set()
            self._changed.add(uuid)
            self._dirty.set()
        group.add(listener)
        if self.connected:
            await self._wait_confirmed(uuid)

    def leave(self, listener: Listener) -> None:
        """Remove a stream; the channel is unsubscribed once its last stream left."""
        group = self._listeners.get(listener.uuid)
        if group is None:
            return
        group.discard(listener)
        if not group:
            del self._listeners[listener.uuid]
            self._changed.add(listener.uuid)
            self._dirty.set()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="hub-reader"),
            asyncio.create_task(self._flush_loop(), name="hub-flusher"),
        ]

    async def stop(self) -> None:
        self.closing = True
        self._dirty.set()
        tasks = [*self._tasks, *([self._resync_task] if self._resync_task else [])]
        for task in tasks:
            task.cancel()
        # Bounded: a cancellation caught inside the Redis client must not hold up shutdown.
        await asyncio.wait(tasks, timeout=STOP_TIMEOUT)

    # -- the reader: connect, read, fan out, reconnect -------------------------------------

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while not self.closing:
            link = open_link(self._redis)
            try:
                async with asyncio.timeout(CONFIRM_TIMEOUT):
                    await link.open()
            except (RedisError, OSError, TimeoutError) as exc:
                await link.close()
                log.warning("pubsub_connect_failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_MIN
            self._begin(link)
            try:
                await self._read(link)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("pubsub_lost", error=str(exc) or type(exc).__name__)
            finally:
                self._end()
                await link.close()
            await asyncio.sleep(random.uniform(0, delay))

    def _begin(self, link: Link) -> None:
        self._link = link
        self._told.clear()
        self._inflight.clear()
        self._confirmed.clear()
        self._changed.update(self._listeners)
        self.connected = True
        self._metrics.pubsub_connects.inc()
        log.info("pubsub_connected", sessions=len(self._listeners))
        self._dirty.set()
        # Whatever was published while this process was not subscribed is lost: read again.
        if self._listeners:
            if self._resync_task is not None:
                self._resync_task.cancel()
            self._resync_task = asyncio.create_task(self._resync(), name="hub-resync")

    def _end(self) -> None:
        self.connected = False
        self._link = None
        # Streams waiting for a confirmation go on; the next connection's re-read covers them.
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()

    async def _read(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        pinged = False
        while True:
            msg = await link.read(idle=IDLE_PING_SECONDS)
            now = loop.time()
            if msg is None:
                if now - last_heard > DEAD_AFTER_SECONDS:
                    raise TimeoutError("pub/sub connection silent, even to PING")
                if not pinged:
                    await link.ping()
                    pinged = True
                continue
            last_heard, pinged = now, False
            if msg.uuid is None:
                continue
            if msg.kind == "message":
                self._dispatch(msg.uuid, msg.data)
            elif msg.kind in ("subscribe", "unsubscribe"):
                self._confirm(msg.uuid, subscribed=msg.kind == "subscribe")

    def _dispatch(self, uuid: str, data: bytes) -> None:
        group = self._listeners.get(uuid)
        if not group:
            return
        try:
            event = StatusEvent.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("pubsub_bad_event", uuid=uuid, error=str(exc))
            return
        for listener in group:
            listener.offer(event, pushed=True)

    def _confirm(self, uuid: str, *, subscribed: bool) -> None:
        left = self._inflight.get(uuid, 0) - 1
        if left > 0:
            self._inflight[uuid] = left
            return
        self._inflight.pop(uuid, None)
        if subscribed and uuid in self._told:
            self._confirmed.add(uuid)
            for fut in self._waiters.pop(uuid, ()):
                if not fut.done():
                    fut.set_result(None)
        else:
            self._confirmed.discard(uuid)

    async def _wait_confirmed(self, uuid: str) -> None:
        if uuid in self._confirmed and uuid not in self._inflight:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(uuid, []).append(fut)
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                await fut
        except TimeoutError:
            log.warning("subscribe_unconfirmed", uuid=uuid)
        finally:
            waiters = self._waiters.get(uuid)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[uuid]

    # -- the flusher: SUBSCRIBE / UNSUBSCRIBE what changed, in batches ----------------------

    async def _flush_loop(self) -> None:
        while not self.closing:
            await self._dirty.wait()
            self._dirty.clear()
            link = self._link
            if link is None or not self._changed or self.closing:
                continue
            changed, self._changed = self._changed, set()
            subscribe = [u for u in changed if u in self._listeners and u not in self._told]
            unsubscribe = [u for u in changed if u not in self._listeners and u in self._told]
            try:
                for batch in _batches(subscribe):
                    self._mark(batch, subscribed=True)
                    await link.subscribe(batch)
                for batch in _batches(unsubscribe):
                    self._mark(batch, subscribed=False)
                    await link.unsubscribe(batch)
            except (RedisError, OSError) as exc:
                # The reader sees the same broken connection and starts over.
                log.warning("pubsub_command_failed", error=str(exc) or type(exc).__name__)

    def _mark(self, uuids: list[str], *, subscribed: bool) -> None:
        # Before the command is sent: its confirmation may be read before `send` returns.
        for uuid in uuids:
            self._inflight[uuid] = self._inflight.get(uuid, 0) + 1
            if subscribed:
                self._told.add(uuid)
            else:
                self._told.discard(uuid)

    # -- the re-read after a (re)connect ---------------------------------------------------

    async def _resync(self) -> None:
        pending = deque(self._listeners)
        log.info("resync_started", sessions=len(pending))

        async def worker() -> None:
            while pending:
                uuid = pending.popleft()
                if uuid not in self._listeners:
                    continue
                await self._wait_confirmed(uuid)
                try:
                    event = await self._reader.read(uuid)
                except Exception as exc:
                    log.warning("resync_read_failed", uuid=uuid, error=str(exc))
                    continue
                self._metrics.resync_reads.inc()
                if event is not None:
                    for listener in self._listeners.get(uuid, ()):
                        listener.offer(event)

        await asyncio.gather(*(worker() for _ in range(RESYNC_WORKERS)))
        log.info("resync_finished")


def _batches(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), COMMAND_BATCH):
        yield items[i : i + COMMAND_BATCH]
