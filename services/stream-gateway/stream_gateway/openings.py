"""The status read of every stream that opens in the same moment, as one MGET.

A reconnect storm (a deploy, a gateway restart) opens thousands of streams at once, each
reading its session's status from the cache. One GET each queues them all on the gateway's
one command connection; here the reads of one event-loop turn go out together (up to
`BATCH` keys per MGET). A miss, or Redis unreachable, falls back per stream to what
`StatusReader.read` does then (the negative cache and MongoDB, single-flight).
"""

from __future__ import annotations

import asyncio
import enum

import structlog

from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.model import StatusEvent
from shared.status import StatusReader

log = structlog.get_logger(__name__)

BATCH = 500


class _Outcome(enum.Enum):
    MISS = "miss"
    REDIS_DOWN = "redis-down"


_Result = StatusEvent | _Outcome


class OpeningReads:
    """`read(uuid)` as `StatusReader.read`, batched with the reads of the same loop turn."""

    def __init__(self, reader: StatusReader, cache: StatusCache) -> None:
        self._reader = reader
        self._cache = cache
        self._waiting: list[tuple[str, asyncio.Future[_Result]]] = []
        # Strong references to the batches in flight (the loop keeps only weak ones).
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Reads waiting for their batch, plus batches in flight (for leak checks)."""
        return len(self._waiting) + len(self._batches)

    async def read(self, uuid: str) -> StatusEvent | None:
        """The current status of `uuid`, or None if no live session has it."""
        fut: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((uuid, fut))
        if len(self._waiting) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        outcome = await fut
        if isinstance(outcome, StatusEvent):
            return outcome
        if outcome is _Outcome.REDIS_DOWN:
            return await self._reader.read_from_store(uuid)
        return await self._reader.read_uncached(uuid)

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        for i in range(0, len(waiting), BATCH):
            task = asyncio.create_task(self._read(waiting[i : i + BATCH]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _read(self, batch: list[tuple[str, asyncio.Future[_Result]]]) -> None:
        results: list[_Result]
        try:
            raw = await self._cache.get_many_json([uuid for uuid, _ in batch])
            results = [_decode(r) for r in raw]
        except REDIS_ERRORS as exc:
            # Redis down: MongoDB is the source of truth, keep answering from it.
            log.warning("status_cache_unavailable", sessions=len(batch), error=str(exc))
            results = [_Outcome.REDIS_DOWN] * len(batch)
        except BaseException:
            results = [_Outcome.REDIS_DOWN] * len(batch)
            raise
        finally:
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():  # its stream may have gone meanwhile
                    fut.set_result(result)


def _decode(raw: bytes | None) -> _Result:
    if raw is None:
        return _Outcome.MISS
    try:
        return StatusEvent.from_json(raw)
    except (ValueError, KeyError, TypeError):
        return _Outcome.MISS  # unreadable: read it again the slow way, which rewrites it
