"""A model of Redis pub/sub for the hub's state-machine test: links that block, fail, confirm
late or drop, deterministically, driven one step at a time.

`FakeRedis` is the server: it knows which channels each connection has subscribed (once the
SUBSCRIBE is *processed*, which a slow connection delays) and the latest version of every
session, and it publishes to subscribed connections only — so a publish that lands before a
SUBSCRIBE is processed is lost, as on a real Redis. `FakeLink` speaks the hub's `Link`
protocol and records every command given to it after it was closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from redis.exceptions import ConnectionError as RedisConnectionError

from shared.model import StatusEvent, StreamStatus
from stream_gateway.links import Message


def event(uuid: str, version: int) -> StatusEvent:
    """A non-final state (the stream stays open), distinguishable by its version."""
    return StatusEvent(
        uuid=uuid,
        order_code=1,
        status=StreamStatus.PENDING,
        amount=10_000,
        amount_paid=version,
        updated_at=datetime.now(UTC),
        version=version,
    )


class FakeRedis:
    """The server side of every link, and the source of truth for status reads."""

    def __init__(self) -> None:
        self.links: list[FakeLink] = []
        self.versions: dict[str, int] = {}
        self.fail_opens = 0
        self.slow = False  # commands wait (unprocessed) until `process_held`
        self.stall: asyncio.Event | None = None  # sends block until set (a full socket buffer)

    def open_link(self) -> FakeLink:
        link = FakeLink(self)
        self.links.append(link)
        return link

    @property
    def current(self) -> FakeLink | None:
        """The newest link that is open and not broken."""
        for link in reversed(self.links):
            if link.opened and not link.closed and not link.broken:
                return link
        return None

    def publish(self, uuid: str) -> int:
        version = self.versions.get(uuid, 0) + 1
        self.versions[uuid] = version
        data = event(uuid, version).to_json().encode()
        for link in self.links:
            if not link.broken and not link.closed and uuid in link.subscribed:
                link.inbox.put_nowait(Message("message", uuid, data))
        return version

    def latest(self, uuid: str) -> StatusEvent | None:
        version = self.versions.get(uuid)
        return None if version is None else event(uuid, version)

    def release(self) -> None:
        """Stop stalling and slowing; every held command is processed."""
        self.slow = False
        if self.stall is not None:
            self.stall.set()
            self.stall = None
        for link in self.links:
            link.process_held()


class FakeLink:
    """One pub/sub connection as the hub sees it."""

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.inbox: asyncio.Queue[Message | Exception] = asyncio.Queue()
        self.subscribed: set[str] = set()  # processed by the server
        self.held: list[tuple[str, list[str]]] = []  # sent, not processed yet
        self.opened = False
        self.closed = False
        self.broken = False
        self.writes_vanish = False
        self.used_after_close: list[str] = []

    async def open(self) -> None:
        self._check("open")
        if self.server.fail_opens > 0:
            self.server.fail_opens -= 1
            self.broken = True
            raise RedisConnectionError("connection refused")
        self.opened = True

    async def subscribe(self, uuids: Iterable[str]) -> None:
        await self._send("subscribe", list(uuids))

    async def unsubscribe(self, uuids: Iterable[str]) -> None:
        await self._send("unsubscribe", list(uuids))

    async def read(self, *, idle: float) -> Message | None:
        self._check("read")
        try:
            async with asyncio.timeout(idle):
                item = await self.inbox.get()
        except TimeoutError:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        self.closed = True
        self.subscribed.clear()

    def drop(self, *, writes_vanish: bool = False) -> None:
        """The connection breaks: the server forgets it, the reader learns at its next read.

        `writes_vanish`: a write in flight still "succeeds" (into a socket buffer nobody will
        read), as a dead TCP connection lets writes through until the kernel notices.
        """
        if self.broken or self.closed:
            return
        self.broken = True
        self.writes_vanish = writes_vanish
        self.subscribed.clear()
        self.held.clear()
        self.inbox.put_nowait(RedisConnectionError("connection lost"))

    def process_held(self) -> None:
        held, self.held = self.held, []
        for kind, uuids in held:
            self._process(kind, uuids)

    async def _send(self, kind: str, uuids: list[str]) -> None:
        self._check(kind)
        stall = self.server.stall
        if stall is not None:
            await stall.wait()
        if self.broken:
            if self.writes_vanish:
                return
            raise RedisConnectionError("connection lost")
        if self.closed:
            # What redis-py does: a closed PubSub silently opens a new connection.
            self.used_after_close.append(f"{kind} (after the stall)")
            return
        if self.server.slow or self.held:
            self.held.append((kind, uuids))
        else:
            self._process(kind, uuids)

    def _process(self, kind: str, uuids: list[str]) -> None:
        if self.broken or self.closed:
            return
        for uuid in uuids:
            if kind == "subscribe":
                self.subscribed.add(uuid)
            else:
                self.subscribed.discard(uuid)
            self.inbox.put_nowait(Message(kind, uuid))  # type: ignore[arg-type]

    def _check(self, what: str) -> None:
        if self.closed:
            self.used_after_close.append(what)


class FakeReader:
    """Status reads answered from the fake server's truth."""

    def __init__(self, server: FakeRedis) -> None:
        self.server = server
        self.reads = 0

    async def read(self, uuid: str) -> StatusEvent | None:
        self.reads += 1
        await asyncio.sleep(0)
        return self.server.latest(uuid)

    async def read_fresh(self, uuids: Sequence[str]) -> dict[str, StatusEvent]:
        self.reads += len(uuids)
        await asyncio.sleep(0)
        return {u: e for u in uuids if (e := self.server.latest(u)) is not None}
