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
import uuid as uuidlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from bson import ObjectId
from payos import APIError, AsyncPayOS, ConnectionTimeoutError, PayOSError
from payos.types import CreatePaymentLinkRequest
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.errors import storage
from shared.keys import SESSION_TTL_SECONDS
from shared.model import SessionStatus, StatusEvent, new_session, utcnow
from shared.mongo import Doc, Store
from shared.tasks import BackgroundTasks

from .errors import (
    AccountBusy,
    LimitReached,
    PayOSFailed,
    PayOSTimeout,
    StoreUnavailable,
    UuidConflict,
    UuidUsed,
)
from .locks import COUNTERS, LOCKS, AccountLocks, OrderCodes
from .session_view import SessionPage, SessionView, public
from .validation import CreateRequest, Paging

log = structlog.get_logger(__name__)

# How long a used uuid is remembered after its session's expiry: far beyond everything else
# that remembers the session (its document until the TTL monitor runs, its cached status for
# 15 min after the last change, a browser's saved session for resuming).
USED_UUID_RETENTION = timedelta(days=30)


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
        self._background = BackgroundTasks()

    async def create(self, req: CreateRequest) -> SessionView:
        """Resume `req.uuid`'s pending session, or create a new one within the limit."""
        if req.uuid is not None:
            with storage():
                existing = await self._resumable(req.uuid, req.account_number)
            if existing is not None:
                return SessionView(existing, resumed=True)
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
        await self._background.aclose()

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
        now = now or utcnow()
        # An equality find, counted here (shared.mongo: stand-in): it runs for every session
        # created. It reads few documents: the cap bounds the live ones, and the cleanup
        # marks the expired ones.
        query = {"accountNumber": account, "status": SessionStatus.PENDING.value}
        with storage():
            cursor = self._store.sessions.find(query, {"_id": 0, "expiresAt": 1})
            return sum([doc["expiresAt"] > now async for doc in cursor])

    async def find(self, uuid: str) -> Doc | None:
        """The live session with this uuid, if any."""
        with storage():
            return await self._store.find_session(uuid)

    async def list_page(self, paging: Paging) -> SessionPage:
        """One page of every stored session, newest first (the admins' list)."""
        sessions = self._store.sessions
        with storage():
            total = await sessions.count_documents({})
            cursor = (
                sessions.find({}, {"_id": 0, "references": 0})
                .sort("createdAt", DESCENDING)
                .skip(paging.skip)
                .limit(paging.limit)
            )
            items = [public(doc) async for doc in cursor]
        return SessionPage(paging.page, paging.limit, total, items)

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

    async def _roll_back(self, attempt: _Attempt, cause: BaseException) -> None:
        """Undo `attempt` to the end, in a task of its own: shielded, a cancellation of the
        caller (shutdown) does not stop it, and `aclose` waits for it if the caller stops
        waiting (cancelled once more)."""
        await asyncio.shield(self._background.spawn(self._undo(attempt, cause), "session-rollback"))

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
            self._background.spawn(self._cancel_link(doc, rlog), "payos-link-cancel")

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
