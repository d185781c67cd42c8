"""The status cache's put-if-newer, on a real redis-server: what may replace a cached status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from redis.asyncio import Redis

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
