"""The status read of every stream that opens in the same moment, as one MGET.

A reconnect storm (a deploy, a gateway restart) opens thousands of streams at once, each
reading its session's status from the cache. One GET each queues them all on the gateway's
one command connection, where, on a busy process, the last ones wait past the pool's
timeout. Here one MGET is in flight at a time and the reads that arrive meanwhile go out
together in the next one (up to `BATCH` keys each): the busier the process, the larger the
batches, and the connection never has more than one of these waiting for it. A miss, or
Redis unreachable, falls back per stream to what `StatusReader.read` does then (the
negative cache and MongoDB, single-flight).
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
        # The task sending the batches while there are any (a strong reference: the loop
        # keeps only weak ones); it ends when nothing waits.
        self._sender: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Reads waiting for their batch, plus the sender if running (for leak checks)."""
        return len(self._waiting) + (self._sender is not None)

    async def read(self, uuid: str) -> StatusEvent | None:
        """The current status of `uuid`, or None if no live session has it."""
        fut: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((uuid, fut))
        if self._sender is None:
            # It first runs at the loop's next turn: the reads of this one go out together.
            self._sender = asyncio.create_task(self._send_batches())
        outcome = await fut
        if isinstance(outcome, StatusEvent):
            return outcome
        if outcome is _Outcome.REDIS_DOWN:
            return await self._reader.read_from_store(uuid)
        return await self._reader.read_uncached(uuid)

    async def _send_batches(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:BATCH]
                del self._waiting[:BATCH]
                await self._read(batch)
        finally:
            self._sender = None

    async def _read(self, batch: list[tuple[str, asyncio.Future[_Result]]]) -> None:
        results: list[_Result] = [_Outcome.REDIS_DOWN] * len(batch)
        try:
            raw = await self._cache.get_many_json([uuid for uuid, _ in batch])
            results = [_decode(r) for r in raw]
        except REDIS_ERRORS as exc:
            # Redis down: MongoDB is the source of truth, keep answering from it.
            log.warning("status_cache_unavailable", sessions=len(batch), error=str(exc))
        except Exception:
            # Unforeseen (a cluster client's own errors): each stream takes the slow way,
            # which reports its failure to its caller; the batches go on.
            log.exception("status_batch_failed", sessions=len(batch))
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
