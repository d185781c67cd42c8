"""The shop's event log: events moved out of the documents' outboxes, read, and replayed.

`relay` takes the events that changes wrote into their documents' outboxes (shared.outbox)
and appends them to the `events` collection under a growing sequence number (the pull API's
cursor), with one delivery per configured receiver URL in `eventDeliveries`; only then does
it take them out of the outbox. Every step may be repeated after a crash: an event or a
delivery already appended is recognised by its id (a unique `_id`), and the outbox is only
emptied by a conditional update guarded by the count it read, so an entry pushed meanwhile
stays for the next round. A sequence number already taken (the counter behind the log) is
never mistaken for such a repeat: the counter is moved past the log and the entry appended.

Only the dispatcher's lease holder relays (session_api.dispatcher): the sequence therefore
grows in the order events are appended, and a reader following the cursor misses none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from shared import outbox
from shared.model import utcnow
from shared.mongo import Doc, Store

from .errors import InvalidRequest, NotFound, ServiceError

log = structlog.get_logger(__name__)

# Documents (and so events) taken per relay round.
RELAY_BATCH = 200
# Events one replay may put back in the queue at most (a wider range: several calls).
MAX_REPLAY = 10_000
MAX_PAGE = 1000
DUPLICATE_KEY = 11000
SEQ_COUNTER = "events"


class DeliveryState:
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def endpoint_key(url: str) -> str:
    """A receiver URL's short name in the deliveries (the URL itself may hold a token)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def delivery_id(event_id: str, endpoint: str) -> str:
    return f"{event_id}:{endpoint}"


@dataclass(frozen=True, slots=True)
class Page:
    events: list[dict[str, Any]]
    next_cursor: int
    has_more: bool


class EventNotFound(NotFound):
    """No event with this id (any more: events are kept 7 days)."""


class NothingToDeliverTo(ServiceError):
    """A replay with no SHOP_WEBHOOK_URL configured (409)."""

    status = 409
    label = "no_receiver"


class TooMany(InvalidRequest):
    """A replay range holding more than MAX_REPLAY events (400): replay a narrower one."""


class EventLog:
    """The `events` and `eventDeliveries` collections and the relay that fills them."""

    def __init__(self, store: Store, *, urls: Sequence[str], retention_seconds: int) -> None:
        self._store = store
        self.endpoints = {endpoint_key(url): url for url in urls}
        self._retention = timedelta(seconds=retention_seconds)
        # Every collection whose documents carry an outbox (the ledger's items join it).
        self.sources: list[AsyncCollection[Doc]] = [store.sessions, store.issues]

    async def relay(self, limit: int = RELAY_BATCH) -> int:
        """Move up to `limit` documents' outbox entries into the log; how many it moved."""
        moved = 0
        for source in self.sources:
            docs = [
                doc
                async for doc in source.find(
                    {outbox.OUTBOX_PENDING: {"$gt": 0}},
                    {outbox.OUTBOX: 1, outbox.OUTBOX_PENDING: 1, "uuid": 1},
                ).limit(limit)
            ]
            docs = [d for d in docs if d.get(outbox.OUTBOX)]
            if docs:
                moved += await self._append(source, docs)
        return moved

    async def _append(self, source: AsyncCollection[Doc], docs: list[Doc]) -> int:
        try:
            return await self._append_once(source, docs)
        except KeyTaken:
            # The counter is behind the log (its document lost or restored from an older
            # backup): move it past the log's last number, then append again. What the
            # first try appended is recognised by its id and keeps its number.
            top = await self._store.events.find_one({}, {"seq": 1}, sort=[("seq", DESCENDING)])
            log.error("event_sequence_behind", log_seq=top and top["seq"])
            if top is not None:
                await self._store.counters.update_one(
                    {"_id": SEQ_COUNTER}, {"$max": {"seq": int(top["seq"])}}, upsert=True
                )
            return await self._append_once(source, docs)

    async def _append_once(self, source: AsyncCollection[Doc], docs: list[Doc]) -> int:
        entries = [(doc, raw) for doc in docs for raw in doc[outbox.OUTBOX]]
        counter = await self._store.counters.find_one_and_update(
            {"_id": SEQ_COUNTER},
            {"$inc": {"seq": len(entries)}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert counter is not None  # an upsert returning the document after it
        first = int(counter["seq"]) - len(entries) + 1
        now = utcnow()
        events: list[Doc] = []
        for offset, (doc, raw) in enumerate(entries):
            fields = outbox.parse(raw)
            events.append(
                {
                    "_id": fields["id"],
                    "seq": first + offset,
                    "type": fields["type"],
                    # Per-session order; an event about no session is ordered by nothing.
                    "session": doc.get("uuid") or fields["id"],
                    "body": raw,
                    "at": _parse_time(fields["timestamp"]),
                    "expiresAt": now + self._retention,
                }
            )
        seqs = await self._insert_events(events)
        deliveries = [
            self._delivery(event["_id"], seqs[event["_id"]], event["session"], key, now)
            for event in events
            for key in self.endpoints
        ]
        await _insert_ignoring_duplicates(self._store.deliveries, deliveries)
        # Guarded by the count read: an entry pushed since then keeps the document for the
        # next round (whose appends of these entries are recognised as repeats). One round
        # trip for every document (shared.mongo: stand-in).
        await source.bulk_write(
            [
                UpdateOne(
                    {"_id": doc["_id"], outbox.OUTBOX_PENDING: doc[outbox.OUTBOX_PENDING]},
                    {
                        "$pullAll": {outbox.OUTBOX: list(doc[outbox.OUTBOX])},
                        "$inc": {outbox.OUTBOX_PENDING: -len(doc[outbox.OUTBOX])},
                    },
                )
                for doc in docs
            ],
            ordered=False,
        )
        return len(entries)

    async def _insert_events(self, events: list[Doc]) -> dict[str, int]:
        """Append `events`; their sequence numbers (an event appended before, by a round that
        died before emptying the outbox, keeps the number it got then)."""
        seqs = {event["_id"]: int(event["seq"]) for event in events}
        repeated = await _insert_ignoring_duplicates(self._store.events, events)
        if repeated:
            async for stored in self._store.events.find({"_id": {"$in": repeated}}, {"seq": 1}):
                seqs[stored["_id"]] = int(stored["seq"])
        return seqs

    def _delivery(self, event_id: str, seq: int, session: str, endpoint: str, now: datetime) -> Doc:
        return {
            "_id": delivery_id(event_id, endpoint),
            "event": event_id,
            "seq": seq,
            "session": session,
            "endpoint": endpoint,
            "state": DeliveryState.PENDING,
            "attempts": 0,
            # Grows with every replay: a delivery marked done late (the dispatcher marks in
            # batches) must not undo a replay made meanwhile.
            "generation": 0,
            # Epoch milliseconds, not dates: the dispatcher moves them with `$set`
            # (shared.mongo: stand-in).
            "createdMs": epoch_ms(now),
            "nextMs": epoch_ms(now),
            "expiresAt": now + self._retention,
        }

    async def page(self, after: int, limit: int, now: datetime | None = None) -> Page:
        """Events with a sequence number above `after`, in order (the pull API)."""
        now = now or utcnow()
        docs = [
            doc
            async for doc in self._store.events.find({"seq": {"$gt": after}})
            .sort("seq", ASCENDING)
            .limit(limit + 1)
        ]
        has_more = len(docs) > limit
        docs = docs[:limit]
        events = []
        for doc in docs:
            if doc["expiresAt"] <= now:
                continue  # past retention; the TTL monitor may lag
            events.append({"cursor": str(doc["seq"]), **json.loads(doc["body"])})
        next_cursor = int(docs[-1]["seq"]) if docs else after
        return Page(events, next_cursor, has_more)

    async def replay(
        self,
        *,
        event_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> int:
        """Deliver again (to every configured URL) one event, or every event whose time is in
        [since, until); how many events. Same ids: a shop that deduplicates credits nothing
        twice."""
        if not self.endpoints:
            raise NothingToDeliverTo("no SHOP_WEBHOOK_URL is configured: nothing to deliver to")
        if event_id is not None:
            query: Doc = {"_id": event_id}
        else:
            query = {"at": {"$gte": since, "$lt": until}}
        events = [
            doc
            async for doc in self._store.events.find(query, {"seq": 1, "session": 1}).limit(
                MAX_REPLAY + 1
            )
        ]
        if event_id is not None and not events:
            raise EventNotFound("no event with this id (events are kept 7 days)")
        if len(events) > MAX_REPLAY:
            raise TooMany(f"more than {MAX_REPLAY} events in this range: replay a narrower one")
        now = utcnow()
        for event in events:
            for key in self.endpoints:
                fresh = self._delivery(event["_id"], int(event["seq"]), event["session"], key, now)
                await self._requeue(fresh)
        return len(events)

    async def _requeue(self, fresh: Doc) -> None:
        """Put one delivery back in the queue as if new (its dates stay as first written)."""
        deliveries = self._store.deliveries
        reset = {k: fresh[k] for k in ("state", "attempts", "createdMs", "nextMs", "seq")}
        for _ in range(2):
            result = await deliveries.update_one(
                {"_id": fresh["_id"]}, {"$set": reset, "$inc": {"generation": 1}}
            )
            if result.matched_count:
                return
            # Never queued (no URL back then) or gone with the TTL: a whole new document.
            if not await _insert_ignoring_duplicates(deliveries, [fresh]):
                return


def epoch_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


class KeyTaken(Exception):
    """An insert refused for a key other than `_id`: the document is not stored (for an
    event, its sequence number is taken: the counter is behind the log)."""


async def _insert_ignoring_duplicates(
    collection: AsyncCollection[Doc], docs: list[Doc]
) -> list[Any]:
    """Insert `docs` in their order, skipping those whose `_id` is stored already; the
    skipped ids. Ordered: a pull reader never sees a later sequence number before an
    earlier one of the same round. Raises KeyTaken for a duplicate of another unique key:
    skipping that document would drop it."""
    repeated: list[Any] = []
    remaining = docs
    while remaining:
        try:
            await collection.insert_many(remaining, ordered=True)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if not errors or any(error.get("code") != DUPLICATE_KEY for error in errors):
                raise
            # An ordered insert stops at its first error: go on after it.
            first = min(int(error["index"]) for error in errors)
            doc_id = remaining[first]["_id"]
            # Which key was duplicated is not in every server's answer alike: ask for the id.
            if await collection.find_one({"_id": doc_id}, {"_id": 1}) is None:
                raise KeyTaken(f"{collection.name}: {doc_id!r} refused for another key") from exc
            repeated.append(doc_id)
            remaining = remaining[first + 1 :]
        else:
            break
    return repeated


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
