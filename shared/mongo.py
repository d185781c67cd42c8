"""MongoDB access: the collections, their indexes, and the reads every service shares.

Every query keeps to what a real MongoDB does, and to what the local stand-in (nx-27017, the
development and test database) does alike. Where the stand-in falls short, the code takes the
way both answer the same, and says "(shared.mongo: stand-in)" rather than explaining again:

- No `$set` of a datetime: the stand-in stores it as a string. Server times are written with
  `$currentDate` (one clock for every replica anyway), a lease as epoch milliseconds, and a
  datetime the client chose only in a whole document (an insert or a replace).
- No condition beside a top-level `$or`: the stand-in ignores it. Run one query per branch.
- Lookups by equality on an indexed field: what every server, and the stand-in, answers from
  the index alone. Range conditions (a session's expiry) are checked on the document read.
- `count_documents` is an aggregation, which the stand-in runs over every document of the
  collection: never on a path run per request; there, an equality `find` counted here.
- The stand-in pays per operation rather than per document: batch writes (`insert_many`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from .model import utcnow
from .outbox import OUTBOX_PENDING
from .settings import Settings

Doc = dict[str, Any]

SESSIONS = "sessions"
WEBHOOKS = "webhooks"
# One document per uuid ever given to a session (`_id` is the uuid), kept long after the
# session: a uuid names one session only (see session_api.sessions).
USED_UUIDS = "usedUuids"
# The payment ledger (shared.ledger): money that fits no session; no TTL.
ISSUES = "paymentIssues"
# The shop's event log (issue 17, shared.outbox): events moved out of the documents' outboxes,
# kept for the pull API; their deliveries to each receiver URL; the log's sequence counter.
EVENTS = "events"
DELIVERIES = "eventDeliveries"
COUNTERS = "counters"
DEFAULT_DB = "paypush"
# Set on a session whose latest change could not be published yet (Redis was unreachable).
PUBLISH_PENDING = "publishPending"
# When MongoDB's TTL monitor (and the cleanup) may delete a session: a while after its
# `expiresAt`, so a payment made in time but delivered late still finds it (issue 11).
PURGE_AT = "purgeAt"
# `purgeAt` moved aside while a ledger item about the session is open (shared.ledger).
HELD_PURGE_AT = "heldPurgeAt"
# When session-api's reconciler next asks PayOS about a session (epoch seconds: an update
# cannot write a date on every server), absent until its first check, NO_CHECK once none is
# needed any more (paid, or its last check after expiry done).
CHECK_AT = "checkAt"
NO_CHECK = -1.0


def mongo_client(settings: Settings) -> AsyncMongoClient[Doc]:
    """A client whose failures surface within `mongodb_timeout_ms` instead of hanging."""
    t = settings.mongodb_timeout_ms
    return AsyncMongoClient(
        settings.mongodb_url,
        tz_aware=True,
        serverSelectionTimeoutMS=t,
        connectTimeoutMS=t,
        socketTimeoutMS=max(t * 2, 5000),
        appname="payment-push",
    )


class Store:
    """The database of payment sessions and received webhooks."""

    def __init__(self, client: AsyncMongoClient[Doc]) -> None:
        self.client = client
        self.db: AsyncDatabase[Doc] = client.get_default_database(DEFAULT_DB)
        self.sessions: AsyncCollection[Doc] = self.db[SESSIONS]
        self.webhooks: AsyncCollection[Doc] = self.db[WEBHOOKS]
        self.used_uuids: AsyncCollection[Doc] = self.db[USED_UUIDS]
        self.issues: AsyncCollection[Doc] = self.db[ISSUES]
        self.events: AsyncCollection[Doc] = self.db[EVENTS]
        self.deliveries: AsyncCollection[Doc] = self.db[DELIVERIES]
        self.counters: AsyncCollection[Doc] = self.db[COUNTERS]
        self.indexes_ready = False

    async def ensure_indexes(self) -> None:
        """Create the indexes every service relies on (idempotent, run at start-up)."""
        await self.sessions.create_index([("uuid", ASCENDING)], unique=True, name="uuid_unique")
        await self.sessions.create_index(
            [("orderCode", ASCENDING)], unique=True, name="orderCode_unique"
        )
        # "Pending sessions of an account" — the per-account limit counts on it.
        await self.sessions.create_index(
            [("accountNumber", ASCENDING), ("status", ASCENDING), ("expiresAt", ASCENDING)],
            name="account_pending",
        )
        await self.sessions.create_index([("createdAt", DESCENDING)], name="createdAt_desc")
        await self.sessions.create_index(
            [(PUBLISH_PENDING, ASCENDING)], sparse=True, name="publish_pending"
        )
        await self._drop_ttl_on_expires_at()
        await self.sessions.create_index(
            [(PURGE_AT, ASCENDING)], expireAfterSeconds=0, name="purgeAt_ttl"
        )
        # The reconciler, by one index (each costs every insert): open sessions never checked
        # (checkAt null), oldest first; then the open sessions whose next check is due.
        await self.sessions.create_index(
            [("status", ASCENDING), (CHECK_AT, ASCENDING), ("createdAt", ASCENDING)],
            name="reconcile",
        )
        # One record per delivery: a payment link may receive several transactions, so a
        # delivery is identified by orderCode and reference together.
        await self.webhooks.create_index(
            [("orderCode", ASCENDING), ("reference", ASCENDING)],
            unique=True,
            name="delivery_unique",
        )
        await self.webhooks.create_index(
            [("expiresAt", ASCENDING)], expireAfterSeconds=0, name="expiresAt_ttl"
        )
        await self.used_uuids.create_index(
            [("forgetAt", ASCENDING)], expireAfterSeconds=0, name="forgetAt_ttl"
        )
        # One ledger item per case, however often it is delivered or by how many replicas.
        await self.issues.create_index(
            [("kind", ASCENDING), ("orderCode", ASCENDING), ("reference", ASCENDING)],
            unique=True,
            name="issue_unique",
        )
        await self.issues.create_index(
            [("status", ASCENDING), ("kind", ASCENDING), ("createdAt", DESCENDING)],
            name="issue_status_kind",
        )
        await self.issues.create_index(
            [("orderCode", ASCENDING), ("status", ASCENDING)], name="issue_order"
        )
        await self._ensure_event_indexes()
        self.indexes_ready = True

    async def _drop_ttl_on_expires_at(self) -> None:
        """Before issue 11 the sessions' TTL index was on `expiresAt`, deleting a session the
        moment a late payment would need it; dropped by its keys (the name differs on the
        stand-in)."""
        info = await self.sessions.index_information()
        for spec in info.values():
            if list(spec["key"]) == [("expiresAt", 1)] and "expireAfterSeconds" in spec:
                await self.sessions.drop_index([("expiresAt", ASCENDING)])

    async def _ensure_event_indexes(self) -> None:
        # Documents whose outbox holds events the dispatcher has not moved yet.
        for source in (self.sessions, self.issues):
            await source.create_index(
                [(OUTBOX_PENDING, ASCENDING)], sparse=True, name="outbox_pending"
            )
        # The pull API's order and cursor.
        await self.events.create_index([("seq", ASCENDING)], unique=True, name="seq_unique")
        await self.events.create_index([("at", ASCENDING)], name="at")
        await self.events.create_index(
            [("expiresAt", ASCENDING)], expireAfterSeconds=0, name="expiresAt_ttl"
        )
        # What is due at one receiver, in log order; what a session still waits for there.
        await self.deliveries.create_index(
            [("endpoint", ASCENDING), ("state", ASCENDING), ("nextMs", ASCENDING)],
            name="endpoint_due",
        )
        await self.deliveries.create_index(
            [("session", ASCENDING), ("state", ASCENDING)], name="session_state"
        )
        await self.deliveries.create_index(
            [("expiresAt", ASCENDING)], expireAfterSeconds=0, name="expiresAt_ttl"
        )

    async def ping(self) -> None:
        await self.client.admin.command("ping")

    async def clear_publish_pending(self, uuid: str, version: int) -> None:
        """Drop the session's `publishPending` mark once `version` reached Redis; a newer
        change still waiting keeps its mark."""
        await self.sessions.update_one(
            {"uuid": uuid, "version": version}, {"$unset": {PUBLISH_PENDING: ""}}
        )

    async def find_session(self, uuid: str, now: datetime | None = None) -> Doc | None:
        """The live session with this uuid; one past its `expiresAt` is gone (TTL may lag)."""
        # Expiry checked here rather than in the filter: an equality lookup answers from the
        # unique index alone (shared.mongo: stand-in).
        doc = await self.sessions.find_one({"uuid": uuid}, {"_id": 0})
        if doc is None or doc["expiresAt"] <= (now or utcnow()):
            return None
        return doc

    async def find_sessions(self, uuids: Sequence[str], now: datetime | None = None) -> list[Doc]:
        """The live sessions among `uuids`, in one query (the gateway's re-read after a
        reconnect asks for hundreds at once)."""
        now = now or utcnow()
        cursor = self.sessions.find({"uuid": {"$in": list(uuids)}}, {"_id": 0})
        return [doc async for doc in cursor if doc["expiresAt"] > now]
