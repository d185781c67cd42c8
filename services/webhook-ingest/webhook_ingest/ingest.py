"""The ingest itself: store first, apply through the counting core once, then cache and publish."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import structlog
from pymongo.errors import DuplicateKeyError, PyMongoError

from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.keys import SESSION_TTL_SECONDS
from shared.model import StatusEvent, utcnow
from shared.mongo import Store
from shared.payments import Outcome, Payments, Transaction

from .errors import StoreUnavailable
from .payload import Webhook
from .resync import Resync

log = structlog.get_logger(__name__)

__all__ = ["IngestResult", "Ingestor", "Outcome"]

# Outcomes that describe what a delivery's first arrival did; a later copy of it (the
# webhook was stored before) is a duplicate, whatever the ledger re-derived on the way.
_FIRST_SEEN = frozenset({Outcome.UNKNOWN_ORDER, Outcome.LATE, Outcome.OVERPAID, Outcome.CURRENCY})


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: Outcome
    event: StatusEvent | None
    published: bool


class Ingestor:
    """Applies authenticated webhooks to MongoDB (the source of truth) and the status feed."""

    def __init__(
        self, store: Store, cache: StatusCache, resync: Resync, payments: Payments
    ) -> None:
        self._store = store
        self._cache = cache
        self._resync = resync
        self._payments = payments

    async def ingest(self, webhook: Webhook) -> IngestResult:
        """Record `webhook` and apply it; raises StoreUnavailable if MongoDB cannot take it."""
        if not self._store.indexes_ready:
            # Without the unique indexes, duplicates could not be told apart: refuse for now.
            raise StoreUnavailable("database indexes not ready")
        try:
            fresh = await self._record(webhook)
            if webhook.paid:
                applied = await self._payments.apply(
                    Transaction(webhook.order_code, webhook.reference, webhook.amount, webhook.data)
                )
                doc, outcome = applied.session, applied.outcome
                if not fresh and outcome in _FIRST_SEEN:
                    # Stored before by this very delivery: what it did is done.
                    outcome = Outcome.DUPLICATE
            else:
                doc = await self._store.sessions.find_one({"orderCode": webhook.order_code})
                outcome = Outcome.NOT_PAID if fresh else Outcome.DUPLICATE
                if doc is None:
                    outcome = Outcome.UNKNOWN_ORDER
        except PyMongoError as exc:
            raise StoreUnavailable(str(exc)) from exc
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
