"""Coordination across replicas in MongoDB: per-account lease locks and the orderCode counter."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

from shared.model import MAX_ORDER_CODE
from shared.mongo import Doc

from .errors import AccountBusy, StoreUnavailable

log = structlog.get_logger(__name__)

LOCKS = "locks"
COUNTERS = "counters"
# A lock is held for a count and two inserts (milliseconds); the lease only matters when a
# replica dies holding it, and must outlast MongoDB's own timeouts on a slow round trip.
LOCK_LEASE_MS = 10_000
# How long a request waits for its account's lock before answering 503 (retry).
LOCK_WAIT_SECONDS = 5.0
ORDER_CODE_COUNTER = "orderCode"


@dataclass
class _LocalTurn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class AccountLocks:
    """Per-account mutual exclusion across replicas, as leased documents in MongoDB.

    Acquire: insert `{_id: account}` (the unique `_id` lets one insert win), or take over a
    lease that has run out with a conditional update. Release: delete it if still ours.
    Within one process, requests for one account queue on an asyncio lock first, so only
    one of them at a time competes for the MongoDB lock.
    """

    def __init__(
        self,
        locks: AsyncCollection[Doc],
        *,
        lease_ms: int = LOCK_LEASE_MS,
        wait_seconds: float = LOCK_WAIT_SECONDS,
    ) -> None:
        self._locks = locks
        self._lease_ms = lease_ms
        self._wait = wait_seconds
        self._local: dict[str, _LocalTurn] = {}

    @contextlib.asynccontextmanager
    async def hold(self, account: str) -> AsyncIterator[str]:
        """Hold `account`'s lock for the block; yields the lock's token (AccountBusy on wait)."""
        token = secrets.token_hex(12)
        turn = self._local.setdefault(account, _LocalTurn())
        turn.users += 1
        try:
            try:
                async with asyncio.timeout(self._wait):
                    await turn.lock.acquire()
                    try:
                        await self._acquire(account, token)
                    except BaseException:
                        # Timed out mid-insert, the lock may be ours in MongoDB after all.
                        await asyncio.shield(self._release(account, token))
                        turn.lock.release()
                        raise
            except TimeoutError:
                raise AccountBusy("this account is busy; try again in a moment") from None
            try:
                yield token
            finally:
                try:
                    # Shielded: a cancelled request must still give the lock back.
                    await asyncio.shield(self._release(account, token))
                finally:
                    turn.lock.release()
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._local[account]

    async def still_held(self, account: str, token: str) -> bool:
        return await self._locks.find_one({"_id": account, "owner": token}, {"_id": 1}) is not None

    async def _acquire(self, account: str, token: str) -> None:
        delay = 0.002
        while not await self._try_acquire(account, token):
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.05)

    async def _try_acquire(self, account: str, token: str) -> bool:
        # Epoch milliseconds, not a datetime: a lease compared as a number needs no `$set`
        # of a datetime (shared.mongo: stand-in).
        now_ms = int(time.time() * 1000)
        lease = {"owner": token, "leaseUntil": now_ms + self._lease_ms}
        try:
            await self._locks.insert_one({"_id": account, **lease})
        except DuplicateKeyError:
            taken = await self._locks.find_one_and_update(
                {"_id": account, "leaseUntil": {"$lt": now_ms}},
                {"$set": lease, "$currentDate": {"takenOverAt": True}},
            )
            if taken is None:
                return False
            log.warning("account_lock_taken_over", account=account, previous=taken.get("owner"))
        return True

    async def _release(self, account: str, token: str) -> None:
        try:
            await self._locks.delete_one({"_id": account, "owner": token})
        except PyMongoError as exc:
            # The lease runs out on its own.
            log.warning("account_lock_release_failed", account=account, error=str(exc))


class OrderCodes:
    """orderCodes unique across replicas: one counter document, incremented atomically.

    The counter is seeded with the current time in milliseconds the first time it is used,
    so after a database reset new codes start above every code issued before (unless more
    than 1,000 codes a second were issued on average) and PayOS, which remembers every code
    of a merchant, does not refuse them as duplicates.
    """

    def __init__(self, counters: AsyncCollection[Doc]) -> None:
        self._counters = counters

    async def next(self) -> int:
        while True:
            doc = await self._counters.find_one_and_update(
                {"_id": ORDER_CODE_COUNTER},
                {"$inc": {"seq": 1}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                code = int(doc["seq"])
                if not 0 < code <= MAX_ORDER_CODE:
                    raise StoreUnavailable("orderCode counter is out of PayOS's range")
                return code
            with contextlib.suppress(DuplicateKeyError):
                await self._counters.insert_one(
                    {"_id": ORDER_CODE_COUNTER, "seq": int(time.time() * 1000)}
                )
