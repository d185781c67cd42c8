"""The payment ledger: money that fits no session, kept until an operator resolves it.

One item per case, identified by (kind, orderCode, reference) under a unique index and
written by an upsert that only ever inserts (`$setOnInsert`): however often PayOS redelivers
and however many replicas race, a case is one item. The collection has no TTL.

While an item about a session is open, the session is held: its `purgeAt` (the TTL field)
is renamed `heldPurgeAt`, so neither MongoDB's TTL monitor nor the cleanup deletes it;
resolving the last open item about it renames it back, giving the session back to the TTL
at the time it had. (`$rename`, not `$set`: the date keeps its type on every server, and an
update cannot compute one; each rename is guarded by `$exists`, so a second hold or release
changes nothing.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import structlog
from bson import ObjectId
from bson.errors import InvalidId
from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from . import outbox
from .model import utcnow
from .mongo import HELD_PURGE_AT, PURGE_AT, Doc, Store

log = structlog.get_logger(__name__)

# The reference of an item about a whole session rather than one transaction
# (`partial_expired`): the unique key still has three parts.
SESSION_REFERENCE = "-"
# PayOS's confirm-webhook test delivery (sent when a merchant confirms the webhook URL).
TEST_ORDER_CODE = 123
TEST_DESCRIPTION = "VQRIO123"
# Who resolves the items nobody needs to look at.
SYSTEM = "system"


class IssueKind(StrEnum):
    UNKNOWN_ORDER = "unknown_order"  # paid, and no session has the orderCode
    LATE = "late"  # paid for an expired session, outside the grace
    OVERPAID = "overpaid"  # counted beyond the session's amount (`excess`)
    PARTIAL_EXPIRED = "partial_expired"  # expired with 0 < amountPaid < amount (cleanup)
    PARTIAL_CANCELLED = "partial_cancelled"  # cancelled with 0 < amountPaid < amount
    PAID_AFTER_CANCEL = "paid_after_cancel"  # paid for a cancelled session (issue 13)
    CURRENCY = "currency"  # paid in a currency other than VND: not counted
    # The shop's receiver refused an event for 3 days (issue 17): its `reference` is the
    # delivery (event id and URL key); no event about it (it would go where the others failed).
    SHOP_NOT_TOLD = "shop_not_told"


# Items about part of a session's amount: settled if the session is later paid in full.
PARTIAL_KINDS = (IssueKind.PARTIAL_EXPIRED, IssueKind.PARTIAL_CANCELLED)


class IssueStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class IssueNotFound(LookupError):
    """No ledger item has this id."""


class AlreadyResolved(Exception):
    """The item was resolved before (by someone else, or by an earlier call)."""

    def __init__(self, item: Doc) -> None:
        super().__init__("this payment issue is already resolved")
        self.item = item


@dataclass(frozen=True, slots=True)
class NewIssue:
    """A case to record: what was paid (`data`: the signed data as received) and about what."""

    kind: IssueKind
    order_code: int
    reference: str
    amount: int
    data: dict[str, Any] | None
    session: Doc | None = None
    source: str = "webhook"  # webhook | reconciler | cleanup | cancel
    excess: int | None = None
    # PayOS's confirm-webhook test delivery: recorded, resolved at once, not alarmed.
    test: bool = False


def is_test_delivery(order_code: int, data: dict[str, Any]) -> bool:
    return order_code == TEST_ORDER_CODE and data.get("description") == TEST_DESCRIPTION


def public_item(doc: Doc) -> dict[str, Any]:
    """An item as the admin API shows it (`id` for `_id`, dates in ISO form)."""
    out: dict[str, Any] = {"id": str(doc["_id"])}
    for key, value in doc.items():
        if key != "_id":
            out[key] = _public(value)
    return out


def _public(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def _session_snapshot(doc: Doc) -> Doc:
    keep = ("uuid", "orderCode", "accountNumber", "amount", "amountPaid", "status", "expiresAt")
    return {k: doc[k] for k in keep if k in doc}


def needs_attention_entry(issue: NewIssue) -> str:
    """The shop's event about a new item; its id is the item's unique key."""
    session = issue.session or {}
    data: dict[str, Any] = {
        "kind": issue.kind.value,
        "orderCode": issue.order_code,
        "reference": issue.reference,
        "amount": issue.amount,
        "uuid": session.get("uuid"),
        "accountNumber": session.get("accountNumber"),
        "source": issue.source,
    }
    if issue.excess is not None:
        data["excess"] = issue.excess
    return outbox.entry(
        outbox.EventType.NEEDS_ATTENTION,
        data,
        outbox.EventType.NEEDS_ATTENTION.value,
        issue.kind.value,
        str(issue.order_code),
        issue.reference,
    )


class Ledger:
    """The `paymentIssues` collection: record (exactly once), list, resolve, count."""

    def __init__(self, store: Store, *, on_new: Callable[[Doc], None] | None = None) -> None:
        self._store = store
        self._items = store.issues
        self._on_new = on_new

    @property
    def store(self) -> Store:
        return self._store

    async def record(self, issue: NewIssue) -> bool:
        """Record `issue` unless an item for its (kind, orderCode, reference) exists; True if
        this call created it. Raises PyMongoError (the caller must not acknowledge then)."""
        status = IssueStatus.RESOLVED if issue.test else IssueStatus.OPEN
        if issue.session is not None and status is IssueStatus.OPEN:
            # Held before the item exists: a crash in between leaves a held session (kept
            # longer), never an open item whose session the TTL may delete.
            await self._store.sessions.update_one(
                {"orderCode": issue.order_code, PURGE_AT: {"$exists": True}},
                {"$rename": {PURGE_AT: HELD_PURGE_AT}},
            )
        now = utcnow()
        item: Doc = {
            "status": status.value,
            "amount": issue.amount,
            "data": issue.data,
            "session": _session_snapshot(issue.session) if issue.session else None,
            "uuid": issue.session.get("uuid") if issue.session else None,
            "source": issue.source,
            "createdAt": now,
        }
        if issue.excess is not None:
            item["excess"] = issue.excess
        if not issue.test and issue.kind is not IssueKind.SHOP_NOT_TOLD:
            # The shop's `payment.needs_attention` event, inserted with the item itself (one
            # document, one write): no item without its event (issue 17).
            item.update(outbox.initial(needs_attention_entry(issue)))
        if issue.test:
            item.update(
                test=True,
                resolvedAt=now,
                resolvedBy=SYSTEM,
                note="PayOS's confirm-webhook test delivery",
            )
        key = {
            "kind": issue.kind.value,
            "orderCode": issue.order_code,
            "reference": issue.reference,
        }
        try:
            result = await self._items.update_one(key, {"$setOnInsert": item}, upsert=True)
            created = result.upserted_id is not None
        except DuplicateKeyError:
            # Two upserts raced to insert the same case: the other one did.
            created = False
        if not created:
            if issue.session is not None:
                # The case was known, perhaps resolved already: the hold above must not
                # outlive the last open item about the session.
                await self._release(issue.order_code)
            return False
        if issue.test:
            log.info("payos_test_delivery", order_code=issue.order_code)
        else:
            doc = {**key, **item, "_id": result.upserted_id}
            log.warning(
                "payment_issue_opened",
                issue_id=str(result.upserted_id),
                kind=issue.kind.value,
                order_code=issue.order_code,
                reference=issue.reference,
                amount=issue.amount,
                excess=issue.excess,
                uuid=item["uuid"],
                source=issue.source,
            )
            if self._on_new is not None:
                self._on_new(doc)
        return True

    async def find(
        self, *, status: IssueStatus | None, kind: IssueKind | None, page: int, limit: int
    ) -> tuple[int, list[Doc]]:
        """One page of items, newest first, and how many match."""
        query: Doc = {}
        if status is not None:
            query["status"] = status.value
        if kind is not None:
            query["kind"] = kind.value
        total = await self._items.count_documents(query)
        cursor = self._items.find(query).sort("createdAt", DESCENDING).skip((page - 1) * limit)
        return total, [doc async for doc in cursor.limit(limit)]

    async def resolve(self, item_id: str, *, by: str, note: str) -> Doc:
        """Close one item, keeping who, when and why; IssueNotFound / AlreadyResolved."""
        try:
            oid = ObjectId(item_id)
        except (InvalidId, TypeError):
            raise IssueNotFound(item_id) from None
        done = await self._items.find_one_and_update(
            {"_id": oid, "status": IssueStatus.OPEN.value},
            {
                "$set": {"status": IssueStatus.RESOLVED.value, "resolvedBy": by, "note": note},
                "$currentDate": {"resolvedAt": True},
            },
            return_document=ReturnDocument.AFTER,
        )
        if done is None:
            existing = await self._items.find_one({"_id": oid})
            if existing is None:
                raise IssueNotFound(item_id)
            raise AlreadyResolved(existing)
        await self._release(int(done["orderCode"]))
        return done

    async def settle_partials(self, order_code: int) -> int:
        """A session closed short (expired, cancelled) and then paid in full: its partial
        items are settled by the system, saying why — the money is in the completed payment
        the shop was told of, not the shopper's to refund. How many it settled. Callers
        skip it for a session that is not held: `record` holds the session before it
        inserts an item, so one without `heldPurgeAt` has no open item to settle."""
        result = await self._items.update_many(
            {
                "orderCode": order_code,
                "kind": {"$in": [k.value for k in PARTIAL_KINDS]},
                "status": IssueStatus.OPEN.value,
            },
            {
                "$set": {
                    "status": IssueStatus.RESOLVED.value,
                    "resolvedBy": SYSTEM,
                    "note": "paid in full afterwards (payment.completed for the whole amount)",
                },
                "$currentDate": {"resolvedAt": True},
            },
        )
        if result.modified_count:
            log.info("payment_issue_settled", order_code=order_code, items=result.modified_count)
            await self._release(order_code)
        return result.modified_count

    async def _release(self, order_code: int) -> None:
        """Give the session back to the TTL once no open item is about it."""
        still_open = await self._items.find_one(
            {"orderCode": order_code, "status": IssueStatus.OPEN.value}, {"_id": 1}
        )
        if still_open is None:
            await self._store.sessions.update_one(
                {"orderCode": order_code, HELD_PURGE_AT: {"$exists": True}},
                {"$rename": {HELD_PURGE_AT: PURGE_AT}},
            )

    async def open_counts(self) -> dict[str, int]:
        """Open items by kind (every kind present, zero included)."""
        counts = dict.fromkeys((k.value for k in IssueKind), 0)
        cursor = await self._items.aggregate(
            [
                {"$match": {"status": IssueStatus.OPEN.value}},
                {"$group": {"_id": "$kind", "n": {"$sum": 1}}},
            ]
        )
        async for row in cursor:
            counts[str(row["_id"])] = int(row["n"])
        return counts
