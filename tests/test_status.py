"""Status reads shared by concurrent callers (StatusReader's single flight), on real Redis and
MongoDB: one caller leaving must not take the others' answer with it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pymongo.errors import PyMongoError
from redis.asyncio import Redis

from devstack.servers import Process
from devstack.system import Backends
from shared import keys
from shared.cache import StatusCache
from shared.model import StreamStatus
from shared.mongo import Store
from shared.settings import Settings
from shared.status import StatusReader
from tests.helpers import add_session


class Reader:
    """A StatusReader on the real servers, counting the MongoDB loads it starts."""

    def __init__(self, redis: Redis, store: Store) -> None:
        self.loads = 0
        self.cache = StatusCache(redis)
        self.reader = StatusReader(self.cache, store, on_db_query=self._count)

    def _count(self) -> None:
        self.loads += 1

    def start(self, uuid: str) -> asyncio.Task[Any]:
        return asyncio.create_task(self.reader.read_from_store(uuid))

    async def load_started(self, n: int = 1) -> None:
        async with asyncio.timeout(5):
            while self.loads < n:
                await asyncio.sleep(0.01)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def reader(redis: Redis, store: Store) -> Reader:
    return Reader(redis, store)


@pytest.fixture
async def writes_paused(settings: Settings) -> AsyncIterator[Redis]:
    """Redis holds every write (the load's cache refill) until unpaused: a read stays in
    flight for as long as the test needs. Yields the controlling connection."""
    admin = Redis.from_url(settings.redis_url)
    await admin.client_pause(10_000, all=False)  # WRITE mode
    try:
        yield admin
    finally:
        await admin.client_unpause()
        await admin.aclose()


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What the event loop reports to its exception handler ("Task exception was never
    retrieved" among others), which pytest's warnings filter never sees."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


@pytest.fixture
def mongo(servers: Backends) -> Process:
    if servers.mongo is None:
        pytest.skip("MongoDB is external; the suite cannot stop it")
    return servers.mongo


@contextlib.contextmanager
def stopped(process: Process) -> Iterator[None]:
    process.stop()
    try:
        yield
    finally:
        process.start()


async def test_a_reader_leaving_does_not_abort_another_readers_shared_read(
    reader: Reader, store: Store, writes_paused: Redis
) -> None:
    session = await add_session(store, amount=21_000)
    first = reader.start(session["uuid"])
    await reader.load_started()  # ...and held in flight by the paused cache refill
    second = reader.start(session["uuid"])
    await asyncio.sleep(0)  # the second joins the flight
    first.cancel()  # its client left (aiohttp cancels the handler)
    with pytest.raises(asyncio.CancelledError):
        await first
    await writes_paused.client_unpause()
    event = await asyncio.wait_for(second, 5)
    assert event is not None
    assert (event.uuid, event.status, event.amount) == (
        session["uuid"],
        StreamStatus.PENDING,
        21_000,
    )
    assert reader.loads == 1


async def test_a_failed_shared_read_reaches_every_reader(
    reader: Reader, store: Store, mongo: Process, loop_errors: list[dict[str, Any]]
) -> None:
    session = await add_session(store)
    with stopped(mongo):
        first = reader.start(session["uuid"])
        await reader.load_started()
        second = reader.start(session["uuid"])
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 10)
    assert [isinstance(r, PyMongoError) for r in results] == [True, True], results
    assert reader.loads == 1
    gc.collect()
    assert loop_errors == []


async def test_a_read_every_reader_left_still_finishes_and_refills_the_cache(
    reader: Reader, store: Store, writes_paused: Redis
) -> None:
    """Decided: the shared load is not cancelled with its last reader (its query is already
    at MongoDB), so its answer is cached for the reader that comes back."""
    session = await add_session(store)
    only = reader.start(session["uuid"])
    await reader.load_started()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    await writes_paused.client_unpause()
    async with asyncio.timeout(5):
        while (cached := await reader.cache.get(session["uuid"])) is None:
            await asyncio.sleep(0.02)
    assert cached.uuid == session["uuid"]
    assert reader.loads == 1


async def test_a_failure_no_reader_is_left_to_receive_is_not_reported_unretrieved(
    reader: Reader, store: Store, mongo: Process, loop_errors: list[dict[str, Any]]
) -> None:
    session = await add_session(store)
    with stopped(mongo):
        only = reader.start(session["uuid"])
        await reader.load_started()
        only.cancel()
        with pytest.raises(asyncio.CancelledError):
            await only
        # The load goes on alone, and fails once server selection gives up (1 s here).
        async with asyncio.timeout(10):
            while any(t.get_name().endswith(session["uuid"]) for t in asyncio.all_tasks()):
                await asyncio.sleep(0.05)
    # A new read is a new load: the failed one is over and forgotten.
    assert await asyncio.wait_for(reader.reader.read_from_store(session["uuid"]), 10) is not None
    assert reader.loads == 2
    gc.collect()
    assert loop_errors == []


async def test_a_miss_that_predates_a_finished_refill_is_answered_from_the_cache(
    reader: Reader, store: Store, redis: Redis
) -> None:
    # Caller B missed the cache while caller A's load was in flight, but reaches the single
    # flight only after A's load refilled the cache and left: B must not query MongoDB again
    # (under load, 50 concurrent pollers of one session cost two queries otherwise).
    session = await add_session(store)
    first = await reader.reader.read_uncached(session["uuid"])
    assert first is not None and reader.loads == 1
    late = await reader.reader.read_uncached(session["uuid"])
    assert late == first and reader.loads == 1
    # Without a cached status, a miss still goes to MongoDB, once per flight.
    await redis.delete(keys.status_key(session["uuid"]))
    assert await reader.reader.read_uncached(session["uuid"]) == first
    assert reader.loads == 2
