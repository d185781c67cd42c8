"""The status cache's put-if-newer, on a real redis-server: what may replace a cached status;
and the pollers' batched reads."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid as uuidlib
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from devstack.servers import LocalRedisCluster, free_port
from shared import keys
from shared.cache import BatchedReads, StatusCache
from shared.model import StatusEvent, StreamStatus, utcnow
from shared.settings import Settings
from tests.helpers import subscribed

UUID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"


@pytest.fixture
async def cache(settings: Settings) -> AsyncIterator[StatusCache]:
    redis = Redis.from_url(settings.redis_url)
    yield StatusCache(redis)
    await redis.aclose()


def event(order_code: int, status: StreamStatus, version: int) -> StatusEvent:
    return StatusEvent(
        uuid=UUID,
        order_code=order_code,
        status=status,
        amount=10_000,
        amount_paid=10_000 if status is StreamStatus.DONE else 0,
        updated_at=utcnow() + timedelta(milliseconds=version),
        version=version,
    )


async def test_a_newer_order_replaces_an_older_orders_cached_status_whatever_its_version(
    cache: StatusCache, settings: Settings
) -> None:
    # Versions count the changes of one session; a newer session (a larger orderCode: order
    # codes only grow) starts again at 1 and must not be hidden by an older one's `expired`.
    await cache.put(event(1_000, StreamStatus.EXPIRED, 2))
    async with subscribed(settings.redis_url, UUID) as sub:
        assert await cache.put(event(1_001, StreamStatus.PENDING, 1)) is True
        [published] = await sub.wait_for(1)
    assert (published.order_code, published.status) == (1_001, StreamStatus.PENDING)
    cached = await cache.get(UUID)
    assert cached is not None and (cached.order_code, cached.version) == (1_001, 1)


async def test_an_older_orders_event_never_replaces_a_newer_sessions_status(
    cache: StatusCache,
) -> None:
    await cache.put(event(1_001, StreamStatus.PENDING, 1))
    assert await cache.put(event(1_000, StreamStatus.DONE, 3)) is False
    cached = await cache.get(UUID)
    assert cached is not None and (cached.order_code, cached.status) == (
        1_001,
        StreamStatus.PENDING,
    )


async def test_a_put_keeps_the_status_for_fifteen_minutes(
    cache: StatusCache, settings: Settings
) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        assert await cache.put(event(1_000, StreamStatus.PENDING, 1)) is True
        ttl_ms = await redis.pttl(keys.status_key(UUID))
        # The original's cache TTL: 15 minutes, neither forever nor 900 milliseconds.
        assert 895_000 < ttl_ms <= 900_000
        assert await cache.put(event(1_000, StreamStatus.DONE, 2)) is True
        assert 895_000 < await redis.pttl(keys.status_key(UUID)) <= 900_000
    finally:
        await redis.aclose()


async def test_a_put_clears_the_unknown_marker(cache: StatusCache) -> None:
    # A uuid looked up before its session existed is marked unknown; once its status is
    # cached it must be known again, or readers keep answering 404 for a live session.
    await cache.mark_unknown(UUID)
    assert await cache.is_unknown(UUID)
    assert await cache.put(event(1_000, StreamStatus.PENDING, 1)) is True
    assert not await cache.is_unknown(UUID)


async def test_a_repeated_or_older_version_is_neither_cached_nor_published(
    cache: StatusCache, settings: Settings
) -> None:
    assert await cache.put(event(1_000, StreamStatus.DONE, 3)) is True
    redis = Redis.from_url(settings.redis_url)
    try:
        async with subscribed(settings.redis_url, UUID) as sub:
            assert await cache.put(event(1_000, StreamStatus.DONE, 3)) is False
            assert await cache.put(event(1_000, StreamStatus.PENDING, 2)) is False
            # Whatever the puts published arrived before this sentinel: only it may arrive.
            sentinel = event(999_999, StreamStatus.PENDING, 99)
            await redis.publish(keys.status_channel(UUID), sentinel.to_json())
            [first] = await sub.wait_for(1)
        assert (first.order_code, first.version) == (999_999, 99)
    finally:
        await redis.aclose()
    cached = await cache.get(UUID)
    assert cached is not None and (cached.status, cached.version) == (StreamStatus.DONE, 3)


async def test_put_many_publishes_each_newer_event_once_and_counts_them(
    cache: StatusCache, settings: Settings
) -> None:
    other = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    events = [
        event(1_000, StreamStatus.PENDING, 1),
        event(1_000, StreamStatus.DONE, 2),
        event(1_000, StreamStatus.PENDING, 1),  # older than what the batch cached before it
        dataclasses.replace(event(2_000, StreamStatus.PENDING, 1), uuid=other),
    ]
    async with subscribed(settings.redis_url, UUID) as sub:
        assert await cache.put_many(iter(events)) == 3
        published = await sub.wait_for(2)
    assert [(e.status, e.version) for e in published] == [
        (StreamStatus.PENDING, 1),
        (StreamStatus.DONE, 2),
    ]
    cached = await cache.get(UUID)
    assert cached is not None and (cached.status, cached.version) == (StreamStatus.DONE, 2)
    assert await cache.count() == 2


async def test_a_sharded_cache_publishes_on_the_sharded_channel(settings: Settings) -> None:
    # On a Redis Cluster the gateway listens with SSUBSCRIBE: a plain PUBLISH would reach no one.
    redis = Redis.from_url(settings.redis_url)
    pubsub = redis.pubsub()
    try:
        await pubsub.ssubscribe(keys.status_channel(UUID))
        confirmed = await pubsub.get_message(timeout=5)
        assert confirmed is not None and confirmed["type"] == "ssubscribe"
        cache = StatusCache(redis, sharded=True)
        assert await cache.put(event(1_000, StreamStatus.PENDING, 1)) is True
        olds = [event(1_000, StreamStatus.PENDING, 1), event(1_000, StreamStatus.DONE, 2)]
        assert await cache.put_many(iter(olds)) == 1
        versions = []
        for _ in range(2):
            msg = await pubsub.get_message(timeout=5)
            assert msg is not None and msg["type"] == "smessage"
            versions.append(StatusEvent.from_json(msg["data"]).version)
        assert versions == [1, 2]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


async def test_get_json_answers_bytes_whatever_the_clients_decoding(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        cache = StatusCache(redis)
        assert await cache.get_json(UUID) is None
        stored = event(1_000, StreamStatus.PENDING, 1)
        await cache.put(stored)
        raw = await cache.get_json(UUID)
        assert isinstance(raw, bytes) and raw == stored.to_json().encode()
    finally:
        await redis.aclose()


async def test_an_unknown_marker_lasts_as_long_as_configured(
    cache: StatusCache, settings: Settings
) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        assert not await cache.is_unknown(UUID)
        await cache.mark_unknown(UUID)
        assert await cache.is_unknown(UUID)
        ttl = await redis.ttl(keys.unknown_key(UUID))
        assert keys.UNKNOWN_TTL_SECONDS - 2 <= ttl <= keys.UNKNOWN_TTL_SECONDS
    finally:
        await redis.aclose()


@pytest.mark.parametrize(
    ("cached", "order_code"),
    [
        (b'{"orderCode":1000,"status":"pending"}', 1_000),
        (b'{"version":5,"status":"pending"}', 1),
        (b'"a string"', 1_000),
        (b"5", 1_000),
        (b"not json", 1_000),
    ],
    ids=["without-version", "without-order-code", "json-string", "json-number", "not-json"],
)
async def test_a_cached_value_that_is_no_status_is_replaced_by_the_first_version(
    cache: StatusCache, settings: Settings, cached: bytes, order_code: int
) -> None:
    # Only a status of the same or a newer session can hold a put back; what is missing
    # counts as nothing (order code 0, version 0), and what is not a JSON object is replaced.
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.set(keys.status_key(UUID), cached)
        assert await cache.put(event(order_code, StreamStatus.PENDING, 1)) is True
        stored = await cache.get(UUID)
        assert stored is not None and (stored.order_code, stored.version) == (order_code, 1)
    finally:
        await redis.aclose()


# -- BatchedReads: the reads of one moment as one MGET -------------------------------------


def cached_event(uuid: str, version: int = 1) -> StatusEvent:
    return dataclasses.replace(event(1_000, StreamStatus.PENDING, version), uuid=uuid)


async def read_at_once(
    reads: BatchedReads, uuids: list[str], settings: Settings
) -> tuple[list[bytes | None], dict[str, Any]]:
    """`uuids` read at the same moment; the answers, and Redis's command counts meanwhile."""
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.config_resetstat()
        bodies = await asyncio.gather(*(reads.get_json(u) for u in uuids))
        stats: dict[str, Any] = await redis.info("commandstats")
    finally:
        await redis.aclose()
    return bodies, stats


async def test_reads_of_the_same_moment_share_one_mget_and_each_gets_its_own_status(
    cache: StatusCache, settings: Settings
) -> None:
    uuids = [str(uuidlib.uuid4()) for _ in range(50)]
    for u in uuids[:40]:
        await cache.put(cached_event(u))
    reads = BatchedReads(cache)
    bodies, stats = await read_at_once(reads, uuids, settings)
    assert [b is not None and StatusEvent.from_json(b).uuid for b in bodies] == [
        *uuids[:40],
        *[False] * 10,
    ]
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats
    assert reads.pending == 0


class HeldCache(StatusCache):
    """A StatusCache whose MGET, once answered by Redis, is held until `release` is set."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.answered = asyncio.Event()
        self.release = asyncio.Event()

    async def get_many_json(self, uuids: Sequence[str]) -> list[bytes | None]:
        found = await super().get_many_json(uuids)
        self.answered.set()
        await self.release.wait()
        return found


async def test_a_read_arriving_while_a_batch_is_in_flight_sees_the_writes_before_it(
    settings: Settings,
) -> None:
    # Its batch is the next one, sent after it came in: never the answer of the batch
    # already on its way, which may predate a write acknowledged before the read arrived.
    redis = Redis.from_url(settings.redis_url)
    try:
        cache = HeldCache(redis)
        u = str(uuidlib.uuid4())
        await cache.put(cached_event(u, version=1))
        reads = BatchedReads(cache)
        first = asyncio.create_task(reads.get_json(u))
        async with asyncio.timeout(5):
            await cache.answered.wait()
        assert reads.pending == 1  # the sender, its batch in flight
        await cache.put(cached_event(u, version=2))
        second = asyncio.create_task(reads.get_json(u))
        await asyncio.sleep(0)
        assert reads.pending == 2  # and one read waiting for the next batch
        cache.release.set()
        async with asyncio.timeout(5):
            old, new = await asyncio.gather(first, second)
    finally:
        await redis.aclose()
    assert old is not None and StatusEvent.from_json(old).version == 1
    assert new is not None and StatusEvent.from_json(new).version == 2
    assert reads.pending == 0


async def test_a_read_that_leaves_does_not_take_its_batchs_answers_with_it(
    settings: Settings,
) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        cache = HeldCache(redis)
        uuids = [str(uuidlib.uuid4()) for _ in range(3)]
        for u in uuids:
            await cache.put(cached_event(u))
        reads = BatchedReads(cache)
        tasks = [asyncio.create_task(reads.get_json(u)) for u in uuids]
        async with asyncio.timeout(5):
            await cache.answered.wait()
        tasks[0].cancel()
        cache.release.set()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await redis.aclose()
    assert isinstance(results[0], asyncio.CancelledError)
    assert [StatusEvent.from_json(r).uuid for r in results[1:]] == uuids[1:]  # type: ignore[arg-type]
    assert reads.pending == 0


async def test_with_redis_unreachable_every_read_of_the_batch_raises_a_redis_error() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=1)
    try:
        reads = BatchedReads(StatusCache(redis))
        uuids = [str(uuidlib.uuid4()) for _ in range(5)]
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                *(reads.get_json(u) for u in uuids), return_exceptions=True
            )
    finally:
        await redis.aclose()
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert reads.pending == 0


async def test_more_reads_than_one_batch_holds_go_out_in_batches_of_500(
    cache: StatusCache, settings: Settings
) -> None:
    uuids = [str(uuidlib.uuid4()) for _ in range(BatchedReads.BATCH + 1)]
    await cache.put(cached_event(uuids[-1]))
    bodies, stats = await read_at_once(BatchedReads(cache), uuids, settings)
    assert BatchedReads.BATCH == 500
    assert bodies[:-1] == [None] * BatchedReads.BATCH
    assert bodies[-1] is not None and StatusEvent.from_json(bodies[-1]).uuid == uuids[-1]
    assert stats["cmdstat_mget"]["calls"] == 2


async def test_reads_left_when_the_sender_is_cancelled_are_cancelled_not_left_waiting(
    settings: Settings,
) -> None:
    """At shutdown the loop cancels the sender: the reads of the batch in flight and those
    waiting for the next one end (cancelled) instead of waiting for an answer nobody sends."""
    redis = Redis.from_url(settings.redis_url)
    try:
        cache = HeldCache(redis)
        reads = BatchedReads(cache)
        in_flight = asyncio.create_task(reads.get_json(str(uuidlib.uuid4())))
        async with asyncio.timeout(5):
            await cache.answered.wait()
        waiting = asyncio.create_task(reads.get_json(str(uuidlib.uuid4())))
        await asyncio.sleep(0)
        sender = reads._sender
        assert sender is not None
        sender.cancel()
        async with asyncio.timeout(5):
            results = await asyncio.gather(in_flight, waiting, return_exceptions=True)
    finally:
        await redis.aclose()
    assert [type(r) for r in results] == [asyncio.CancelledError] * 2
    assert reads.pending == 0
    assert not reads._waiting


async def test_on_a_cluster_the_reads_of_one_batch_span_every_shard(tmp_path: Path) -> None:
    """One MGET may only name keys of one slot on a cluster: a sharded cache reads each
    shard's keys apart and answers in the order asked."""
    cluster = LocalRedisCluster(tmp_path / "cluster")
    await asyncio.to_thread(cluster.start)
    client = RedisCluster.from_url(cluster.url)
    try:
        cache = StatusCache(client, sharded=True)  # type: ignore[arg-type]
        uuids = [str(uuidlib.uuid4()) for _ in range(30)]
        for u in uuids[:20]:
            await cache.put(cached_event(u))
        slots = {client.keyslot(keys.status_key(u)) for u in uuids}
        found = await cache.get_many_json(uuids)
    finally:
        await client.aclose()
        await asyncio.to_thread(cluster.stop)
    assert len(slots) > 1
    assert [b is not None and StatusEvent.from_json(b).uuid for b in found] == [
        *uuids[:20],
        *[False] * 10,
    ]
