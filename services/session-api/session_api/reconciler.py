"""Reconciliation with PayOS when a webhook never comes (issue 11).

One reconciler per deployment at a time: every session-api replica runs this loop under its
supervisor, and the one holding a Redis lease does the work; when it dies, the lease runs
out and another replica takes over within `RECONCILE_LEASE_SECONDS`.

A session still pending `RECONCILE_AFTER_SECONDS` after its creation is asked about with
`AsyncPayOS.payment_requests.get`; then again after 2, 5 and 15 minutes, then hourly until
its expiry, and once more just after it (a payment made just before expiry whose webhook
never comes). Its next check is stored on the session (`checkAt`), so a new holder goes on
where the last one stopped. Transactions PayOS reports are applied through the counting
core the ingest uses (shared.payments): the reference guard makes each count once whether
its webhook arrives before, after or never; what changed is published like the ingest does.
PayOS calls are paced to `RECONCILE_MAX_PER_SECOND`, and a PayOS error ends the cycle (the
session is retried later): PayOS is never hammered, and browsers never see its errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog
from payos import APIError, AsyncPayOS, PayOSError
from payos.types import PaymentLink
from payos.types import Transaction as Transaction_
from pymongo import ASCENDING
from pymongo.errors import PyMongoError
from redis.asyncio import Redis

from shared import keys
from shared.cache import StatusCache
from shared.clients import REDIS_ERRORS
from shared.model import SessionStatus, utcnow
from shared.mongo import CHECK_AT, NO_CHECK, Doc, Store
from shared.payments import Outcome, Payments, Transaction
from shared.tasks import Supervised, Supervisor

from .cancel import Cancellations
from .errors import ServiceError
from .metrics import SessionMetrics
from .publishing import publish

log = structlog.get_logger(__name__)

# Delays between a session's checks after its first: 2, 5, 15 minutes, then hourly.
BACKOFF_SECONDS: tuple[float, ...] = (120.0, 300.0, 900.0)
HOURLY = 3600.0
# The last check, this long after the session's expiry (PayOS takes no payment after it).
AFTER_EXPIRY_SECONDS = 60.0
# A session whose check failed (PayOS down, slow, or refusing) is asked again after this.
RETRY_SECONDS = 30.0
# PayOS's "payment link not found" (a session whose link creation is still under way).
LINK_NOT_FOUND = "101"
# Sessions taken per query; a cycle takes at most what the rate cap lets it ask.
MAX_BATCH = 500
# How long `stop` lets a cycle in progress end by itself before cancelling it.
STOP_WAIT_SECONDS = 3.0

# Renew the lease if we hold it; release it only if we hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Nothing left to ask PayOS about a session in these.
_FINAL = (SessionStatus.COMPLETED, SessionStatus.CANCELLED)
_PAYOS_ERRORS: tuple[type[Exception], ...] = (PayOSError, httpx.HTTPError, TimeoutError)


def next_check(session: Doc, checks_done: int, now: float, *, after: float) -> float:
    """When to ask PayOS again about `session` after its `checks_done`-th check made at
    `now` (epoch seconds); NO_CHECK once its check after expiry is done."""
    expires: float = session["expiresAt"].timestamp()
    if now >= expires:
        return NO_CHECK
    index = checks_done - 1
    delay = BACKOFF_SECONDS[index] if index < len(BACKOFF_SECONDS) else HOURLY
    return min(now + delay, expires + AFTER_EXPIRY_SECONDS)


def checks_over_life(*, after: float, life: float) -> int:
    """How many times one session that is never paid is asked about over its life: the
    bound on PayOS calls per session that the backoff gives."""
    created = 0.0
    session = {"expiresAt": datetime.fromtimestamp(created + life).astimezone()}
    at, n = created + after, 0
    while at != NO_CHECK:
        n += 1
        at = next_check(session, n, at, after=after)
    return n


@dataclass
class CycleStats:
    """What one cycle did (the benchmark reads these)."""

    queries: int = 0
    checked: int = 0
    recovered: int = 0
    errors: int = 0


class Lease:
    """A Redis key held by one process at a time, renewed while it works."""

    def __init__(self, redis: Redis, key: str, seconds: float) -> None:
        self._redis = redis
        self._key = key
        self._ms = max(1, int(seconds * 1000))
        self.token = secrets.token_hex(12)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire_or_renew(self) -> bool:
        """True if this process holds the lease (now, for another lease period)."""
        if await self._renew(keys=[self._key], args=[self.token, self._ms]):
            return True
        return bool(await self._redis.set(self._key, self.token, nx=True, px=self._ms))

    async def release(self) -> None:
        await self._release(keys=[self._key], args=[self.token])


class Reconciler:
    """The loop: hold the lease, find sessions due a check, ask PayOS, apply, publish."""

    def __init__(
        self,
        *,
        store: Store,
        cache: StatusCache,
        redis: Redis,
        payos: AsyncPayOS,
        payments: Payments,
        metrics: SessionMetrics,
        cancellations: Cancellations | None = None,
        after_seconds: float,
        max_per_second: float,
        interval_seconds: float,
        lease_seconds: float,
        payos_timeout: float,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._store = store
        self._retry = retry_seconds
        self._cache = cache
        self._payos = payos
        self._payments = payments
        self._cancellations = cancellations
        self._metrics = metrics
        self._after = after_seconds
        self._min_gap = 1.0 / max_per_second
        self._max_per_second = max_per_second
        self._interval = interval_seconds
        self._payos_timeout = payos_timeout
        self.lease = Lease(redis, keys.RECONCILER_LEASE_KEY, lease_seconds)
        self._lease_seconds = lease_seconds
        self._last_call = 0.0
        self._task: Supervised | None = None
        self._stopping = asyncio.Event()
        self.holding = False

    def start(self, supervisor: Supervisor) -> None:
        # `forever=False`: the loop returns only when asked to stop; what kills it otherwise
        # (an exception) is restarted all the same.
        self._stopping.clear()
        self._task = supervisor.spawn("reconciler", self._run, forever=False)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            # Let the loop finish what it is doing (a cycle ends early once asked): a
            # command cancelled halfway would leave its connection behind.
            child = self._task.task
            if child is not None:
                await asyncio.wait([child], timeout=STOP_WAIT_SECONDS)
            await self._task.stop()
        if self.holding:
            # Handed over at once rather than after the lease runs out.
            with contextlib.suppress(*REDIS_ERRORS):
                await self.lease.release()
            self._set_holding(False)

    def _set_holding(self, holding: bool) -> None:
        if holding != self.holding:
            log.info("reconciler_lease", held=holding)
        self.holding = holding
        self._metrics.reconcile_leader.set(1 if holding else 0)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            started = loop.time()
            try:
                self._set_holding(await self.lease.acquire_or_renew())
            except REDIS_ERRORS as exc:
                # Without Redis nobody can be sure to hold it: nobody reconciles.
                log.info("reconciler_lease_unavailable", error=str(exc))
                self._set_holding(False)
            if self.holding:
                try:
                    await self.cycle(deadline=started + self._lease_seconds / 2)
                except PyMongoError as exc:
                    log.info("reconciler_cycle_failed", error=str(exc))
            # Not holding: try again well within a lease period, so a dead holder is
            # replaced soon after its lease runs out.
            wait = self._interval if self.holding else min(self._interval, self._lease_seconds / 3)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stopping.wait(), max(0.0, wait - (loop.time() - started))
                )

    async def due(self, now: float, limit: int) -> tuple[list[Doc], int]:
        """Sessions due a check (never checked and old enough first), and queries made."""
        cutoff = utcnow() - timedelta(seconds=self._after)
        fields = {
            "_id": 1,
            "uuid": 1,
            "orderCode": 1,
            "status": 1,
            "expiresAt": 1,
            "reconcileChecks": 1,
        }
        # Expired ones too: a session that expired before any check (the reconciler was
        # down, or the session predates it) is asked about once.
        open_ = [SessionStatus.PENDING.value, SessionStatus.EXPIRED.value]
        new = self._store.sessions.find(
            {"status": {"$in": open_}, CHECK_AT: None, "createdAt": {"$lte": cutoff}}, fields
        )
        found = [doc async for doc in new.sort("createdAt", ASCENDING).limit(limit)]
        queries = 1
        if len(found) < limit:
            again = self._store.sessions.find(
                {"status": {"$in": open_}, CHECK_AT: {"$gt": 0, "$lte": now}}, fields
            )
            found += [
                doc async for doc in again.sort(CHECK_AT, ASCENDING).limit(limit - len(found))
            ]
            queries += 1
        return found, queries

    async def cycle(self, *, deadline: float | None = None) -> CycleStats:
        """One pass over what is due, within the rate cap (and `deadline`, loop time)."""
        loop = asyncio.get_running_loop()
        stats = CycleStats()
        budget = max(1, min(MAX_BATCH, int(self._interval * self._max_per_second)))
        sessions, stats.queries = await self.due(time.time(), budget)
        for doc in sessions:
            if deadline is not None and loop.time() > deadline:
                break  # renew the lease before going on
            if self._stopping.is_set():
                break
            if not await self._check(doc, stats):
                break  # PayOS is failing: not another call this cycle
        return stats

    async def _check(self, doc: Doc, stats: CycleStats) -> bool:
        """Ask PayOS about one session and apply what it reports; False on a PayOS error."""
        order_code = int(doc["orderCode"])
        slog = log.bind(order_code=order_code, uuid=doc["uuid"])
        if doc["status"] not in (SessionStatus.PENDING, SessionStatus.EXPIRED):
            await self._schedule(doc, NO_CHECK, stats, counted=False)
            return True
        await self._pace()
        link: PaymentLink | None = None
        transactions: Sequence[Transaction_] = ()
        try:
            async with asyncio.timeout(self._payos_timeout + 1):
                link = await self._payos.payment_requests.get(order_code)
        except APIError as exc:
            # No link (yet): nothing PayOS took. Any other refusal: asked again later.
            if exc.error_code != LINK_NOT_FOUND:
                return await self._payos_failed(doc, stats, slog, exc)
        except _PAYOS_ERRORS as exc:
            return await self._payos_failed(doc, stats, slog, exc)
        else:
            transactions = link.transactions
        stats.checked += 1
        self._metrics.reconcile_checked.inc()
        latest: Doc | None = None
        for t in transactions:
            data = t.model_dump(by_alias=True)
            applied = await self._payments.apply(
                Transaction(order_code, t.reference, t.amount, data, source="reconciler")
            )
            if applied.changed and applied.session is not None:
                latest = applied.session
            if applied.changed or applied.outcome in (Outcome.LATE, Outcome.OVERPAID):
                stats.recovered += 1
                self._metrics.reconcile_recovered.inc()
                slog.info("reconciled_transaction", reference=t.reference, outcome=applied.outcome)
        if latest is not None:
            await publish(self._cache, self._store, latest)
        if link is not None and link.status == "CANCELLED" and self._cancellations is not None:
            # Cancelled at PayOS (its checkout page, or a cancel of ours whose process died
            # after PayOS took it) and still open here: closed like a cancel from the page.
            try:
                closed = await self._cancellations.close(doc, link)
            except ServiceError as exc:
                slog.warning("reconcile_cancel_failed", error=str(exc))
            else:
                if closed["status"] != doc["status"]:
                    latest = closed
                    slog.info("reconciled_cancel", status=closed["status"])
        now = time.time()
        checks = int(doc.get("reconcileChecks", 0)) + 1
        final = latest is not None and latest["status"] in _FINAL
        at = NO_CHECK if final else next_check(doc, checks, now, after=self._after)
        await self._schedule(doc, at, stats, counted=True)
        return True

    async def _payos_failed(self, doc: Doc, stats: CycleStats, slog: Any, exc: Exception) -> bool:
        stats.errors += 1
        self._metrics.reconcile_payos_errors.inc()
        slog.warning("reconcile_payos_error", error=str(exc) or type(exc).__name__)
        await self._schedule(doc, time.time() + self._retry, stats, counted=False)
        return False

    async def _schedule(self, doc: Doc, at: float, stats: CycleStats, *, counted: bool) -> None:
        update: Doc = {"$set": {CHECK_AT: at}}
        if counted:
            update["$inc"] = {"reconcileChecks": 1}
        query: Doc = {"_id": doc["_id"]}
        if at != NO_CHECK:
            # A payment completing it meanwhile has set NO_CHECK: keep that.
            query["status"] = {"$in": [SessionStatus.PENDING.value, SessionStatus.EXPIRED.value]}
        await self._store.sessions.update_one(query, update)
        stats.queries += 1

    async def _pace(self) -> None:
        """At most `max_per_second` PayOS calls: one every 1/rate seconds."""
        loop = asyncio.get_running_loop()
        wait = self._last_call + self._min_gap - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_call = loop.time()
