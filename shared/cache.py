"""The Redis status cache and the change feed, written together so they cannot disagree."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis

from . import keys
from .model import StatusEvent

# Set the cached status and publish it, only when it is newer than what is cached. Atomic,
# so concurrent duplicate deliveries, background retries and cache refills publish one event
# per version; the channel is a key (KEYS[2]) so Redis Cluster checks both share a slot.
# "Newer" is (orderCode, version) compared in that order: a version counts the changes of one
# session, and order codes only grow (one counter), so a cached status of an older session
# under the same uuid can never hide a newer session, nor an older one's event replace it.
# Order codes stay below 2^53, exact in Lua's numbers.
_PUT_IF_NEWER = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, old = pcall(cjson.decode, cur)
  if ok and type(old) == 'table' then
    local old_code = tonumber(old['orderCode']) or 0
    local new_code = tonumber(ARGV[5])
    if old_code > new_code
      or (old_code == new_code and (tonumber(old['version']) or 0) >= tonumber(ARGV[2])) then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[3]))
redis.call('DEL', KEYS[3])
if ARGV[4] == '1' then
  redis.call('SPUBLISH', KEYS[2], ARGV[1])
else
  redis.call('PUBLISH', KEYS[2], ARGV[1])
end
return 1
"""


class StatusCache:
    """Cached session status keyed by uuid, with publish-on-change."""

    def __init__(self, redis: Redis, *, sharded: bool = False) -> None:
        self._redis = redis
        self._sharded = sharded
        self._put = redis.register_script(_PUT_IF_NEWER)

    async def get(self, uuid: str) -> StatusEvent | None:
        raw = await self.get_json(uuid)
        return StatusEvent.from_json(raw) if raw is not None else None

    async def get_json(self, uuid: str) -> bytes | None:
        """The cached event exactly as stored (JSON bytes), for answering without re-encoding."""
        raw: bytes | str | None = await self._redis.get(keys.status_key(uuid))
        return raw.encode() if isinstance(raw, str) else raw

    async def get_many_json(self, uuids: Sequence[str]) -> list[bytes | None]:
        """The cached events of `uuids` as stored, in order, in one round trip (per shard on a
        cluster, where one MGET may only name keys of one slot)."""
        names = [keys.status_key(u) for u in uuids]
        if self._sharded:
            raw: list[Any] = await self._redis.mget_nonatomic(names)  # type: ignore[attr-defined]
        else:
            raw = await self._redis.mget(names)
        return [r.encode() if isinstance(r, str) else r for r in raw]

    async def put(self, event: StatusEvent) -> bool:
        """Cache `event` and publish it if it is newer (orderCode, then version) than the cached
        one; True if published."""
        result: Any = await self._put(keys=self._keys(event), args=self._args(event))
        return bool(result)

    async def put_many(self, events: Iterable[StatusEvent]) -> int:
        """`put` each event, in one round trip where Redis allows; how many were published."""
        events = list(events)
        if self._sharded:
            # A cluster pipeline cannot run scripts: one call each (still put-if-newer).
            return sum([await self.put(e) for e in events])
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                await self._put(keys=self._keys(event), args=self._args(event), client=pipe)
            results: list[Any] = await pipe.execute()
        return sum(bool(r) for r in results)

    def _keys(self, event: StatusEvent) -> list[str]:
        uuid = event.uuid
        return [keys.status_key(uuid), keys.status_channel(uuid), keys.unknown_key(uuid)]

    def _args(self, event: StatusEvent) -> list[str | int]:
        sharded = "1" if self._sharded else "0"
        return [
            event.to_json(),
            event.version,
            keys.STATUS_TTL_SECONDS,
            sharded,
            event.order_code,
        ]

    async def mark_unknown(self, uuid: str) -> None:
        await self._redis.set(keys.unknown_key(uuid), b"1", ex=keys.UNKNOWN_TTL_SECONDS)

    async def is_unknown(self, uuid: str) -> bool:
        return bool(await self._redis.exists(keys.unknown_key(uuid)))

    async def count(self) -> int:
        """Number of cached statuses (a SCAN: for stats, not for hot paths)."""
        n = 0
        async for _ in self._redis.scan_iter(match=f"{keys.PREFIX}:status:*", count=1000):
            n += 1
        return n


class BatchedReads:
    """`StatusCache.get_json` for a hot path: the reads that arrive in the same moment go to
    Redis as one MGET (up to `BATCH` keys), one MGET in flight at a time.

    A GET costs the process far more than Redis (a pooled connection taken and given back,
    a write and a read syscall, a timeout armed, a reply parsed, a loop turn to wake up): a
    poller's cached status read cost 2.5 times a bare aiohttp request for that alone. The
    busier the process, the more reads share one round trip. A read is sent after it
    arrived (the batch in flight when it arrives is not its own), so it never answers with a
    status older than the last write Redis acknowledged before the request came in. What the
    MGET raises (Redis unreachable) is raised to every read of its batch.
    """

    BATCH = 500

    def __init__(self, cache: StatusCache) -> None:
        self._cache = cache
        self._waiting: list[tuple[str, asyncio.Future[bytes | None]]] = []
        # The task sending the batches while there are any (a strong reference: the loop
        # keeps only weak ones); it ends when nothing waits.
        self._sender: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Reads waiting for their batch, plus the sender if running (for leak checks)."""
        return len(self._waiting) + (self._sender is not None)

    async def get_json(self, uuid: str) -> bytes | None:
        """The cached event of `uuid` exactly as stored (JSON bytes), or None."""
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((uuid, fut))
        if self._sender is None:
            # It first runs at the loop's next turn: the reads of this one go out together.
            self._sender = asyncio.create_task(self._send_batches())
        return await fut

    async def _send_batches(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self.BATCH]
                del self._waiting[: self.BATCH]
                await self._read(batch)
        finally:
            self._sender = None
            # Left only if this task was cancelled (shutdown): nobody would send them.
            for _, fut in self._waiting:
                fut.cancel()
            self._waiting.clear()

    async def _read(self, batch: list[tuple[str, asyncio.Future[bytes | None]]]) -> None:
        try:
            found = await self._cache.get_many_json([uuid for uuid, _ in batch])
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():  # its request may have gone meanwhile
                    fut.set_exception(exc)
            return
        except BaseException:
            for _, fut in batch:
                fut.cancel()
            raise
        for (_, fut), body in zip(batch, found, strict=True):
            if not fut.done():
                fut.set_result(body)
