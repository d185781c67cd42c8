"""Background re-publication of statuses that could not reach Redis when they changed."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from pymongo.errors import PyMongoError
from redis.exceptions import RedisError

from shared.cache import StatusCache
from shared.model import StatusEvent
from shared.mongo import Store

log = structlog.get_logger(__name__)


class Resync:
    """Retries, with backoff, until every scheduled session's latest state is in Redis."""

    def __init__(self, store: Store, cache: StatusCache, *, max_delay: float = 2.0) -> None:
        self._store = store
        self._cache = cache
        self._max_delay = max_delay
        self._pending: set[str] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def schedule(self, uuid: str) -> None:
        self._pending.add(uuid)
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="resync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            log.warning("resync_abandoned", sessions=len(self._pending))

    async def _run(self) -> None:
        delay = 0.05
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                uuid = next(iter(self._pending))
                try:
                    # The latest state, not the one that failed: it may have moved on.
                    doc = await self._store.sessions.find_one({"uuid": uuid}, {"_id": 0})
                    if doc is not None:
                        await self._cache.put(StatusEvent.from_session(doc))
                except (RedisError, PyMongoError) as exc:
                    log.info("resync_retry", uuid=uuid, error=str(exc), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_delay)
                    continue
                self._pending.discard(uuid)
                delay = 0.05
                log.info("resync_published", uuid=uuid)
