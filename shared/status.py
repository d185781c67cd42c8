"""Reading a session's status: the Redis cache first, MongoDB on a miss, refilling the cache."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence

import structlog
from pymongo.errors import PyMongoError

from .cache import StatusCache
from .clients import REDIS_ERRORS
from .model import StatusEvent
from .mongo import Store
from .singleflight import SingleFlight

log = structlog.get_logger(__name__)


class StatusReader:
    """Cache-aside reads with single-flight: concurrent misses for one uuid share one query."""

    def __init__(
        self,
        cache: StatusCache,
        store: Store,
        *,
        on_db_query: Callable[[], None] | None = None,
    ) -> None:
        self._cache = cache
        self._store = store
        self._loads: SingleFlight[str, StatusEvent | None] = SingleFlight("status-load")
        self._on_db_query = on_db_query

    async def read(self, uuid: str) -> StatusEvent | None:
        """The current status of `uuid`, or None if no live session has it."""
        try:
            cached = await self._cache.get(uuid)
        except REDIS_ERRORS as exc:
            # Redis down: MongoDB is the source of truth, keep answering from it.
            log.warning("status_cache_unavailable", uuid=uuid, error=str(exc))
            return await self.read_from_store(uuid)
        if cached is not None:
            return cached
        return await self.read_uncached(uuid)

    async def read_uncached(self, uuid: str) -> StatusEvent | None:
        """After a cache miss: the negative cache, then MongoDB."""
        try:
            if await self._cache.is_unknown(uuid):
                return None
        except REDIS_ERRORS as exc:
            log.warning("status_cache_unavailable", uuid=uuid, error=str(exc))
            return await self.read_from_store(uuid)
        # Redis answers: look again once this load is the one in flight. A caller whose miss
        # predates the refill of a load that has just finished would otherwise query again.
        return await self._loads.run(uuid, functools.partial(self._load, uuid, recheck=True))

    async def read_from_store(self, uuid: str) -> StatusEvent | None:
        """Read MongoDB (once for all concurrent callers) and refill the cache."""
        return await self._loads.run(uuid, functools.partial(self._load, uuid))

    async def read_fresh(self, uuids: Sequence[str]) -> dict[str, StatusEvent]:
        """The latest state of each live session among `uuids`, from MongoDB in one query,
        repairing the cache where it is behind (which publishes the repair).

        For the gateway after a pub/sub reconnect: the cache may have lost the very write
        whose publish the gateway missed (a Redis failover), so reading it again would
        leave the browser on `pending`. Sessions MongoDB does not have (deleted by TTL) or
        a MongoDB outage fall back to the cache.
        """
        try:
            if self._on_db_query is not None:
                self._on_db_query()
            docs = await self._store.find_sessions(uuids)
        except PyMongoError as exc:
            log.warning("status_store_unavailable", sessions=len(uuids), error=str(exc))
            docs = []
        found = {doc["uuid"]: StatusEvent.from_session(doc) for doc in docs}
        if found:
            await _best_effort(self._cache.put_many(found.values()), f"{len(found)} sessions")
        for uuid in uuids:
            if uuid not in found and (cached := await self._cached(uuid)) is not None:
                found[uuid] = cached
        return found

    async def _cached(self, uuid: str) -> StatusEvent | None:
        """The cached status, or None when there is none or Redis is unavailable."""
        try:
            return await self._cache.get(uuid)
        except REDIS_ERRORS as exc:
            log.warning("status_cache_unavailable", uuid=uuid, error=str(exc))
            return None

    async def _load(self, uuid: str, *, recheck: bool = False) -> StatusEvent | None:
        if recheck and (cached := await self._cached(uuid)) is not None:
            return cached
        if self._on_db_query is not None:
            self._on_db_query()
        doc = await self._store.find_session(uuid)
        event = StatusEvent.from_session(doc) if doc is not None else None
        await _best_effort(
            self._cache.put(event) if event is not None else self._cache.mark_unknown(uuid),
            uuid,
        )
        return event


async def _best_effort(op: Awaitable[object], uuid: str) -> None:
    try:
        await op
    except REDIS_ERRORS as exc:
        log.warning("status_cache_refill_failed", uuid=uuid, error=str(exc))
