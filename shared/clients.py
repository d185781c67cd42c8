"""Client lifecycles as aiohttp cleanup contexts: opened at start-up, closed at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from pymongo.errors import PyMongoError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .appkeys import CACHE, REDIS, SETTINGS, STORE
from .cache import StatusCache
from .mongo import Store, mongo_client
from .settings import Settings

log = structlog.get_logger(__name__)


def redis_client(settings: Settings) -> Redis:
    """A pooled client that retries briefly, then fails fast, so callers can fall back."""
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open Redis and the status cache; Redis may be down at start-up (readiness says so)."""
    settings = app[SETTINGS]
    redis = redis_client(settings)
    app[REDIS] = redis
    app[CACHE] = StatusCache(redis, sharded=settings.redis_cluster)
    yield
    await redis.aclose()


async def mongo_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open MongoDB and create the indexes, retrying in the background while MongoDB is down.

    Deduplication rests on the unique indexes, so until they exist the store reports itself
    not ready (and /readyz and the ingest say so) instead of writing without them.
    """
    store = Store(mongo_client(app[SETTINGS]))
    app[STORE] = store
    task = asyncio.create_task(_ensure_indexes(store))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await store.client.close()


async def _ensure_indexes(store: Store) -> None:
    delay = 0.2
    while True:
        try:
            await store.ensure_indexes()
        except PyMongoError as exc:
            log.warning("mongo_indexes_deferred", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            return
