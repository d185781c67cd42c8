"""The console's live figures: open streams and push latency (the gateways), pending sessions
(the stats snapshot of `GET /api/stats`), and payments per minute over the last hour.

Taken at most once a second per process whatever the number of operators watching (the
same single-flight as `/api/stats`), so the console costs the payment path nothing extra.
A "payment" is a successful transaction PayOS delivered (the ingest's `webhooks` record),
counted by the minute it arrived.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from pymongo.errors import PyMongoError

from shared.model import utcnow
from shared.mongo import Store
from shared.singleflight import SingleFlight

from ..stats import StatsSnapshot
from .gateway import GatewayFigures, GatewayScraper

log = structlog.get_logger(__name__)

MAX_AGE_SECONDS = 1.0
MINUTES = 60


@dataclass(frozen=True, slots=True)
class Overview:
    gateways: GatewayFigures
    pending_sessions: int | None
    # Payments in each of the last MINUTES minutes, oldest first, the running minute last;
    # None when MongoDB could not say.
    per_minute: tuple[int, ...] | None
    # The start of the running minute (UTC): the last bar's.
    last_minute: datetime

    @property
    def payments_last_hour(self) -> int | None:
        return None if self.per_minute is None else sum(self.per_minute)


def minute_of(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


def per_minute(times: list[datetime], last_minute: datetime) -> tuple[int, ...]:
    """How many of `times` fall in each of the MINUTES minutes ending with `last_minute`'s."""
    first = last_minute - timedelta(minutes=MINUTES - 1)
    counts = [0] * MINUTES
    for when in times:
        index = int((when - first).total_seconds() // 60)
        if 0 <= index < MINUTES:
            counts[index] += 1
    return tuple(counts)


class OverviewSnapshot:
    def __init__(self, store: Store, stats: StatsSnapshot, gateways: GatewayScraper) -> None:
        self._store = store
        self._stats = stats
        self._gateways = gateways
        self._latest: Overview | None = None
        self._taken = 0.0
        self._taking: SingleFlight[str, Overview] = SingleFlight("admin-overview")

    async def get(self) -> Overview:
        latest = self._latest
        if latest is not None and time.monotonic() - self._taken < MAX_AGE_SECONDS:
            return latest
        return await self._taking.run("overview", self._take)

    async def _take(self) -> Overview:
        last_minute = minute_of(utcnow())
        gateways, stats, minutes = await asyncio.gather(
            self._gateways.figures(), self._stats.get(), self._per_minute(last_minute)
        )
        overview = Overview(gateways, stats.pending_sessions, minutes, last_minute)
        self._latest, self._taken = overview, time.monotonic()
        return overview

    async def _per_minute(self, last_minute: datetime) -> tuple[int, ...] | None:
        since = last_minute - timedelta(minutes=MINUTES - 1)
        try:
            cursor = self._store.webhooks.find(
                {"receivedAt": {"$gte": since}, "success": True}, {"_id": 0, "receivedAt": 1}
            )
            times = [doc["receivedAt"] async for doc in cursor]
        except PyMongoError as exc:
            log.warning("admin_payments_unavailable", error=str(exc))
            return None
        return per_minute([t for t in times if isinstance(t, datetime)], last_minute)
