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

Each link has a `_Connection` of its own holding what was sent on it and what it confirmed,
so a coroutine still holding an old link (a flusher suspended mid-batch during a reconnect)
can only touch the old link's state, never mark a channel as told on the new one. Any
failure of a link ends it, whatever its type; the reader, the flusher and the re-reader run
under the app's supervisor, which restarts whichever ends unexpectedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

import structlog

from shared.model import StatusEvent
from shared.tasks import Supervised, Supervisor, checkpoint

from .links import CONFIRM_TIMEOUT, IDLE_PING_SECONDS, Link
from .metrics import GatewayMetrics

log = structlog.get_logger(__name__)

# A stream keeps at most this many undelivered events; each is a full state, so when a slow
# client lets them pile up, dropping the oldest loses nothing the newest does not say.
QUEUE_SIZE = 8
# Channels per SUBSCRIBE/UNSUBSCRIBE command when many change at once (a reconnect).
COMMAND_BATCH = 500
# After sending, the flusher lets the changes of this long gather into its next commands: a
# lone stream's SUBSCRIBE goes at once, a reconnect storm's many to a command, not ~3 (their
# confirmations then come together, and so do their opening reads). bench-peer, 10,000
# opens, alternating runs: 0.64 -> 0.25 Redis commands and 697 -> 476 µs CPU per open.
FLUSH_GATHER_SECONDS = 0.002
# Reconnect backoff (with full jitter); it starts over once a link has lived STABLE_LINK.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
STABLE_LINK_SECONDS = 10.0
# The re-read after a reconnect goes to MongoDB (the cache may have lost what the link
# lost): sessions per query, and queries in flight at once, so 10,000 open streams cost
# 20 queries, at most 4 at a time, per reconnect.
REREAD_BATCH = 500
REREAD_WORKERS = 4
REREAD_RETRY_SECONDS = 1.0


Sender = Callable[[StatusEvent, bool], Awaitable[bool]]


class StatusSource(Protocol):
    """Where the hub reads statuses after a (re)connect (`shared.status.StatusReader`)."""

    async def read_fresh(self, uuids: Sequence[str]) -> dict[str, StatusEvent]:
        """The latest state of each session that exists, from the source of truth."""


class Listener:
    """One open stream's inbox: the events of its session newer than what it already has.

    Events wait in a small queue until a sender starts: the first ones are written by the
    stream's handler itself (`start`), later ones by one short-lived task per burst, in order
    (an idle stream costs no task of its own beyond the connection's handler: keep-alives
    come from one task for every stream, `streams.OpenStreams`).
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

    async def start(self, send: Sender) -> None:
        """Write what is queued now, in the caller's task (a stream's first event costs no
        task of its own), then `attach(send)` for what comes later."""
        while self._queue and not self._closed:
            event, pushed = self._queue.pop(0)
            if await send(event, pushed):
                self._closed = True
        # No await since the queue was last seen empty: whatever comes next is kicked.
        self.attach(send)

    def attach(self, send: Sender) -> None:
        """Start writing: `send(event, pushed)` writes one event, True once the stream ends."""
        self._send = send
        self._kick()

    async def close(self) -> None:
        """No more events; waits for (or stops) a write in progress."""
        self._closed = True
        # The sender is a closure over this listener's stream: dropping it breaks the cycle,
        # so the stream's objects are freed when it ends, not by a later full collection.
        self._send = None
        self._queue.clear()
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


class _Connection:
    """One link and what was said on it: a new link starts with all of this empty."""

    __slots__ = ("confirmed", "failure", "inflight", "late", "link", "told", "waiters")

    def __init__(self, link: Link) -> None:
        self.link = link
        self.told: set[str] = set()  # SUBSCRIBE sent (and no UNSUBSCRIBE since)
        self.inflight: dict[str, int] = {}  # commands sent, confirmation not yet read
        self.confirmed: set[str] = set()
        self.waiters: dict[str, list[asyncio.Future[bool]]] = {}
        # Joins that stopped waiting for their confirmation: read again once it arrives.
        self.late: set[str] = set()
        # A command failed: the reader ends the link at its next turn.
        self.failure: BaseException | None = None

    def mark(self, uuids: list[str], *, subscribed: bool) -> None:
        # Before the command is sent: its confirmation may be read before `send` returns.
        for uuid in uuids:
            self.inflight[uuid] = self.inflight.get(uuid, 0) + 1
            if subscribed:
                self.told.add(uuid)
            else:
                self.told.discard(uuid)

    def is_confirmed(self, uuid: str) -> bool:
        return uuid in self.confirmed and uuid not in self.inflight

    def release_waiters(self) -> None:
        """The link is over: nobody waits for it (the next link re-reads every stream)."""
        for waiters in self.waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(True)
        self.waiters.clear()


class Hub:
    """Every stream of this process, grouped by session, over one pub/sub connection."""

    def __init__(
        self,
        open_link: Callable[[], Link],
        reader: StatusSource,
        metrics: GatewayMetrics,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._open_link = open_link
        self._reader = reader
        self._metrics = metrics
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._listeners: dict[str, set[Listener]] = {}
        self._conn: _Connection | None = None
        self._changed: set[str] = set()  # sessions whose first/last stream came or went
        self._dirty = asyncio.Event()
        self._reread: dict[str, None] = {}  # sessions to read again, in order
        self._reread_wake = asyncio.Event()
        self._tasks: list[Supervised] = []
        self.connected = False
        self.closing = False

    # -- what streams use ----------------------------------------------------------------

    @property
    def subscription_count(self) -> int:
        """Sessions with at least one open stream (each one channel subscription)."""
        return len(self._listeners)

    def holds(self, listener: Listener) -> bool:
        """Whether `listener` is registered (for tests and leak checks)."""
        return listener in self._listeners.get(listener.uuid, ())

    async def join(self, listener: Listener) -> None:
        """Add a stream; returns once its channel is subscribed (or Redis is unreachable).

        If the caller is cancelled meanwhile (the browser left), the stream is removed again
        before the cancellation goes on: nothing is left subscribed for nobody.
        """
        uuid = listener.uuid
        group = self._listeners.get(uuid)
        if group is None:
            group = self._listeners[uuid] = set()
            self._changed.add(uuid)
            self._dirty.set()
        group.add(listener)
        conn = self._conn
        if conn is None:
            return  # the next link re-reads every stream
        try:
            unconfirmed = await self._wait_confirmed(conn, [uuid])
        except BaseException:
            self.leave(listener)
            raise
        self._note_late(conn, unconfirmed)

    def leave(self, listener: Listener) -> None:
        """Remove a stream; the channel is unsubscribed once its last stream left."""
        group = self._listeners.get(listener.uuid)
        if group is None or listener not in group:
            return
        group.discard(listener)
        if not group:
            del self._listeners[listener.uuid]
            self._changed.add(listener.uuid)
            self._dirty.set()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            self._supervisor.spawn("hub-reader", self._run),
            self._supervisor.spawn("hub-flusher", self._flush_loop),
            self._supervisor.spawn("hub-reread", self._reread_loop),
        ]

    async def stop(self) -> None:
        self.closing = True
        self._dirty.set()
        # Bounded: a cancellation caught inside the Redis client must not hold up shutdown.
        await asyncio.gather(*(task.stop() for task in self._tasks))

    # -- the reader: connect, read, fan out, reconnect -------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_MIN
        # Until `stop` cancels it, shutdown included: a supervised loop that returns counts as
        # a death and is restarted, and the streams still open while draining need pushes.
        while True:
            link = self._open_link()
            try:
                async with asyncio.timeout(CONFIRM_TIMEOUT):
                    await link.open()
            except Exception as exc:
                # Any failure, not only RedisError: a cluster with no reachable node raises
                # RedisClusterException, and a reader that ended on it would push nothing again.
                await link.close()
                log.warning("pubsub_connect_failed", error=_describe(exc))
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            opened = loop.time()
            conn = self._begin(link)
            try:
                await self._read(conn)
            except Exception as exc:
                log.warning("pubsub_lost", error=_describe(exc))
            finally:
                self._end(conn)
                await link.close()
            if loop.time() - opened > STABLE_LINK_SECONDS:
                delay = BACKOFF_MIN
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, BACKOFF_MAX)

    def _begin(self, link: Link) -> _Connection:
        conn = self._conn = _Connection(link)
        self._changed.update(self._listeners)
        self.connected = True
        self._metrics.pubsub_connects.inc()
        log.info("pubsub_connected", sessions=len(self._listeners))
        self._dirty.set()
        # Whatever was published while this process was not subscribed is lost: read again.
        self._queue_reread(self._listeners)
        return conn

    def _end(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            self.connected = False
        # Streams waiting for a confirmation go on; the next connection's re-read covers them.
        conn.release_waiters()

    async def _read(self, conn: _Connection) -> None:
        # The link watches its own liveness (it raises once silent, even to PING); an idle
        # read only gives the loop a turn to see a failed command.
        while True:
            # redis-py 8.1's pub/sub can swallow a cancellation (measured: an UNSUBSCRIBE
            # cancelled mid-batch returns normally, `cancelling()` still set), PyMongo too:
            # every loop of the hub checks once a round (a link's open swallowing one is
            # caught here too, on the first round).
            checkpoint()
            if conn.failure is not None:
                raise conn.failure
            msg = await conn.link.read(idle=IDLE_PING_SECONDS)
            if msg is None or msg.uuid is None:
                continue
            if msg.kind == "message":
                self._dispatch(msg.uuid, msg.data)
            elif msg.kind in ("subscribe", "unsubscribe"):
                self._confirm(conn, msg.uuid, subscribed=msg.kind == "subscribe")

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

    def _confirm(self, conn: _Connection, uuid: str, *, subscribed: bool) -> None:
        left = conn.inflight.get(uuid, 0) - 1
        if left > 0:
            conn.inflight[uuid] = left
            return
        conn.inflight.pop(uuid, None)
        if subscribed and uuid in conn.told:
            conn.confirmed.add(uuid)
            for fut in conn.waiters.pop(uuid, ()):
                if not fut.done():
                    fut.set_result(True)
            if uuid in conn.late:
                # Its stream read the status without waiting for this: anything published in
                # between reached nobody, so read once more.
                conn.late.discard(uuid)
                self._queue_reread([uuid])
        else:
            conn.confirmed.discard(uuid)

    async def _wait_confirmed(self, conn: _Connection, uuids: Sequence[str]) -> list[str]:
        """Wait (bounded) until each channel is confirmed on `conn`; those that were not."""
        futures: dict[str, asyncio.Future[bool]] = {}
        loop = asyncio.get_running_loop()
        for uuid in uuids:
            if not conn.is_confirmed(uuid):
                fut = futures[uuid] = loop.create_future()
                conn.waiters.setdefault(uuid, []).append(fut)
        if not futures:
            return []
        try:
            await asyncio.wait(futures.values(), timeout=CONFIRM_TIMEOUT)
        finally:
            for uuid, fut in futures.items():
                waiters = conn.waiters.get(uuid)
                if waiters is not None and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del conn.waiters[uuid]
        late = [uuid for uuid, fut in futures.items() if not fut.done()]
        if late:
            log.warning("subscribe_unconfirmed", sessions=len(late), uuid=late[0])
        return late

    def _note_late(self, conn: _Connection, uuids: list[str]) -> None:
        """Streams that go on without a confirmation are read again when it comes."""
        for uuid in uuids:
            if conn.is_confirmed(uuid):
                self._queue_reread([uuid])
            elif conn is self._conn:
                conn.late.add(uuid)

    # -- the flusher: SUBSCRIBE / UNSUBSCRIBE what changed, in batches ----------------------

    async def _flush_loop(self) -> None:
        # Until `stop` cancels it (a return would be restarted, see `_run`); nothing is sent
        # once closing.
        while True:
            checkpoint()
            await self._dirty.wait()
            self._dirty.clear()
            conn = self._conn
            if conn is None or not self._changed or self.closing:
                continue
            changed, self._changed = self._changed, set()
            subscribe = [u for u in changed if u in self._listeners and u not in conn.told]
            unsubscribe = [u for u in changed if u not in self._listeners and u in conn.told]
            try:
                await self._send(conn, subscribe, subscribed=True)
                await self._send(conn, unsubscribe, subscribed=False)
            except Exception as exc:
                # Whatever the failure, the link cannot be trusted: the reader starts over.
                log.warning("pubsub_command_failed", error=_describe(exc))
                if conn.failure is None:
                    conn.failure = exc
            if subscribe or unsubscribe:
                await asyncio.sleep(FLUSH_GATHER_SECONDS)

    async def _send(self, conn: _Connection, uuids: list[str], *, subscribed: bool) -> None:
        for batch in _batches(uuids):
            if conn is not self._conn:
                # Reconnected while a command was on its way: the new link starts from
                # every live stream, and this one is closed.
                return
            conn.mark(batch, subscribed=subscribed)
            if subscribed:
                await conn.link.subscribe(batch)
            else:
                await conn.link.unsubscribe(batch)

    # -- the re-read after a (re)connect or a late confirmation ---------------------------

    def _queue_reread(self, uuids: Iterable[str]) -> None:
        for uuid in uuids:
            self._reread[uuid] = None
        if self._reread:
            self._reread_wake.set()

    async def _reread_loop(self) -> None:
        async def worker() -> None:
            while True:
                checkpoint()
                while not self._reread:
                    self._reread_wake.clear()
                    await self._reread_wake.wait()
                taken = list(itertools.islice(self._reread, REREAD_BATCH))
                for uuid in taken:
                    del self._reread[uuid]
                batch = [u for u in taken if u in self._listeners]
                if batch:
                    await self._reread_batch(batch)

        await asyncio.gather(*(worker() for _ in range(REREAD_WORKERS)))

    async def _reread_batch(self, batch: list[str]) -> None:
        conn = self._conn
        if conn is not None:
            # Read after the SUBSCRIBE is confirmed, so a change in between is not missed.
            self._note_late(conn, await self._wait_confirmed(conn, batch))
        try:
            events = await self._reader.read_fresh(batch)
        except Exception as exc:
            log.warning("resync_read_failed", sessions=len(batch), error=_describe(exc))
            await asyncio.sleep(REREAD_RETRY_SECONDS)
            self._queue_reread(batch)
            return
        self._metrics.resync_reads.inc(len(batch))
        for uuid, event in events.items():
            for listener in self._listeners.get(uuid, ()):
                listener.offer(event)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _batches(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), COMMAND_BATCH):
        yield items[i : i + COMMAND_BATCH]
