"""Payment sessions: validation, resume by uuid, the per-account limit, orderCodes, PayOS links.

The limit ("at most N pending sessions per account in 24 h") must hold across any number of
replicas, so it is enforced in MongoDB: a short per-account lock (a `locks` document whose
`_id` is the account) is held only while counting the account's live pending sessions and
inserting the new one as a reservation. PayOS is called after the lock is released.

Whatever stops a creation once its reservation may exist — PayOS failing or timing out,
MongoDB or a cancellation (shutdown cancels handlers) at any step up to the answer — one
rollback undoes it: the reservation is deleted (unless a payment completed it meanwhile),
its uuid given back, and the PayOS link cancelled, since a timed-out or interrupted call may
have created it. The rollback runs in a task of its own that the caller's cancellation does
not stop and that shutdown waits for, so a failed attempt never counts against the limit.

A uuid names one session, ever: a session's uuid is also recorded in `usedUuids` (inserted
first, under the lock: the insert is the claim) and kept for USED_UUID_RETENTION, long after
the session document (deleted by TTL after `expiresAt`) and its cached status are gone. A
request with a used uuid resumes the session if it is this account's and still pending, and
is otherwise refused (409, UuidUsed), so status reads, streams and the cache never have to
tell two sessions of one uuid apart. Only a creation that fails gives its uuid back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from bson import ObjectId
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
    UuidUsed,
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
# How long a used uuid is remembered after its session's expiry: far beyond everything else
# that remembers the session (its document until the TTL monitor runs, its cached status for
# 15 min after the last change, a browser's saved session for resuming).
USED_UUID_RETENTION = timedelta(days=30)


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


# PayOS's answer to a cancel (or get) of an order it has no payment link for.
PAYOS_LINK_NOT_FOUND = "101"
CANCELLATION_REASON = "session creation failed"


@dataclass
class _Attempt:
    """What one creation may have left behind, for its rollback."""

    # Set before the first write: from then on the uuid claim and the reservation may exist.
    doc: Doc | None = None
    # PayOS was asked for a link and did not clearly refuse: the link may exist.
    link_requested: bool = False


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
        # Rollbacks and link cancellations still running; shutdown waits for them.
        self._background: set[asyncio.Task[None]] = set()

    async def create(self, req: CreateRequest) -> SessionView:
        """Resume `req.uuid`'s pending session, or create a new one within the limit."""
        try:
            if req.uuid is not None:
                existing = await self._resumable(req.uuid, req.account_number)
                if existing is not None:
                    return SessionView(existing, resumed=True)
        except PyMongoError as exc:
            raise StoreUnavailable(str(exc)) from exc
        attempt = _Attempt()
        try:
            reserved = await self._reserve(req, req.uuid or str(uuidlib.uuid4()), attempt)
            if isinstance(reserved, SessionView):
                return reserved
            return await self._complete(reserved, attempt)
        except BaseException as exc:
            # BaseException: a cancellation must not leave a reservation counting either.
            if attempt.doc is not None:
                await self._roll_back(attempt, exc)
            if isinstance(exc, PyMongoError):
                raise StoreUnavailable(str(exc)) from exc
            raise

    async def aclose(self) -> None:
        """Wait for rollbacks and link cancellations still running (at shutdown, before the
        clients they use are closed)."""
        while running := [task for task in self._background if not task.done()]:
            await asyncio.gather(*running, return_exceptions=True)

    async def _complete(self, doc: Doc, attempt: _Attempt) -> SessionView:
        """Give the reserved session its PayOS link, store it, cache its status."""
        attempt.link_requested = True
        link = await self._create_link(doc, attempt)
        fields = {
            "checkoutUrl": link.checkout_url,
            "qrCode": link.qr_code,
            "paymentLinkId": link.payment_link_id,
        }
        doc.update(fields)
        await self._store.sessions.update_one({"_id": doc["_id"]}, {"$set": fields})
        try:
            await self._cache.put(StatusEvent.from_session(doc))
        except REDIS_ERRORS as exc:
            # Readers fall back to MongoDB and refill the cache.
            log.warning("session_cache_put_failed", uuid=doc["uuid"], error=str(exc))
        log.info(
            "session_created",
            uuid=doc["uuid"],
            order_code=doc["orderCode"],
            account=doc["accountNumber"],
            amount=doc["amount"],
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
        """The session to resume for `uuid`, None if no live session has it, else UuidConflict."""
        doc = await self._store.find_session(uuid)
        if doc is None:
            return None
        # Never another account's session, and never a hint of whose it is.
        if doc["accountNumber"] != account or doc["status"] != SessionStatus.PENDING:
            raise UuidUsed()
        if not doc.get("checkoutUrl"):
            raise UuidConflict(
                "this session is still being created; try again in a moment", retryable=True
            )
        return doc

    async def _reserve(self, req: CreateRequest, uuid: str, attempt: _Attempt) -> Doc | SessionView:
        """Count and insert under the account's lock: the reservation that holds a place.

        `attempt.doc` is set before the first write and cleared when nothing written is ours
        to undo; the caller rolls back whatever stops us in between.
        """
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
            # Our own id, so a rollback can find the reservation even if the insert was
            # interrupted before its answer came back.
            doc["_id"] = ObjectId()
            attempt.doc = doc
            if not await self._claim_uuid(doc):
                # Used before: by this account's pending session (a repeated request: the
                # lock ordered us after it), or by a session that is over or gone.
                attempt.doc = None
                return await self._resume_used(uuid, req.account_number)
            try:
                await self._store.sessions.insert_one(doc)
            except DuplicateKeyError:
                if await self._store.sessions.find_one({"uuid": uuid}, {"_id": 1}) is None:
                    # Not the uuid but the orderCode (issued outside the counter): retryable,
                    # and the rollback gives the uuid back.
                    raise
                # A session recorded before used uuids were: the uuid stays used.
                attempt.doc = None
                return await self._resume_used(uuid, req.account_number)
            if not await self._locks.still_held(req.account_number, token):
                # Our lease ran out (a stall longer than LOCK_LEASE_MS) and another request
                # may have counted without us: give the place back (the rollback) rather
                # than risk N + 1.
                raise AccountBusy("this account is busy; try again in a moment")
            return doc

    async def _claim_uuid(self, doc: Doc) -> bool:
        """Record `doc`'s uuid as used; False if it was used before."""
        try:
            await self._store.used_uuids.insert_one(
                {
                    "_id": doc["uuid"],
                    "orderCode": doc["orderCode"],
                    "createdAt": doc["createdAt"],
                    "forgetAt": doc["expiresAt"] + USED_UUID_RETENTION,
                }
            )
        except DuplicateKeyError:
            return False
        return True

    async def _release_uuid(self, doc: Doc) -> None:
        """Give back a uuid claimed by a creation that failed (only if the claim is ours)."""
        await self._store.used_uuids.delete_one({"_id": doc["uuid"], "orderCode": doc["orderCode"]})

    async def _resume_used(self, uuid: str, account: str) -> SessionView:
        """A used uuid: its live pending session of this account, else UuidConflict."""
        existing = await self._resumable(uuid, account)
        if existing is None:
            raise UuidUsed()
        return SessionView(existing, resumed=True)

    async def _create_link(self, doc: Doc, attempt: _Attempt) -> Any:
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
                f"PayOS did not answer within {self._payos_timeout:g} s; nothing was counted "
                "and the payment link is being cancelled; try again"
            ) from None
        except APIError as exc:
            # A clear refusal: no link was made, none to cancel.
            attempt.link_requested = False
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

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run `work` in a task of its own, kept (and waited for at shutdown) until it ends."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _roll_back(self, attempt: _Attempt, cause: BaseException) -> None:
        """Undo `attempt` to the end, in a task of its own: shielded, a cancellation of the
        caller (shutdown) does not stop it, and `aclose` waits for it if the caller stops
        waiting (cancelled once more)."""
        await asyncio.shield(self._spawn(self._undo(attempt, cause), "session-rollback"))

    async def _undo(self, attempt: _Attempt, cause: BaseException) -> None:
        """Delete the reservation and give its uuid back, then cancel the PayOS link that may
        exist. Never raises: it runs while the caller's own error is on its way out."""
        doc = attempt.doc
        assert doc is not None
        rlog = log.bind(uuid=doc["uuid"], order_code=doc["orderCode"], cause=type(cause).__name__)
        try:
            kept = await self._delete_reservation(doc)
        except PyMongoError as exc:
            # It still counts until it expires; say so loudly.
            rlog.error("session_rollback_failed", error=str(exc))
            kept = False
        except Exception:
            rlog.exception("session_rollback_failed")
            kept = False
        if kept:
            # Paid while we failed: the session, its uuid and its link stand.
            rlog.warning("session_rollback_kept_completed")
            return
        rlog.info("session_rolled_back", link_requested=attempt.link_requested)
        if attempt.link_requested:
            # Not awaited: the answer (a 504 after a slow PayOS, say) need not wait for a
            # PayOS that may be as slow to cancel.
            self._spawn(self._cancel_link(doc, rlog), "payos-link-cancel")

    async def _delete_reservation(self, doc: Doc) -> bool:
        """Delete the reservation if still pending and give its uuid back; True if the session
        outlived it (a payment completed it meanwhile)."""
        sessions = self._store.sessions
        await sessions.delete_one({"_id": doc["_id"], "status": SessionStatus.PENDING.value})
        if await sessions.find_one({"_id": doc["_id"]}, {"_id": 1}) is not None:
            return True
        await self._release_uuid(doc)
        return False

    async def _cancel_link(self, doc: Doc, rlog: structlog.typing.FilteringBoundLogger) -> None:
        """Best effort: cancel the order's PayOS link, which a late or interrupted create may
        have made although we never got (or never used) its answer. Its checkout URL never
        reached the caller; if this fails, the link expires at the session's `expiresAt`
        (its `expiredAt` at PayOS)."""
        try:
            async with asyncio.timeout(self._payos_timeout + 1):
                await self._payos.payment_requests.cancel(doc["orderCode"], CANCELLATION_REASON)
        except APIError as exc:
            if exc.error_code == PAYOS_LINK_NOT_FOUND:
                rlog.info("payos_link_absent")
            else:
                rlog.warning("payos_cancel_failed", code=exc.error_code, desc=exc.error_desc)
        except (PayOSError, TimeoutError) as exc:
            rlog.warning("payos_cancel_failed", error=str(exc) or type(exc).__name__)
        except Exception:
            # Whatever else (a client closed under us): logged, never raised from a rollback.
            rlog.exception("payos_cancel_failed")
        else:
            rlog.info("payos_link_cancelled")
