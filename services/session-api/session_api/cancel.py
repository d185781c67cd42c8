"""Cancelling a session (issue 13): the page's "Huỷ giao dịch" and PayOS's cancel return URL.

The payment always wins. PayOS is asked first to cancel the link: once it has, it takes no
transfer on it, and its answer lists every transaction it took before. Those are counted
through the counting core (shared.payments, as the reconciler does) before the session is
closed, so a payment that raced the cancel completes the session and the cancel answers 409
with the paid state; only a session still pending after that becomes `cancelled`, which
frees its place in the per-account limit and ends every stream on it. PayOS down or slow:
502/504 and nothing changed here.

What runs after PayOS cancelled runs in a task of its own that the caller's cancellation
(a client gone, shutdown) does not stop. A process that dies in between leaves the session
pending with its link cancelled at PayOS: the reconciler finds the link CANCELLED and closes
the session the same way (`close`).
"""

from __future__ import annotations

import asyncio

import structlog
from payos import APIError, AsyncPayOS, ConnectionTimeoutError, PayOSError
from payos.types import PaymentLink
from pymongo import ReturnDocument
from pymongo.errors import PyMongoError

from shared import outbox
from shared.cache import StatusCache
from shared.errors import storage
from shared.model import SessionStatus, StatusEvent, StreamStatus
from shared.mongo import CHECK_AT, NO_CHECK, PUBLISH_PENDING, Doc, Store
from shared.payments import Payments, Transaction
from shared.tasks import BackgroundTasks

from .cleanup import record_partial
from .errors import CancelConflict, NotFound, PayOSFailed, PayOSTimeout, StoreUnavailable
from .publishing import publish

log = structlog.get_logger(__name__)

SHOPPER_CANCELLED = "cancelled by the shopper"
# Fresh reads of the session while closing it: each means a payment counted in between.
CLOSE_ATTEMPTS = 8


class Cancellations:
    """`cancel(uuid)` for the API; `close(doc, link)` for the reconciler."""

    def __init__(
        self,
        store: Store,
        cache: StatusCache,
        payos: AsyncPayOS,
        payments: Payments,
        *,
        payos_timeout: float,
    ) -> None:
        self._store = store
        self._cache = cache
        self._payos = payos
        self._payments = payments
        self._payos_timeout = payos_timeout
        # Closings still running after their caller stopped waiting; shutdown waits for them.
        self._background = BackgroundTasks()

    async def cancel(self, uuid: str) -> StatusEvent:
        """Cancel the live session `uuid`: its state once cancelled (the same answer again for
        a session cancelled before). Raises NotFound, CancelConflict (paid, or no longer
        cancellable), PayOSFailed, PayOSTimeout, StoreUnavailable."""
        with storage():
            doc = await self._store.find_session(uuid)
        if doc is None:
            raise NotFound("no live payment session with this uuid")
        if doc["status"] == SessionStatus.CANCELLED:
            return StatusEvent.from_session(doc)
        if doc["status"] != SessionStatus.PENDING:
            raise self._conflict(doc)
        if not doc.get("checkoutUrl"):
            raise CancelConflict(
                "this session is still being created; try again in a moment",
                StatusEvent.from_session(doc),
                retryable=True,
            )
        link = await self._cancel_at_payos(doc)
        try:
            closed = await asyncio.shield(
                self._background.spawn(self.close(doc, link), "session-cancel")
            )
        except PyMongoError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if closed["status"] != SessionStatus.CANCELLED:
            raise self._conflict(closed)
        return StatusEvent.from_session(closed)

    async def aclose(self) -> None:
        """Wait for closings still running (at shutdown, before their clients close)."""
        await self._background.aclose()

    def _conflict(self, doc: Doc) -> CancelConflict:
        event = StatusEvent.from_session(doc)
        if event.status is StreamStatus.DONE:
            return CancelConflict("this session is paid; a paid session cannot be cancelled", event)
        return CancelConflict(f"this session is {doc['status']} and cannot be cancelled", event)

    async def _cancel_at_payos(self, doc: Doc) -> PaymentLink:
        """PayOS's link once asked to cancel it (whatever its status then: the caller decides).
        A refusal is looked into with `get`: a link PayOS cancelled before (on its checkout
        page: the cancel return URL) or that is paid is an answer, not a failure."""
        order_code = int(doc["orderCode"])
        slog = log.bind(uuid=doc["uuid"], order_code=order_code)
        try:
            async with asyncio.timeout(self._payos_timeout + 1):
                try:
                    return await self._payos.payment_requests.cancel(order_code, SHOPPER_CANCELLED)
                except APIError as exc:
                    slog.info("payos_cancel_refused", code=exc.error_code, desc=exc.error_desc)
                    return await self._payos.payment_requests.get(order_code)
        except (ConnectionTimeoutError, TimeoutError):
            slog.warning("payos_timeout", during="cancel")
            raise PayOSTimeout(
                f"PayOS did not answer within {self._payos_timeout:g} s; nothing was cancelled; "
                "try again"
            ) from None
        except APIError as exc:
            slog.warning("payos_error", during="cancel", code=exc.error_code, desc=exc.error_desc)
            raise PayOSFailed(
                f"PayOS refused to cancel the payment link: {exc.error_desc or exc}",
                code=exc.error_code,
                status=exc.status_code,
            ) from None
        except PayOSError as exc:
            slog.warning("payos_unreachable", during="cancel", error=str(exc))
            raise PayOSFailed(f"PayOS could not be reached: {exc}") from None

    async def close(self, doc: Doc, link: PaymentLink) -> Doc:
        """Count what PayOS took on the link, then close the session if PayOS cancelled the
        link and nothing paid it: the session as it stands after. Raises PyMongoError."""
        order_code = int(doc["orderCode"])
        latest: Doc | None = None
        for t in link.transactions:
            data = t.model_dump(by_alias=True)
            applied = await self._payments.apply(
                Transaction(order_code, t.reference, t.amount, data, source="cancel")
            )
            if applied.changed and applied.session is not None:
                latest = applied.session
        if latest is not None:
            await publish(self._cache, self._store, latest)
        current = await self._store.sessions.find_one({"uuid": doc["uuid"]})
        if current is None:
            raise PayOSFailed("the session was deleted while it was being cancelled")
        if link.status == "CANCELLED":
            return await self._mark_cancelled(current)
        if current["status"] == SessionStatus.PENDING:
            if link.status == "EXPIRED":
                # Past its expiry at PayOS a moment before ours: the cleanup closes it.
                raise CancelConflict(
                    "this session has expired and cannot be cancelled",
                    StatusEvent.from_session(current),
                )
            raise PayOSFailed(f"PayOS did not cancel the payment link (it is {link.status})")
        return current

    async def _mark_cancelled(self, doc: Doc) -> Doc:
        """`pending → cancelled`, with the shop's event in the same update; a payment counted
        meanwhile (the version guard) is looked at again and wins if it paid in full."""
        for _ in range(CLOSE_ATTEMPTS):
            if doc["status"] != SessionStatus.PENDING:
                return doc
            version = int(doc.get("version", 1))
            after = {**doc, "status": SessionStatus.CANCELLED.value, "version": version + 1}
            update = outbox.with_entry(
                {
                    # Marked before Redis is written, as the cleanup's expiry is (publishing).
                    "$set": {
                        "status": SessionStatus.CANCELLED.value,
                        CHECK_AT: NO_CHECK,
                        PUBLISH_PENDING: True,
                    },
                    "$currentDate": {"cancelledAt": True, "updatedAt": True},
                    "$inc": {"version": 1},
                },
                outbox.session_entry(outbox.EventType.CANCELLED, after),
            )
            closed = await self._store.sessions.find_one_and_update(
                {"_id": doc["_id"], "status": SessionStatus.PENDING.value, "version": version},
                update,
                return_document=ReturnDocument.AFTER,
            )
            if closed is not None:
                await self._after_closing(closed)
                return closed
            fresh = await self._store.sessions.find_one({"_id": doc["_id"]})
            if fresh is None:
                raise PayOSFailed("the session was deleted while it was being cancelled")
            doc = fresh
        raise CancelConflict("this session keeps changing; try again", None, retryable=True)

    async def _after_closing(self, doc: Doc) -> None:
        log.info(
            "session_cancelled",
            uuid=doc["uuid"],
            order_code=doc["orderCode"],
            amount_paid=doc.get("amountPaid", 0),
        )
        # Part of the amount paid before the cancel is the shopper's money, to be refunded or
        # credited by an operator (the cleanup records it if this process dies first).
        await record_partial(self._payments.ledger, doc, source="cancel")
        await publish(self._cache, self._store, doc)
