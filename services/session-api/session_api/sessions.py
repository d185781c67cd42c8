"""Payment sessions: validation, resume by uuid, the per-account limit, orderCodes, PayOS links.

The limit ("at most N pending sessions per account in 24 h") must hold across any number of
replicas, so it is enforced in MongoDB: a short per-account lock (a `locks` document whose
`_id` is the account) is held only while counting the account's live pending sessions and
inserting the new one as a reservation. PayOS is called after the lock is released; if it
fails, the reservation is deleted, so a failed attempt never counts against the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from payos import APIError, AsyncPayOS, ConnectionTimeoutError, PayOSError
from payos.types import CreatePaymentLinkRequest
from pymongo import ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.keys import SESSION_TTL_SECONDS
from shared.model import SessionStatus, StatusEvent, is_valid_uuid, new_session, utcnow
from shared.mongo import Doc, Store

from .errors import (
    AccountBusy,
    InvalidRequest,
    LimitReached,
    PayOSFailed,
    PayOSTimeout,
    StoreUnavailable,
    UuidConflict,
)

log = structlog.get_logger(__name__)

# Amounts in VND. PayOS takes positive integers; 1,000 VND is the smallest transfer most
# Vietnamese banks accept, 10 billion VND far above any deposit this site takes.
MIN_AMOUNT = 1_000
MAX_AMOUNT = 10_000_000_000
# PayOS limits a payment link's description to 25 characters; banks copy it into the
# transfer note, where only unaccented letters, digits and spaces survive every bank.
MAX_DESCRIPTION = 25
DEFAULT_DESCRIPTION = "NAPTIEN"
DESCRIPTION_RE = re.compile(r"^[A-Za-z0-9 ]+$")
# Vietnamese bank account numbers are 6 to 19 digits; one more for safety.
ACCOUNT_RE = re.compile(r"^[0-9]{6,20}$")

LOCKS = "locks"
COUNTERS = "counters"
# A lock is held for a count and two inserts (milliseconds); the lease only matters when a
# replica dies holding it, and must outlast MongoDB's own timeouts on a slow round trip.
LOCK_LEASE_MS = 10_000
# How long a request waits for its account's lock before answering 503 (retry).
LOCK_WAIT_SECONDS = 5.0
ORDER_CODE_COUNTER = "orderCode"
# PayOS order codes are positive and JavaScript-safe.
MAX_ORDER_CODE = 9_007_199_254_740_991


@dataclass(frozen=True, slots=True)
class CreateRequest:
    account_number: str
    amount: int
    description: str
    uuid: str | None


def validate_account_number(value: object) -> str:
    if not isinstance(value, str) or not ACCOUNT_RE.fullmatch(value):
        raise InvalidRequest("`accountNumber` must be a string of 6 to 20 digits")
    return value


def validate_uuid(value: object, name: str = "uuid") -> str:
    if not isinstance(value, str) or not is_valid_uuid(value):
        raise InvalidRequest(f"`{name}` must be a lowercase uuid4")
    return value


def parse_create_request(body: object) -> CreateRequest:
    """The validated body of `POST /api/sessions`, or InvalidRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    account = validate_account_number(body.get("accountNumber"))
    amount = body.get("amount")
    # bool is an int in Python, never in JSON.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidRequest("`amount` must be an integer number of VND")
    if not MIN_AMOUNT <= amount <= MAX_AMOUNT:
        raise InvalidRequest(f"`amount` must be between {MIN_AMOUNT} and {MAX_AMOUNT} VND")
    description = body.get("description")
    if description is None:
        description = DEFAULT_DESCRIPTION
    elif (
        not isinstance(description, str)
        or not 0 < len(description) <= MAX_DESCRIPTION
        or not DESCRIPTION_RE.fullmatch(description)
    ):
        raise InvalidRequest(
            f"`description` must be 1 to {MAX_DESCRIPTION} unaccented letters, digits or spaces"
        )
    raw_uuid = body.get("uuid")
    uuid = None if raw_uuid is None else validate_uuid(raw_uuid)
    return CreateRequest(account, amount, description, uuid)


def iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class SessionView:
    """A session as the creating browser sees it."""

    doc: Doc
    resumed: bool

    def to_dict(self) -> dict[str, Any]:
        d = self.doc
        return {
            "uuid": d["uuid"],
            "orderCode": d["orderCode"],
            "amount": d["amount"],
            "description": d["description"],
            "checkoutUrl": d["checkoutUrl"],
            "qrCode": d["qrCode"],
            "status": d["status"],
            "expiresAt": iso(d["expiresAt"]),
            "resumed": self.resumed,
        }


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
        # Epoch milliseconds, not a datetime: a lease compared as a number needs no
        # `$set` of a datetime (which the MongoDB stand-in would store as a string).
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


@dataclass(frozen=True, slots=True)
class LinkUrls:
    return_url: str
    cancel_url: str


class Sessions:
    """Creating, resuming and counting payment sessions."""

    def __init__(
        self,
        store: Store,
        cache: StatusCache,
        payos: AsyncPayOS,
        *,
        max_pending: int,
        urls: LinkUrls,
        payos_timeout: float,
        locks: AccountLocks | None = None,
    ) -> None:
        self._store = store
        self._cache = cache
        self._payos = payos
        self.max_pending = max_pending
        self._urls = urls
        self._payos_timeout = payos_timeout
        self._locks = locks or AccountLocks(store.db[LOCKS])
        self._codes = OrderCodes(store.db[COUNTERS])

    async def create(self, req: CreateRequest) -> SessionView:
        """Resume `req.uuid`'s pending session, or create a new one within the limit."""
        try:
            if req.uuid is not None:
                existing = await self._resumable(req.uuid, req.account_number)
                if existing is not None:
                    return SessionView(existing, resumed=True)
            doc = await self._reserve(req, req.uuid or str(uuidlib.uuid4()))
        except PyMongoError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if isinstance(doc, SessionView):
            return doc
        try:
            link = await self._create_link(doc)
        except BaseException:
            # Shielded: whatever stopped us, the reservation must not keep counting.
            await asyncio.shield(self._rollback(doc))
            raise
        fields = {
            "checkoutUrl": link.checkout_url,
            "qrCode": link.qr_code,
            "paymentLinkId": link.payment_link_id,
        }
        doc.update(fields)
        try:
            await self._store.sessions.update_one({"_id": doc["_id"]}, {"$set": fields})
        except PyMongoError as exc:
            await asyncio.shield(self._rollback(doc))
            raise StoreUnavailable(str(exc)) from exc
        try:
            await self._cache.put(StatusEvent.from_session(doc))
        except REDIS_ERRORS as exc:
            # Readers fall back to MongoDB and refill the cache.
            log.warning("session_cache_put_failed", uuid=doc["uuid"], error=str(exc))
        log.info(
            "session_created",
            uuid=doc["uuid"],
            order_code=doc["orderCode"],
            account=req.account_number,
            amount=req.amount,
        )
        return SessionView(doc, resumed=False)

    async def pending_count(self, account: str, now: datetime | None = None) -> int:
        """Live pending sessions of `account` (ignores what the TTL monitor has not deleted)."""
        return await self._store.sessions.count_documents(
            {
                "accountNumber": account,
                "status": SessionStatus.PENDING.value,
                "expiresAt": {"$gt": now or utcnow()},
            }
        )

    async def find(self, uuid: str) -> Doc | None:
        return await self._store.find_session(uuid)

    async def _resumable(self, uuid: str, account: str) -> Doc | None:
        """The session to resume for `uuid`, None if the uuid is free, else UuidConflict."""
        doc = await self._store.find_session(uuid)
        if doc is None:
            return None
        # Never another account's session, and never a hint of whose it is.
        if doc["accountNumber"] != account or doc["status"] != SessionStatus.PENDING:
            raise UuidConflict("this uuid cannot be used for a new session; make a new one")
        if not doc.get("checkoutUrl"):
            raise UuidConflict(
                "this session is still being created; try again in a moment", retryable=True
            )
        return doc

    async def _reserve(self, req: CreateRequest, uuid: str) -> Doc | SessionView:
        """Count and insert under the account's lock: the reservation that holds a place."""
        async with self._locks.hold(req.account_number) as token:
            now = utcnow()
            count = await self.pending_count(req.account_number, now)
            if count >= self.max_pending:
                raise LimitReached(count, self.max_pending)
            doc = new_session(
                uuid=uuid,
                order_code=await self._codes.next(),
                account_number=req.account_number,
                amount=req.amount,
                description=req.description,
                now=now,
                ttl_seconds=SESSION_TTL_SECONDS,
            )
            try:
                await self._store.sessions.insert_one(doc)
            except DuplicateKeyError:
                # The same uuid arrived twice at once: the other request created it.
                existing = await self._resumable(uuid, req.account_number)
                if existing is None:
                    raise
                return SessionView(existing, resumed=True)
            if not await self._locks.still_held(req.account_number, token):
                # Our lease ran out (a stall longer than LOCK_LEASE_MS) and another request
                # may have counted without us: give the place back rather than risk N + 1.
                await self._store.sessions.delete_one({"_id": doc["_id"]})
                raise AccountBusy("this account is busy; try again in a moment")
            return doc

    async def _create_link(self, doc: Doc) -> Any:
        request = CreatePaymentLinkRequest(
            order_code=doc["orderCode"],
            amount=doc["amount"],
            description=doc["description"],
            return_url=self._urls.return_url,
            cancel_url=self._urls.cancel_url,
            expired_at=int(doc["expiresAt"].timestamp()),
        )
        try:
            # The SDK times out by itself; this bounds whatever it does around the request.
            async with asyncio.timeout(self._payos_timeout + 1):
                return await self._payos.payment_requests.create(request)
        except (ConnectionTimeoutError, TimeoutError):
            log.warning("payos_timeout", order_code=doc["orderCode"])
            raise PayOSTimeout(
                f"PayOS did not answer within {self._payos_timeout:g} s; nothing was created"
            ) from None
        except APIError as exc:
            log.warning(
                "payos_error",
                order_code=doc["orderCode"],
                status=exc.status_code,
                code=exc.error_code,
                desc=exc.error_desc,
            )
            raise PayOSFailed(
                f"PayOS refused the payment link: {exc.error_desc or exc}",
                code=exc.error_code,
                status=exc.status_code,
            ) from None
        except PayOSError as exc:
            log.warning("payos_unreachable", order_code=doc["orderCode"], error=str(exc))
            raise PayOSFailed(f"PayOS could not be reached: {exc}") from None

    async def _rollback(self, doc: Doc) -> None:
        try:
            await self._store.sessions.delete_one(
                {"_id": doc["_id"], "status": SessionStatus.PENDING.value}
            )
        except PyMongoError as exc:
            # It still counts until it expires; say so loudly.
            log.error("session_rollback_failed", uuid=doc["uuid"], error=str(exc))
