"""The ingest itself: store first, complete the session once, then cache and publish."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

import structlog
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.keys import SESSION_TTL_SECONDS
from shared.model import SessionStatus, StatusEvent, utcnow
from shared.mongo import Doc, Store

from .errors import StoreUnavailable
from .payload import Webhook
from .resync import Resync

log = structlog.get_logger(__name__)


class Outcome(StrEnum):
    COMPLETED = "completed"  # the session is now paid in full
    PARTIAL = "partial"  # a transaction counted, the session still waits for more
    DUPLICATE = "duplicate"  # this orderCode + reference was received before
    NOT_PAID = "not_paid"  # PayOS reported a failed transaction: recorded only
    UNKNOWN_ORDER = "unknown_order"  # e.g. PayOS's confirm-webhook test: recorded only
    NOT_PENDING = "not_pending"  # a new transaction for a closed session: recorded only


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: Outcome
    event: StatusEvent | None
    published: bool


class Ingestor:
    """Applies authenticated webhooks to MongoDB (the source of truth) and the status feed."""

    def __init__(self, store: Store, cache: StatusCache, resync: Resync) -> None:
        self._store = store
        self._cache = cache
        self._resync = resync

    async def ingest(self, webhook: Webhook) -> IngestResult:
        """Record `webhook` and apply it; raises StoreUnavailable if MongoDB cannot take it."""
        if not self._store.indexes_ready:
            # Without the unique index, duplicates could not be told apart: refuse for now.
            raise StoreUnavailable("database indexes not ready")
        try:
            fresh = await self._record(webhook)
            if webhook.paid:
                doc, changed = await self._apply(webhook)
            else:
                doc, changed = (
                    await self._store.sessions.find_one({"orderCode": webhook.order_code}),
                    False,
                )
        except PyMongoError as exc:
            raise StoreUnavailable(str(exc)) from exc

        if doc is None:
            outcome = Outcome.UNKNOWN_ORDER
        elif changed:
            completed = doc["status"] == SessionStatus.COMPLETED
            outcome = Outcome.COMPLETED if completed else Outcome.PARTIAL
        elif not fresh or webhook.reference in doc.get("references", ()):
            # Received before, or counted by a concurrent copy of this very delivery.
            outcome = Outcome.DUPLICATE
        elif not webhook.paid:
            outcome = Outcome.NOT_PAID
        else:
            outcome = Outcome.NOT_PENDING
        if doc is None:
            return IngestResult(outcome, None, published=False)

        # Also for duplicates: a delivery whose first attempt died between MongoDB and Redis
        # is finished here; the cache script publishes only a version it has not seen.
        event = StatusEvent.from_session(doc)
        published = await self._publish(event)
        return IngestResult(outcome, event, published)

    async def _record(self, webhook: Webhook) -> bool:
        """Store the delivery; False if this orderCode + reference is already stored."""
        now = utcnow()
        try:
            await self._store.webhooks.insert_one(
                {
                    "orderCode": webhook.order_code,
                    "reference": webhook.reference,
                    "amount": webhook.amount,
                    "code": webhook.code,
                    "desc": webhook.desc,
                    "success": webhook.success,
                    "data": webhook.data,
                    "receivedAt": now,
                    "expiresAt": now + timedelta(seconds=SESSION_TTL_SECONDS),
                }
            )
        except DuplicateKeyError:
            return False
        return True

    async def _apply(self, webhook: Webhook) -> tuple[Doc | None, bool]:
        """Count the transaction once, and complete the session once it is paid in full.

        Equality filters only, plus the reference guard (shared.mongo: stand-in). Expiry is
        checked on the document read first; a session is only ever moved forward, so a stale
        read cannot undo anything.
        """
        sessions = self._store.sessions
        doc = await sessions.find_one({"orderCode": webhook.order_code})
        if doc is None or doc["status"] != SessionStatus.PENDING or doc["expiresAt"] <= utcnow():
            return doc, False
        changed = False
        if webhook.reference not in doc.get("references", ()):
            update: dict[str, Any] = {
                "$inc": {"amountPaid": webhook.amount, "version": 1},
                "$push": {"references": webhook.reference},
                # The database's clock: one clock for every replica of every service.
                "$currentDate": {"updatedAt": True},
            }
            # amountPaid only grows: if the sum already covers the amount on this read, it
            # does on the stored document too, and one update both counts and completes.
            if doc.get("amountPaid", 0) + webhook.amount >= doc["amount"]:
                update["$set"] = {"status": SessionStatus.COMPLETED.value}
                update["$currentDate"]["completedAt"] = True
            # The reference guard makes this idempotent per delivery, whatever crashed before;
            # `status: pending` lets exactly one of concurrent deliveries count.
            counted = await sessions.find_one_and_update(
                {
                    "_id": doc["_id"],
                    "status": SessionStatus.PENDING.value,
                    "references": {"$nin": [webhook.reference]},
                },
                update,
                return_document=ReturnDocument.AFTER,
            )
            if counted is not None:
                doc, changed = counted, True
            else:
                doc = await sessions.find_one({"_id": doc["_id"]}) or doc
        if (
            doc["status"] == SessionStatus.PENDING
            and webhook.reference in doc.get("references", ())
            and doc.get("amountPaid", 0) >= doc["amount"]
        ):
            # Paid in full by transactions counted concurrently, or by a delivery that died
            # between counting and completing: complete now, exactly once.
            done = await sessions.find_one_and_update(
                {"_id": doc["_id"], "status": SessionStatus.PENDING.value},
                {
                    "$set": {"status": SessionStatus.COMPLETED.value},
                    "$currentDate": {"completedAt": True, "updatedAt": True},
                    "$inc": {"version": 1},
                },
                return_document=ReturnDocument.AFTER,
            )
            if done is not None:
                doc, changed = done, True
        return doc, changed

    async def _publish(self, event: StatusEvent) -> bool:
        try:
            return await self._cache.put(event)
        except REDIS_ERRORS as exc:
            # Marked in MongoDB before the delivery is acknowledged, so the publication
            # survives this process; if even the mark fails, PayOS must deliver again.
            log.warning("publish_deferred", uuid=event.uuid, error=str(exc))
            try:
                await self._resync.defer(event)
            except PyMongoError as mongo_exc:
                raise StoreUnavailable(str(mongo_exc)) from mongo_exc
            return False
