"""The dispatcher: signed Standard Webhooks to the shop, from the event log, under a lease.

Why in session-api: it already holds MongoDB, Redis and the admin and shop-facing API (the
pull API and replay read the same log), it is not on the path PayOS's deliveries take (a slow
shop must never slow the ingest, whose answers PayOS times), and its replicas are few and
long-lived. One replica at a time dispatches: the Redis lease `paypush:outbox:lease` (the
reconciler's `Lease`), taken over within `OUTBOX_LEASE_SECONDS` when its holder dies.

Each round: relay new outbox entries into the log (session_api.event_log), then start the
deliveries that are due. Per session the events go strictly in log order — a session's next
event is sent only once every earlier one of it was delivered (or given up) at that URL —
while different sessions are delivered concurrently (`SHOP_WEBHOOK_CONCURRENCY` per URL).

A delivery is `POST` with `webhook-id` (the event id), `webhook-timestamp` and
`webhook-signature` (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body`, once per configured
secret, space separated) as the Standard Webhooks specification says. A 2xx is delivered;
anything else, a redirect, an error or no answer within `SHOP_WEBHOOK_TIMEOUT_SECONDS` is
retried after an exponentially growing delay with jitter, until `SHOP_WEBHOOK_GIVE_UP_SECONDS`
(3 days) after the first attempt: then it is raised as a ledger item (`shop_not_told`) and
marked failed. A URL that answers again after an outage (a success after several failures in
a row) has everything waiting for a retry made due at once: catching up after a long outage
takes the time to send the backlog, not the retry delays. The state is written after the
attempt, so a dispatcher that dies mid-delivery leaves it pending: its successor sends it
again, with the same id (at least once; the shop deduplicates by id).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial

import aiohttp
import structlog
from pymongo import ASCENDING, UpdateOne
from pymongo.errors import PyMongoError
from redis.asyncio import Redis

from shared.clients import REDIS_ERRORS
from shared.keys import OUTBOX_LEASE_KEY
from shared.ledger import IssueKind, Ledger, NewIssue
from shared.model import utcnow
from shared.mongo import Doc, Store
from shared.settings import Settings, webhook_secret_bytes
from shared.tasks import checkpoint

from .event_log import DeliveryState, EventLog, epoch_ms
from .metrics import OutboxMetrics
from .reconciler import Lease

log = structlog.get_logger(__name__)

# Due deliveries looked at per round and URL.
DUE_BATCH = 500
STATS_EVERY_SECONDS = 5.0
STORE_RETRY_SECONDS = 1.0
USER_AGENT = "paypush-webhooks/1"
JITTER = 0.2  # each retry delay is drawn within ±20 % of the schedule's
# Failed attempts in a row at one URL that make it an outage: its next success catches up.
OUTAGE_FAILURES = 3
CATCH_UP_EVERY_SECONDS = 30.0


def sign(secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per secret, space separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in secrets
    )


def retry_delay(attempts: int, first: float, cap: float, rng: random.Random) -> float:
    """The wait after the `attempts`-th failed attempt: first·2^(attempts-1), capped, ±jitter."""
    base = min(first * 2.0 ** max(attempts - 1, 0), cap)
    return float(base * rng.uniform(1 - JITTER, 1 + JITTER))


def schedule(settings: Settings) -> list[float]:
    """The retry schedule without jitter (seconds after the first attempt), for the README."""
    out: list[float] = []
    total, n = 0.0, 1
    while True:
        total += min(
            settings.shop_webhook_retry_first_seconds * 2 ** (n - 1),
            settings.shop_webhook_retry_max_seconds,
        )
        if total >= settings.shop_webhook_give_up_seconds:
            return out
        out.append(total)
        n += 1


async def _renew(lease: Lease, within: float) -> bool:
    """Renew, bounded: a renewal that cannot finish before the lease could lapse is lost."""
    try:
        async with asyncio.timeout(within):
            return await lease.acquire_or_renew()
    except TimeoutError:
        log.warning("outbox_lease_renewal_failed", error="timeout")
    except REDIS_ERRORS as exc:
        log.warning("outbox_lease_renewal_failed", error=str(exc))
    return False


async def run_under_lease(
    lease: Lease,
    seconds: float,
    work: Callable[[], Awaitable[None]],
    *,
    on_change: Callable[[bool], None] | None = None,
) -> None:
    """Forever: take `lease` when free, run `work` while holding it, renewing it every third of
    its TTL; cancel `work` the moment the lease is lost or cannot be renewed in time.

    Runs as a supervised task; `work` is expected to loop until cancelled.
    """
    interval = seconds / 3
    while True:
        try:
            taken = await lease.acquire_or_renew()
        except REDIS_ERRORS as exc:
            log.warning("outbox_lease_unavailable", error=str(exc))
            taken = False
        if not taken:
            await asyncio.sleep(interval)
            continue
        log.info("outbox_lease_taken")
        if on_change is not None:
            on_change(True)
        task = asyncio.ensure_future(work())
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=interval)
                if done:
                    task.result()  # an error of the work is the supervisor's to see
                    break
                renewed = await _renew(lease, interval)
                if not renewed:
                    log.warning("outbox_lease_lost")
                    break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if on_change is not None:
                on_change(False)
            # Handed over at once (a no-op if it is no longer ours).
            with contextlib.suppress(*REDIS_ERRORS):
                await lease.release()


class Dispatcher:
    """Relays and delivers while this process holds the lease; idle otherwise."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        redis: Redis,
        event_log: EventLog,
        metrics: OutboxMetrics,
    ) -> None:
        self._settings = settings
        self._store = store
        self._log = event_log
        self._metrics = metrics
        self._ledger = Ledger(store)
        self._secrets = [webhook_secret_bytes(s) for s in settings.shop_webhook_secret]
        self.lease = Lease(redis, OUTBOX_LEASE_KEY, settings.outbox_lease_seconds)
        self._lease_seconds = settings.outbox_lease_seconds
        self._rng = random.Random()
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        # Delivered, not yet marked in MongoDB: marked together at the next round's start
        # (one write for many), before that round looks for what is due. A dispatcher that
        # dies before marking them sends them again: at least once, same ids.
        self._delivered: list[tuple[str, int]] = []  # (delivery id, its generation)
        # Deliveries whose outcome was written since this round began: a due query running
        # meanwhile may have read them as they were before (and their chain is over).
        self._touched: set[str] = set()
        self._stats_at = 0.0
        # Outage recovery, per URL: failed attempts since its last success, the URLs that
        # answered again after an outage, and when each was last caught up.
        self._failures_in_a_row: dict[str, int] = defaultdict(int)
        self._back: set[str] = set()
        self._caught_up_at: dict[str, float] = {}

    async def run(self) -> None:
        """The supervised task: lead while holding the lease, wait for it otherwise."""
        await run_under_lease(
            self.lease, self._lease_seconds, self._lead, on_change=self._metrics.leader.set
        )

    async def _lead(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._settings.shop_webhook_timeout_seconds)
        connector = aiohttp.TCPConnector(
            limit=self._settings.shop_webhook_concurrency * max(len(self._log.endpoints), 1)
        )
        async with aiohttp.ClientSession(
            timeout=timeout, connector=connector, headers={"User-Agent": USER_AGENT}
        ) as http:
            self._http = http
            try:
                await self._rounds()
            finally:
                inflight = list(self._inflight.values())
                for task in inflight:
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)
                self._inflight.clear()
                with contextlib.suppress(PyMongoError, asyncio.CancelledError):
                    # What was delivered is marked now, or sent again by the next holder.
                    await asyncio.wait_for(self._flush_delivered(), STORE_RETRY_SECONDS)
                self._delivered.clear()
                self._http = None
                self._metrics.reset_gauges()

    async def _rounds(self) -> None:
        poll = self._settings.outbox_poll_seconds
        while True:
            checkpoint()
            try:
                busy = await self.round()
            except PyMongoError as exc:
                log.warning("outbox_store_unavailable", error=str(exc))
                await asyncio.sleep(STORE_RETRY_SECONDS)
                continue
            if not busy:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll)

    async def round(self) -> bool:
        """One relay and one look for due deliveries; True if it found work."""
        self._touched.clear()
        await self._flush_delivered()
        await self._catch_up()
        moved = await self._log.relay()
        started = 0
        for endpoint in self._log.endpoints:
            started += await self._start_due(endpoint)
        if time.monotonic() - self._stats_at >= STATS_EVERY_SECONDS:
            self._stats_at = time.monotonic()
            await self.refresh_stats()
        return bool(moved or started)

    async def _start_due(self, endpoint: str) -> int:
        """Start the deliveries due at `endpoint` whose session waits for nothing earlier."""
        limit = self._settings.shop_webhook_concurrency
        busy = sum(1 for key in self._inflight if key[0] == endpoint)
        room = limit - busy
        if room <= 0 or (busy and room < limit // 2):
            # Three queries find what is due: worth it for a batch, not for one free slot.
            return 0
        now = utcnow()
        due = [
            d
            async for d in self._store.deliveries.find(
                {
                    "endpoint": endpoint,
                    "state": DeliveryState.PENDING,
                    "nextMs": {"$lte": epoch_ms(now)},
                }
            )
            .sort("seq", ASCENDING)
            .limit(DUE_BATCH)
        ]
        settled = self._touched.union(_id for _id, _ in self._delivered)
        due = [
            d
            for d in due
            if (endpoint, d["session"]) not in self._inflight and d["_id"] not in settled
        ]
        if not due:
            return 0
        by_session: dict[str, list[Doc]] = defaultdict(list)
        for d in due:
            by_session[d["session"]].append(d)
        # What each of these sessions still waits for at this URL, due or not: only the
        # earliest of them may go now.
        earliest: dict[str, int] = {}
        async for d in self._store.deliveries.find(
            {
                "session": {"$in": list(by_session)},
                "state": DeliveryState.PENDING,
                "endpoint": endpoint,
            },
            {"seq": 1, "session": 1},
        ):
            s = int(d["seq"])
            earliest[d["session"]] = min(earliest.get(d["session"], s), s)
        chains = [
            chain
            for session, chain in by_session.items()
            # Otherwise an earlier event of this session is waiting for its retry.
            if int(chain[0]["seq"]) == earliest.get(session)
        ][:room]
        if not chains:
            return 0
        bodies = {
            e["_id"]: e
            async for e in self._store.events.find(
                {"_id": {"$in": [d["event"] for chain in chains for d in chain]}},
                {"body": 1, "at": 1},
            )
        }
        started = 0
        for chain in chains:
            key = (endpoint, chain[0]["session"])
            task = asyncio.create_task(self._deliver_chain(endpoint, chain, bodies))
            self._inflight[key] = task
            task.add_done_callback(partial(self._chain_done, key))
            started += 1
        return started

    async def _catch_up(self) -> None:
        """A receiver back after an outage: every delivery waiting for its retry there is due
        now, rather than at its backoff (up to SHOP_WEBHOOK_RETRY_MAX_SECONDS away), so the
        shop catches up at the pace of the concurrency, in order per session. Once per
        CATCH_UP_EVERY_SECONDS per URL at most: a receiver that refuses one event while taking
        the others is not hammered with its retries."""
        back, self._back = self._back, set()
        for endpoint in back:
            last = self._caught_up_at.get(endpoint)
            if last is not None and time.monotonic() - last < CATCH_UP_EVERY_SECONDS:
                continue
            self._caught_up_at[endpoint] = time.monotonic()
            now_ms = epoch_ms(utcnow())
            result = await self._store.deliveries.update_many(
                {"endpoint": endpoint, "state": DeliveryState.PENDING, "nextMs": {"$gt": now_ms}},
                {"$set": {"nextMs": now_ms}},
            )
            log.info(
                "shop_webhook_receiver_back", endpoint=endpoint, made_due=result.modified_count
            )

    async def _flush_delivered(self) -> None:
        if not self._delivered:
            return
        done, self._delivered = self._delivered, []
        try:
            # One round trip for all; each guarded by its generation (a replay since the
            # delivery keeps the delivery pending).
            await self._store.deliveries.bulk_write(
                [
                    UpdateOne(
                        {"_id": _id, "state": DeliveryState.PENDING, "generation": generation},
                        {
                            "$set": {"state": DeliveryState.DELIVERED},
                            "$currentDate": {"finishedAt": True},
                        },
                    )
                    for _id, generation in done
                ],
                ordered=False,
            )
        except PyMongoError:
            self._delivered.extend(done)  # marked at a later round
            raise

    def _chain_done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Unforeseen: logged with its traceback; the deliveries stay pending and are tried
            # again on a later round.
            log.error("outbox_delivery_crashed", exc_info=exc)
        self._wake.set()

    async def _deliver_chain(self, endpoint: str, chain: list[Doc], bodies: dict[str, Doc]) -> None:
        """One session's due deliveries at one URL, in order, stopping at the first failure."""
        try:
            for delivery in chain:
                event = bodies.get(delivery["event"])
                if event is None:
                    # Past retention (the TTL took it): nothing left to send.
                    await self._finish(delivery, DeliveryState.FAILED, "event expired")
                    continue
                if not await self._attempt(endpoint, delivery, event):
                    return
        except PyMongoError as exc:
            # The attempt's outcome could not be stored: it is sent again later (same id).
            log.warning("outbox_store_unavailable", error=str(exc))

    async def _attempt(self, endpoint: str, delivery: Doc, event: Doc) -> bool:
        """Send once; record the outcome; True if delivered."""
        url = self._log.endpoints[endpoint]
        body: bytes = event["body"].encode()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery["event"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._secrets, delivery["event"], timestamp, body),
        }
        assert self._http is not None  # set for as long as the lead runs
        error = ""
        try:
            async with self._http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                ok = 200 <= response.status < 300
                if not ok:
                    error = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if ok:
            if self._failures_in_a_row.pop(endpoint, 0) >= OUTAGE_FAILURES:
                self._back.add(endpoint)
                self._wake.set()
            self._delivered.append((delivery["_id"], int(delivery.get("generation", 0))))
            lag = (utcnow() - _aware(event["at"])).total_seconds()
            self._metrics.delivered.inc()
            self._metrics.lag.observe(max(lag, 0.0))
            return True
        self._failures_in_a_row[endpoint] += 1
        await self._failed(delivery, error)
        return False

    async def _failed(self, delivery: Doc, error: str) -> None:
        attempts = int(delivery.get("attempts", 0)) + 1
        now = utcnow()
        age = (epoch_ms(now) - int(delivery["createdMs"])) / 1000
        s = self._settings
        wait = retry_delay(
            attempts,
            s.shop_webhook_retry_first_seconds,
            s.shop_webhook_retry_max_seconds,
            self._rng,
        )
        if age + wait >= s.shop_webhook_give_up_seconds:
            log.error(
                "shop_webhook_failed",
                event_id=delivery["event"],
                endpoint=delivery["endpoint"],
                attempts=attempts,
                error=error,
            )
            await self._raise_item(delivery, error)
            await self._finish(delivery, DeliveryState.FAILED, error, attempts=attempts)
            self._metrics.failed.inc()
            return
        log.info(
            "shop_webhook_retry",
            event_id=delivery["event"],
            endpoint=delivery["endpoint"],
            attempts=attempts,
            retry_in=round(wait, 3),
            error=error,
        )
        await self._store.deliveries.update_one(
            {"_id": delivery["_id"], "state": DeliveryState.PENDING},
            {
                "$set": {
                    "attempts": attempts,
                    "nextMs": epoch_ms(now + timedelta(seconds=wait)),
                    "lastError": error[:200],
                }
            },
        )
        self._touched.add(delivery["_id"])
        self._metrics.retried.inc()

    async def _raise_item(self, delivery: Doc, error: str) -> None:
        """A delivery given up becomes a ledger item (before it is marked failed: a crash in
        between records the item again, which the ledger's unique key makes one)."""
        event = await self._store.events.find_one({"_id": delivery["event"]}, {"body": 1})
        data = json.loads(event["body"])["data"] if event is not None else {}
        await self._ledger.record(
            NewIssue(
                IssueKind.SHOP_NOT_TOLD,
                int(data.get("orderCode") or 0),
                delivery["_id"],
                int(data.get("amountPaid") or data.get("amount") or 0),
                {"event": delivery["event"], "lastError": error[:200], **data},
                source="dispatcher",
            )
        )

    async def _finish(
        self, delivery: Doc, state: str, error: str, *, attempts: int | None = None
    ) -> None:
        fields: Doc = {
            "state": state,
            "attempts": attempts if attempts is not None else int(delivery.get("attempts", 0)) + 1,
        }
        if error:
            fields["lastError"] = error[:200]
        await self._store.deliveries.update_one(
            {"_id": delivery["_id"], "state": DeliveryState.PENDING},
            {"$set": fields, "$currentDate": {"finishedAt": True}},
        )
        self._touched.add(delivery["_id"])

    async def refresh_stats(self) -> None:
        """The queue's gauges (read by the leader only; others show 0 with `leader` 0)."""
        endpoints = list(self._log.endpoints)
        pending = await self._store.deliveries.count_documents(
            {"state": DeliveryState.PENDING, "endpoint": {"$in": endpoints}}
        )
        oldest = [
            d
            async for d in self._store.deliveries.find(
                {"state": DeliveryState.PENDING, "endpoint": {"$in": endpoints}},
                {"createdMs": 1},
            )
            .sort("createdMs", ASCENDING)
            .limit(1)
        ]
        unrelayed = 0
        for source in self._log.sources:
            unrelayed += await source.count_documents({"outboxPending": {"$gt": 0}})
        self._metrics.pending.set(pending)
        self._metrics.unrelayed.set(unrelayed)
        age = (epoch_ms(utcnow()) - int(oldest[0]["createdMs"])) / 1000 if oldest else 0.0
        self._metrics.oldest_age.set(max(age, 0.0))


def _aware(value: datetime) -> datetime:
    # The client is tz-aware; a naive value is UTC all the same.
    return value if value.tzinfo else value.replace(tzinfo=UTC)
