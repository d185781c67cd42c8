"""The cleanup job: expire stale pending sessions (publishing `expired`), delete expired records.

Served as `GET`/`POST /api/webhooks/cleanup` and run as `python -m session_api.cleanup` by
the Kubernetes CronJob (exit code 0 on success, 1 on failure).

Rules, in this order, all against one `now`:

1. **Expire.** A session still `pending` whose `expiresAt` has passed, or that was created
   more than 24 h ago, is set `expired` (with `version` incremented) by a conditional update
   whose filter holds `status: pending`; of concurrent runs exactly one wins each session,
   and only the winner publishes `expired` through the status cache, so waiting browsers
   stop. The same update marks the session `publishPending` (the ingest's durable mark,
   `webhook_ingest.resync`), cleared once Redis took the event: when Redis is down the
   mark stays, and every ingest replica's sweep publishes the session's latest state once
   Redis is back, whatever became of this run. The same update writes the shop's
   `session.expired` event into the session's outbox (shared.outbox), guarded by the
   version it read, so the event can be neither lost nor describe another state.
2. **Delete.** Sessions whose `purgeAt` (a day after `expiresAt`) has passed and that
   are no longer pending, and webhook records whose `expiresAt` has passed, are deleted:
   the backup for MongoDB's TTL monitor, which runs about once a minute and may lag. A
   pending session is never deleted here: step 1 has first turned it `expired` and
   published that. A session whose `expired` could not be published (Redis down) is not
   deleted by this run (the run reports it), so readers falling back to MongoDB still see
   `expired`; a later run deletes it. Nor is a session whose outbox still holds an event
   the dispatcher has not taken yet.
3. **Partial payments.** An expired session with 0 < amountPaid < amount becomes a
   `partial_expired` item of the payment ledger (shared.ledger), which holds the session
   from the TTL and this deletion until an operator resolves it; a cancelled one a
   `partial_cancelled` item (made by the cancel itself; here if its process died first).

Running it twice, in a row or at once, changes nothing the first run did not already do.
MongoDB's TTL monitor may still delete a pending session before any run sees it; browsers
stop waiting on their own after the gateway's maximum wait (10 minutes).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import structlog
from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway
from pymongo import ReturnDocument

from shared import outbox
from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS, redis_client
from shared.keys import SESSION_TTL_SECONDS
from shared.ledger import SESSION_REFERENCE, IssueKind, Ledger, NewIssue
from shared.logs import configure_logging
from shared.model import PURGE_AFTER_EXPIRY, SessionStatus, StatusEvent, utcnow
from shared.mongo import HELD_PURGE_AT, PUBLISH_PENDING, PURGE_AT, Doc, Store, mongo_client
from shared.settings import SERVICE_SECRETS, Settings

log = structlog.get_logger(__name__)

# Set on an expired or cancelled session once its ledger item (below) exists.
PARTIAL_ITEM = "partialItem"
# The item of a session closed with part of its amount paid, by how it was closed.
PARTIAL_KINDS = {
    SessionStatus.EXPIRED.value: IssueKind.PARTIAL_EXPIRED,
    SessionStatus.CANCELLED.value: IssueKind.PARTIAL_CANCELLED,
}

# Sessions examined per round trip; rounds continue until none is left.
BATCH = 500
# Reads and guarded updates of one session before this run leaves it to the next.
EXPIRE_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class CleanupResult:
    expired: int  # sessions this run moved pending → expired
    published: int  # of those, `expired` events that reached Redis
    publish_failed: int  # of those, events Redis could not take (left to the ingest's sweep)
    sessions_deleted: int
    webhooks_deleted: int
    duration_ms: float
    # Expired sessions with a partial payment this run made ledger items of (issue 11).
    partial_expired: int = 0

    def to_dict(self) -> dict[str, int | float]:
        return {
            "expired": self.expired,
            "published": self.published,
            "publishFailed": self.publish_failed,
            "sessionsDeleted": self.sessions_deleted,
            "webhooksDeleted": self.webhooks_deleted,
            "partialExpired": self.partial_expired,
            "durationMs": self.duration_ms,
        }


async def run_cleanup(
    store: Store, cache: StatusCache, now: datetime | None = None
) -> CleanupResult:
    """One cleanup run (see the module docstring for the rules); raises PyMongoError."""
    started = time.perf_counter()
    now = now or utcnow()
    cutoff = now - timedelta(seconds=SESSION_TTL_SECONDS)
    expired = published = 0
    unpublished: list[str] = []
    # Two simple filters rather than one `$or` (shared.mongo: stand-in).
    for stale in (
        {"status": SessionStatus.PENDING.value, "expiresAt": {"$lte": now}},
        {"status": SessionStatus.PENDING.value, "createdAt": {"$lte": cutoff}},
    ):
        while True:
            batch = [d["_id"] async for d in store.sessions.find(stale, {"_id": 1}).limit(BATCH)]
            changed = 0
            for _id in batch:
                doc = await _expire(store, _id)
                if doc is None:
                    continue  # a concurrent run (or a payment) got there first
                changed += 1
                event = StatusEvent.from_session(doc)
                try:
                    await cache.put(event)
                except REDIS_ERRORS as exc:
                    # Left marked: an ingest sweep publishes it once Redis is back.
                    log.warning("cleanup_publish_failed", uuid=event.uuid, error=str(exc))
                    unpublished.append(event.uuid)
                else:
                    published += 1
                    await store.clear_publish_pending(event.uuid, event.version)
            expired += changed
            # A round that changed nothing means what is left is another run's to finish
            # (and guarantees an end whatever the database answers).
            if len(batch) < BATCH or changed == 0:
                break

    partial = await _record_partial(store)
    closed = {"$in": [s.value for s in SessionStatus if s is not SessionStatus.PENDING]}
    # Past their `purgeAt` (a day after `expiresAt`, so a payment made in time but delivered
    # late still finds its session); a session held by an open ledger item has none.
    # Not while an event of the session waits in its outbox (the dispatcher moves it to the
    # event log within moments; a session is not deleted from under it).
    outbox_empty = {"$in": [0, None]}
    sessions = await store.sessions.delete_many(
        {
            PURGE_AT: {"$lte": now},
            "status": closed,
            "uuid": {"$nin": unpublished},
            outbox.OUTBOX_PENDING: outbox_empty,
        }
    )
    # Sessions stored before `purgeAt` existed, on the same schedule.
    legacy = await store.sessions.delete_many(
        {
            PURGE_AT: {"$exists": False},
            HELD_PURGE_AT: {"$exists": False},
            "expiresAt": {"$lte": now - PURGE_AFTER_EXPIRY},
            "status": closed,
            "uuid": {"$nin": unpublished},
            outbox.OUTBOX_PENDING: outbox_empty,
        }
    )
    webhooks = await store.webhooks.delete_many({"expiresAt": {"$lte": now}})
    result = CleanupResult(
        expired=expired,
        published=published,
        publish_failed=len(unpublished),
        sessions_deleted=sessions.deleted_count + legacy.deleted_count,
        webhooks_deleted=webhooks.deleted_count,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        partial_expired=partial,
    )
    log.info("cleanup_done", **asdict(result))
    return result


async def _record_partial(store: Store) -> int:
    """A `partial_expired` ledger item for every expired session with money on it that has
    none yet: the ones this run expired, and any a run that died left (the mark is set only
    once the item exists). The item holds the session from the TTL while it is open."""
    ledger, recorded = Ledger(store), 0
    query = {
        "status": {"$in": list(PARTIAL_KINDS)},
        "amountPaid": {"$gt": 0},
        PARTIAL_ITEM: None,
    }
    while True:
        batch = [doc async for doc in store.sessions.find(query).limit(BATCH)]
        for doc in batch:
            recorded += await record_partial(ledger, doc, source="cleanup")
        if len(batch) < BATCH:
            return recorded


async def record_partial(ledger: Ledger, doc: Doc, *, source: str) -> int:
    """The ledger item of a session closed unpaid with money on it (expired, or cancelled
    by the shopper), then the session's mark that it has one; 1 if this call made it."""
    recorded = 0
    if 0 < doc.get("amountPaid", 0) < doc["amount"]:
        recorded = await ledger.record(
            NewIssue(
                PARTIAL_KINDS[doc["status"]],
                int(doc["orderCode"]),
                SESSION_REFERENCE,
                int(doc["amountPaid"]),
                None,
                session=doc,
                source=source,
            )
        )
    await ledger.store.sessions.update_one({"_id": doc["_id"]}, {"$set": {PARTIAL_ITEM: True}})
    if recorded:
        # Paid in full since `doc` was read: the item was made after the payment settled
        # partial items, so it is settled here.
        fresh = await ledger.store.sessions.find_one({"_id": doc["_id"]}, {"status": 1})
        if fresh is not None and fresh["status"] == SessionStatus.COMPLETED:
            await ledger.settle_partials(int(doc["orderCode"]))
    return recorded


async def _expire(store: Store, _id: object) -> Doc | None:
    """Move one session pending → expired, marked for publication and with the shop's
    `session.expired` event in its outbox; None if it was no longer pending."""
    for _ in range(EXPIRE_ATTEMPTS):
        doc = await store.sessions.find_one({"_id": _id})
        if doc is None or doc["status"] != SessionStatus.PENDING:
            return None
        version = int(doc.get("version", 1))
        after = {**doc, "status": SessionStatus.EXPIRED.value, "version": version + 1}
        expired = await store.sessions.find_one_and_update(
            # The version guard: the event describes exactly the state this update leaves (a
            # transaction counted meanwhile makes it read again).
            {"_id": _id, "status": SessionStatus.PENDING.value, "version": version},
            outbox.with_entry(
                {
                    # Marked before Redis is written, so a failed publish outlives this run.
                    "$set": {"status": SessionStatus.EXPIRED.value, PUBLISH_PENDING: True},
                    "$inc": {"version": 1},
                    # The database's clock, and no `$set` of a datetime (shared.mongo:
                    # stand-in).
                    "$currentDate": {"updatedAt": True, "expiredAt": True},
                },
                outbox.session_entry(outbox.EventType.EXPIRED, after),
            ),
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        if expired is not None:
            return expired
    return None


async def _run_once(settings: Settings) -> CleanupResult:
    redis = redis_client(settings)
    store = Store(mongo_client(settings))
    try:
        return await run_cleanup(store, StatusCache(redis, sharded=settings.redis_cluster))
    finally:
        await store.client.close()
        await redis.aclose()


PUSH_JOB = "session-cleanup"
PUSH_TIMEOUT_SECONDS = 5.0


def push_counts(settings: Settings, result: CleanupResult | None) -> None:
    """The run's counts to the Pushgateway (the CronJob's pod is gone before any scrape), as
    the last run's values: `None` records a failed run. A failed push is logged, never fatal:
    the cleanup itself is done."""
    if not settings.pushgateway_url:
        return
    registry = CollectorRegistry()
    now = time.time()
    if result is None:
        Gauge(
            "paypush_cleanup_job_last_failure_timestamp_seconds",
            "When the cleanup job last failed",
            registry=registry,
        ).set(now)
    else:
        Gauge(
            "paypush_cleanup_job_last_success_timestamp_seconds",
            "When the cleanup job last succeeded",
            registry=registry,
        ).set(now)
        Gauge(
            "paypush_cleanup_job_expired_sessions",
            "Pending sessions the last run moved to expired",
            registry=registry,
        ).set(result.expired)
        Gauge(
            "paypush_cleanup_job_publish_failed",
            "`expired` events of the last run Redis could not take (left to the ingest's sweep)",
            registry=registry,
        ).set(result.publish_failed)
        deleted = Gauge(
            "paypush_cleanup_job_deleted_records",
            "Expired records the last run deleted",
            ["collection"],
            registry=registry,
        )
        deleted.labels("sessions").set(result.sessions_deleted)
        deleted.labels("webhooks").set(result.webhooks_deleted)
        Gauge(
            "paypush_cleanup_job_duration_seconds",
            "How long the last run took",
            registry=registry,
        ).set(result.duration_ms / 1000)
    try:
        # POST (push-add): replaces this group's metrics of the same names and keeps the others,
        # so the last failure's timestamp stays beside the last success's.
        pushadd_to_gateway(
            settings.pushgateway_url, job=PUSH_JOB, registry=registry, timeout=PUSH_TIMEOUT_SECONDS
        )
    except OSError as exc:
        log.warning("cleanup_metrics_push_failed", error=str(exc))


def main() -> int:
    """`python -m session_api.cleanup`: one run, its counts on stdout as JSON (and to the
    Pushgateway when PUSHGATEWAY_URL is set)."""
    # Redis and MongoDB only: the job holds none of the secrets.
    settings = Settings.from_env(secrets=SERVICE_SECRETS["session-cleanup"])
    configure_logging(settings)
    try:
        result = asyncio.run(_run_once(settings))
    except Exception as exc:
        log.error("cleanup_failed", error=str(exc), error_type=type(exc).__name__)
        push_counts(settings, None)
        return 1
    push_counts(settings, result)
    print(json.dumps({"success": True, **result.to_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
