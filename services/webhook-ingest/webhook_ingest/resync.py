"""Re-publication of statuses that could not reach Redis when they changed, durably.

A deferred publish is marked on the session in MongoDB (`publishPending`) before the
delivery is acknowledged, so it outlives this process: every ingest replica sweeps the
marks at start-up and then periodically, publishes the session's latest state, and clears
the mark only for the version it published. session-api's cleanup sets the same mark on the
sessions it expires, so their `expired` is published here when Redis missed it.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from pymongo.errors import PyMongoError

from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.model import StatusEvent
from shared.mongo import PUBLISH_PENDING, Store
from shared.tasks import Supervised, Supervisor, checkpoint

log = structlog.get_logger(__name__)

# Redis or MongoDB away: publish again later.
_RETRY_ON: tuple[type[Exception], ...] = (*REDIS_ERRORS, PyMongoError)

# How often a replica looks for marks left by others (a replica that died, say).
SWEEP_SECONDS = 5.0


class Resync:
    """Retries, with backoff, until every marked session's latest state is in Redis."""

    def __init__(
        self,
        store: Store,
        cache: StatusCache,
        *,
        max_delay: float = 2.0,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        self._store = store
        self._cache = cache
        self._max_delay = max_delay
        self._sweep_seconds = sweep_seconds
        self._pending: set[str] = set()
        self._wakeup = asyncio.Event()
        self._task: Supervised | None = None

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def defer(self, event: StatusEvent) -> None:
        """Mark `event`'s session for publication; raises PyMongoError if that fails."""
        await self._store.sessions.update_one(
            {"uuid": event.uuid}, {"$set": {PUBLISH_PENDING: True}}
        )
        self._pending.add(event.uuid)
        self._wakeup.set()

    def start(self, supervisor: Supervisor) -> None:
        self._task = supervisor.spawn("ingest-resync", self._run)

    async def stop(self) -> None:
        if self._task is not None:
            await self._task.stop()
        if self._pending:
            log.info("resync_left_marked", sessions=len(self._pending))

    async def _run(self) -> None:
        delay = 0.05
        # Sweep at once, at start (marks left by a replica that died) and after a restart
        # (an unforeseen failure): nothing marked is skipped.
        self._wakeup.set()
        while True:
            checkpoint()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._sweep_seconds)
            self._wakeup.clear()
            try:
                await self._sweep()
            except PyMongoError as exc:
                log.info("resync_sweep_failed", error=str(exc))
            while self._pending:
                uuid = next(iter(self._pending))
                try:
                    await self._publish(uuid)
                except _RETRY_ON as exc:
                    log.info("resync_retry", uuid=uuid, error=str(exc), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_delay)
                    continue
                self._pending.discard(uuid)
                delay = 0.05

    async def _sweep(self) -> None:
        cursor = self._store.sessions.find({PUBLISH_PENDING: True}, {"uuid": 1, "_id": 0})
        async for doc in cursor:
            self._pending.add(doc["uuid"])

    async def _publish(self, uuid: str) -> None:
        # The latest state, not the one that failed: it may have moved on.
        doc = await self._store.sessions.find_one({"uuid": uuid}, {"_id": 0})
        if doc is None:
            return
        event = StatusEvent.from_session(doc)
        await self._cache.put(event)
        await self._store.clear_publish_pending(uuid, event.version)
        log.info("resync_published", uuid=uuid, version=event.version)
