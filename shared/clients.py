"""Client lifecycles as aiohttp cleanup contexts: opened at start-up, closed at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import structlog
from aiohttp import web
from pymongo.errors import PyMongoError
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .appkeys import CACHE, REDIS, SETTINGS, STORE, SUPERVISOR
from .cache import StatusCache
from .mongo import Store, mongo_client
from .settings import Settings

log = structlog.get_logger(__name__)

# How long a command waits for a free connection of a bounded pool before it fails.
POOL_WAIT_SECONDS = 2.0
# A cluster client cannot queue for a connection (redis-py's cluster pool fails when full), so
# a bounded client gets at least this many connections per node: still a fixed number.
CLUSTER_MIN_CONNECTIONS_PER_NODE = 32
SHARDED_PUBSUB_COUNTS = ("PUBSUB SHARDCHANNELS", "PUBSUB SHARDNUMSUB")

CleanupCtx = Callable[[web.Application], AsyncIterator[None]]

# "Redis is unavailable", whichever client says it: a Redis Cluster with no reachable node (all
# of them down or restarting) raises RedisClusterException, which is not a RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    """First of every service's cleanup contexts: whatever task is left is stopped last."""
    yield
    await app[SUPERVISOR].stop()


def redis_client(
    settings: Settings, *, max_connections: int | None = None, client_name: str | None = None
) -> Redis:
    """A pooled client that retries briefly, then fails fast, so callers can fall back.

    With `max_connections`, commands queue for a free connection instead of opening more (a
    process serving thousands of clients stays at a fixed number of Redis connections), and
    `client_name` names them in Redis's CLIENT LIST.

    With `REDIS_CLUSTER=true` it is a `RedisCluster` (found from the same `REDIS_URL`),
    typed as `Redis`: the services use only commands both have (single-key commands, scripts
    whose keys share a hash tag, SCAN, PING, PUBSUB counts), and the cluster client routes
    each to the node owning its slot.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": 1.0,
        "socket_timeout": 2.0,
        "health_check_interval": 15,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "client_name": client_name,
    }
    if settings.redis_cluster:
        if max_connections is not None:
            options["max_connections"] = max(max_connections, CLUSTER_MIN_CONNECTIONS_PER_NODE)
        cluster = RedisCluster.from_url(settings.redis_url, **options)
        # A node counts only its own shard channels' subscribers, but redis-py sends these to
        # one node: ask every primary and merge (lists joined, counts summed per channel).
        for command in SHARDED_PUBSUB_COUNTS:
            cluster.command_flags[command] = RedisCluster.PRIMARIES
        return cast(Redis, cluster)
    if max_connections is None:
        return Redis.from_url(settings.redis_url, **options)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=max_connections, timeout=POOL_WAIT_SECONDS, **options
    )
    return Redis.from_pool(pool)


def bounded_redis_ctx(
    max_connections: int | None = None, client_name: str | None = None
) -> CleanupCtx:
    """Open Redis and the status cache (over at most `max_connections` connections named
    `client_name`, when given); Redis may be down at start-up (readiness says so)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        redis = redis_client(settings, max_connections=max_connections, client_name=client_name)
        app[REDIS] = redis
        app[CACHE] = StatusCache(redis, sharded=settings.redis_cluster)
        yield
        await redis.aclose()

    return ctx


# Unbounded: the pool opens a connection per concurrent command.
redis_ctx = bounded_redis_ctx()


# How long shutdown lets an index creation under way finish before cancelling it.
INDEX_STOP_WAIT_SECONDS = 2.0


async def mongo_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open MongoDB and create the indexes, retrying in the background while MongoDB is down.

    Deduplication rests on the unique indexes, so until they exist the store reports itself
    not ready (and /readyz and the ingest say so) instead of writing without them.
    """
    store = Store(mongo_client(app[SETTINGS]))
    app[STORE] = store
    task = app[SUPERVISOR].spawn("mongo-indexes", lambda: _ensure_indexes(store), forever=False)
    yield
    if task.task is not None:
        # A creation under way is let finish (briefly): a command cancelled halfway leaves
        # its connection's socket behind, which the client's close does not reach.
        await asyncio.wait([task.task], timeout=INDEX_STOP_WAIT_SECONDS)
    await task.stop()
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
