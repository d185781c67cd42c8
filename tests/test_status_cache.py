"""The status cache's put-if-newer, on a real redis-server: what may replace a cached status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from shared import keys
from shared.cache import StatusCache
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
