"""The counting core: one paid transaction applied to its session exactly once, or recorded.

Both ways money is learnt about go through `Payments.apply`: the ingest (PayOS's webhook)
and session-api's reconciler (PayOS's `payment_requests.get`, when a webhook never came).
The reference guard (`references: {$nin: [reference]}` in the update's filter) makes a
transaction count once whichever of them sees it first, however often, in any replica.

What does not fit a session becomes a ledger item (shared.ledger) instead of being
forgotten, and is re-derived from the stored state on every delivery, so a process that
dies between counting and recording leaves the item to the redelivery:
- no session → `unknown_order` (PayOS's confirm-webhook test delivery: recorded, resolved);
- not VND → `currency`, nothing counted;
- a session `expired` (or past `expiresAt`) → counted, completing it, when the signed
  `transactionDateTime` is at or before `expiresAt` plus the grace (PayOS refuses payment on
  a link after its `expiredAt`, which is the session's `expiresAt`); otherwise `late`;
- a session `cancelled` → counted (completing it when paid in full: the payment wins) and
  `paid_after_cancel`;
- counted beyond the amount, or paid to a completed session → `overpaid` with the excess.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any

from pymongo import ReturnDocument

from . import outbox
from .ledger import IssueKind, Ledger, NewIssue, is_test_delivery
from .model import SessionStatus, utcnow
from .mongo import CHECK_AT, HELD_PURGE_AT, NO_CHECK, Doc, Store

# Fresh reads of one session a transaction may take: each means the session moved on under
# it — its status, or (the version guard of the outbox, issue 17) another transaction of the
# same session counted in between.
COUNT_ATTEMPTS = 8
# PayOS writes `transactionDateTime` in Vietnam's time (UTC+7) without a zone.
VIETNAM = timezone(timedelta(hours=7))
CURRENCY = "VND"


class Outcome(StrEnum):
    COMPLETED = "completed"  # the session is now paid in full
    PARTIAL = "partial"  # a transaction counted, the session still waits for more
    DUPLICATE = "duplicate"  # this orderCode + reference was received (or counted) before
    NOT_PAID = "not_paid"  # PayOS reported a failed transaction: recorded only
    UNKNOWN_ORDER = "unknown_order"  # no session: a ledger item (or PayOS's test delivery)
    LATE = "late"  # paid for an expired session outside the grace: a ledger item
    OVERPAID = "overpaid"  # paid to a session already paid in full: a ledger item
    CURRENCY = "currency"  # not VND: a ledger item, nothing counted


@dataclass(frozen=True, slots=True)
class Transaction:
    """One paid transaction as PayOS reported it; `data` is what PayOS signed."""

    order_code: int
    reference: str
    amount: int
    data: dict[str, Any]
    source: str = "webhook"

    @property
    def currency(self) -> str:
        value = self.data.get("currency")
        # The payment-link API reports no currency per transaction: a link is in VND.
        return CURRENCY if value in (None, "") else str(value)

    @property
    def made_at(self) -> datetime | None:
        return parse_transaction_time(self.data.get("transactionDateTime"))


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: Outcome
    session: Doc | None  # the session after the change (None: no session)
    changed: bool  # the session changed: publish its new state


def parse_transaction_time(value: object) -> datetime | None:
    """`transactionDateTime` as an aware datetime; naive text is Vietnam time. None when
    absent or unreadable (then nothing proves the payment was made in time)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=VIETNAM)


def excess_of(session: Doc, reference: str) -> int:
    """How much of `reference`'s transaction went beyond the session's amount.

    `paidAmounts` is pushed with `references` in the same update (MongoDB applies one
    document's updates one at a time, so both lists are in counting order); a session
    counted before it existed has fewer amounts than references, aligned at the end.
    """
    references: list[str] = list(session.get("references", ()))
    amounts = [int(a) for a in session.get("paidAmounts", ())]
    offset = len(references) - len(amounts)
    total = int(session.get("amountPaid", 0)) - sum(amounts)
    for i, amount in enumerate(amounts):
        before, total = total, total + amount
        if references[offset + i] == reference:
            return max(0, total - max(before, int(session["amount"])))
    return 0


class Payments:
    """Applies paid transactions to sessions (MongoDB) and the ledger; raises PyMongoError."""

    def __init__(self, store: Store, ledger: Ledger, *, grace_seconds: float) -> None:
        self._store = store
        self._ledger = ledger
        self._grace = timedelta(seconds=grace_seconds)

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    async def apply(self, tx: Transaction, *, now: datetime | None = None) -> Applied:
        now = now or utcnow()
        sessions = self._store.sessions
        doc = await sessions.find_one({"orderCode": tx.order_code})
        if doc is None:
            await self._ledger.record(
                NewIssue(
                    IssueKind.UNKNOWN_ORDER,
                    tx.order_code,
                    tx.reference,
                    tx.amount,
                    tx.data,
                    source=tx.source,
                    test=is_test_delivery(tx.order_code, tx.data),
                )
            )
            return Applied(Outcome.UNKNOWN_ORDER, None, False)
        return await self._decide(tx, doc, now, tries=COUNT_ATTEMPTS)

    async def _decide(self, tx: Transaction, doc: Doc, now: datetime, *, tries: int) -> Applied:
        """What `tx` does to the session `doc` as read; decided again on a fresh read when
        the session moved on under it (it only moves forward: a few tries at most)."""
        if tx.reference in doc.get("references", ()):
            return await self._counted_before(tx, doc)
        if tx.currency != CURRENCY:
            await self._record(IssueKind.CURRENCY, tx, doc)
            return Applied(Outcome.CURRENCY, doc, False)
        status = doc["status"]
        if status == SessionStatus.COMPLETED:
            await self._record(IssueKind.OVERPAID, tx, doc, excess=tx.amount)
            return Applied(Outcome.OVERPAID, doc, False)
        if status == SessionStatus.PENDING and doc["expiresAt"] > now:
            allowed = [SessionStatus.PENDING.value]
        elif status in (SessionStatus.PENDING, SessionStatus.EXPIRED):
            made_at = tx.made_at
            if made_at is None or made_at > doc["expiresAt"] + self._grace:
                await self._record(IssueKind.LATE, tx, doc)
                return Applied(Outcome.LATE, doc, False)
            # Made in time, delivered late: the one backward move, by a counted payment.
            allowed = [SessionStatus.PENDING.value, SessionStatus.EXPIRED.value]
        else:
            # Cancelled, and PayOS took the payment all the same (it was under way when the
            # shopper cancelled, or made on another copy of the QR): the payment wins — it is
            # counted and completes the session when it pays it in full — and the operator
            # is told. The item first: a redelivery after a crash between the two finds the
            # transaction counted and the item already there.
            await self._record(IssueKind.PAID_AFTER_CANCEL, tx, doc)
            allowed = [SessionStatus.CANCELLED.value]
        return await self._count(tx, doc, allowed, now, tries)

    async def _count(
        self, tx: Transaction, doc: Doc, allowed: list[str], now: datetime, tries: int
    ) -> Applied:
        counted = await self._count_once(tx, doc, allowed)
        if counted is None:
            # Another copy counted it, or the session moved on (paid, expired, another
            # transaction counted: the version guard) meanwhile: decide again on what is
            # stored now.
            fresh = await self._store.sessions.find_one({"_id": doc["_id"]})
            if fresh is None or tries <= 0:
                # Deleted under us (only ever long after expiry), or still moving after a
                # few tries: never forgotten, kept as an item.
                await self._record(IssueKind.LATE, tx, fresh or doc)
                return Applied(Outcome.LATE, fresh or doc, False)
            return await self._decide(tx, fresh, now, tries=tries - 1)
        doc = await self._complete_if_paid(counted) or counted
        await self._record_excess(tx, doc)
        completed = doc["status"] == SessionStatus.COMPLETED
        if completed and HELD_PURGE_AT in doc:
            await self._ledger.settle_partials(tx.order_code)
        return Applied(Outcome.COMPLETED if completed else Outcome.PARTIAL, doc, True)

    async def _count_once(self, tx: Transaction, doc: Doc, allowed: list[str]) -> Doc | None:
        """One guarded update counting `tx` (and completing the session when it pays it in
        full), with the shop's event in the same update; None if the session changed since
        `doc` was read."""
        version = int(doc.get("version", 1))
        paid = int(doc.get("amountPaid", 0)) + tx.amount
        after = {
            **doc,
            "amountPaid": paid,
            "references": [*doc.get("references", ()), tx.reference],
            "version": version + 1,
        }
        update: dict[str, Any] = {
            "$inc": {"amountPaid": tx.amount, "version": 1},
            # Two flat lists rather than one list of pairs: what every server (and the
            # stand-in) stores alike.
            "$push": {"references": tx.reference, "paidAmounts": tx.amount},
            # The database's clock: one clock for every replica of every service.
            "$currentDate": {"updatedAt": True},
        }
        # amountPaid only grows and the version guard pins it: if the sum covers the amount
        # on this read, it does on the stored document, and one update counts and completes.
        if paid >= doc["amount"]:
            # Paid: nothing left for the reconciler to ask PayOS about.
            update["$set"] = {"status": SessionStatus.COMPLETED.value, CHECK_AT: NO_CHECK}
            update["$currentDate"]["completedAt"] = True
            after["status"] = SessionStatus.COMPLETED.value
            event = outbox.session_entry(outbox.EventType.COMPLETED, after)
        else:
            event = outbox.session_entry(
                outbox.EventType.PARTIAL, after, reference=tx.reference, transactionAmount=tx.amount
            )
        # The reference guard makes this idempotent per transaction, whatever crashed before;
        # the version (issue 17: the event describes exactly the state this update leaves)
        # lets exactly one of concurrent transactions count on a given state.
        return await self._store.sessions.find_one_and_update(
            {
                "_id": doc["_id"],
                "status": {"$in": allowed},
                "version": version,
                "references": {"$nin": [tx.reference]},
            },
            outbox.with_entry(update, event),
            return_document=ReturnDocument.AFTER,
        )

    async def _counted_before(self, tx: Transaction, doc: Doc) -> Applied:
        """A transaction already counted: finish what its first application may not have
        (completion, the excess item), and report it as a duplicate otherwise."""
        done = await self._complete_if_paid(doc)
        await self._record_excess(tx, done or doc)
        after = done or doc
        if after["status"] == SessionStatus.COMPLETED and HELD_PURGE_AT in after:
            # Also what a first delivery that died before it may have left open.
            await self._ledger.settle_partials(tx.order_code)
        if done is not None:
            return Applied(Outcome.COMPLETED, done, True)
        return Applied(Outcome.DUPLICATE, doc, False)

    async def _complete_if_paid(self, doc: Doc) -> Doc | None:
        """Paid in full by transactions counted concurrently, or by one whose application
        died between counting and completing: complete now, exactly once. Only counted
        transactions are in `references`, each made in time or taken by PayOS after a
        cancel, so this holds for an expired or cancelled session too."""
        if doc["status"] == SessionStatus.COMPLETED:
            return None
        if doc.get("amountPaid", 0) < doc["amount"]:
            return None
        version = int(doc.get("version", 1))
        after = {**doc, "status": SessionStatus.COMPLETED.value, "version": version + 1}
        return await self._store.sessions.find_one_and_update(
            {"_id": doc["_id"], "status": doc["status"], "version": version},
            outbox.with_entry(
                {
                    "$set": {"status": SessionStatus.COMPLETED.value, CHECK_AT: NO_CHECK},
                    "$currentDate": {"completedAt": True, "updatedAt": True},
                    "$inc": {"version": 1},
                },
                outbox.session_entry(outbox.EventType.COMPLETED, after),
            ),
            return_document=ReturnDocument.AFTER,
        )

    async def _record_excess(self, tx: Transaction, doc: Doc) -> None:
        excess = excess_of(doc, tx.reference)
        if excess > 0:
            await self._record(IssueKind.OVERPAID, tx, doc, excess=excess)

    async def _record(
        self, kind: IssueKind, tx: Transaction, doc: Doc, *, excess: int | None = None
    ) -> None:
        await self._ledger.record(
            NewIssue(
                kind,
                tx.order_code,
                tx.reference,
                tx.amount,
                tx.data,
                session=doc,
                source=tx.source,
                excess=excess,
            )
        )
