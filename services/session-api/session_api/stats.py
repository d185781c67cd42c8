"""The counts behind `GET /api/stats`: one snapshot per process, refreshed at most once a second.

Counting cached orders (a SCAN of every status key) and subscriptions (PUBSUB CHANNELS and
NUMSUB) costs Redis work in proportion to the sessions, on the Redis that carries the
payments, and the endpoint is public. So callers within a second of the last count get that
snapshot, and callers arriving while it is retaken share the one count: whatever the call
rate, a process counts at most once a second. Counters kept by every writer were the other
way: exact and O(1), but one more write on the payment path, and they drift whenever a cache
entry expires (its 15-minute TTL) or a process dies between two writes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from pymongo.errors import PyMongoError
from redis.asyncio import Redis

from shared import keys
from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.model import SessionStatus, utcnow
from shared.mongo import Store
from shared.singleflight import SingleFlight

log = structlog.get_logger(__name__)

MAX_AGE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Stats:
    """One count; None where the backend that knows could not tell."""

    cached_orders: int | None
    active_subscriptions: int | None
    pending_sessions: int | None
    taken_at: datetime
    # Backend -> why it could not count. Names hosts and ports: for admins only.
    errors: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int | None]:
        """The plain counts: all that anyone may see."""
        return {
            "cachedOrders": self.cached_orders,
            "activeSubscriptions": self.active_subscriptions,
            "pendingSessions": self.pending_sessions,
        }


class StatsSnapshot:
    """The latest `Stats`, retaken (once, for all concurrent callers) when over a second old."""

    def __init__(
        self,
        redis: Redis,
        cache: StatusCache,
        store: Store,
        *,
        cluster: bool,
    ) -> None:
        self._redis = redis
        self._cache = cache
        self._store = store
        self._cluster = cluster
        self._latest: Stats | None = None
        self._taken = 0.0
        self._counting: SingleFlight[str, Stats] = SingleFlight("stats")

    async def get(self) -> Stats:
        latest = self._latest
        if latest is not None and time.monotonic() - self._taken < MAX_AGE_SECONDS:
            return latest
        return await self._counting.run("count", self._count)

    async def _count(self) -> Stats:
        errors: dict[str, str] = {}
        (cached, subscribed), pending = await asyncio.gather(
            self._redis_counts(errors), self._pending_sessions(errors)
        )
        stats = Stats(cached, subscribed, pending, utcnow(), errors)
        # Aged from the end of the count: a slow count is not retaken back to back.
        self._latest, self._taken = stats, time.monotonic()
        return stats

    async def _redis_counts(self, errors: dict[str, str]) -> tuple[int | None, int | None]:
        try:
            return await self._cache.count(), await self._subscriptions()
        except REDIS_ERRORS as exc:
            log.warning("stats_redis_unavailable", error=str(exc))
            errors["redis"] = str(exc)
            return None, None

    async def _subscriptions(self) -> int:
        """Subscriptions to session channels, counted by Redis (every gateway replica)."""
        pattern = f"{keys.CHANNEL_PREFIX}*"
        if self._cluster:
            channels = await self._redis.pubsub_shardchannels(pattern)
            counts = await self._redis.pubsub_shardnumsub(*channels) if channels else []
        else:
            channels = await self._redis.pubsub_channels(pattern)
            counts = await self._redis.pubsub_numsub(*channels) if channels else []
        return sum(int(n) for _, n in counts)

    async def _pending_sessions(self, errors: dict[str, str]) -> int | None:
        try:
            return await self._store.sessions.count_documents(
                {"status": SessionStatus.PENDING.value, "expiresAt": {"$gt": utcnow()}}
            )
        except PyMongoError as exc:
            log.warning("stats_store_unavailable", error=str(exc))
            errors["mongodb"] = str(exc)
            return None
