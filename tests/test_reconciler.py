"""Issue 11: reconciliation with PayOS when a webhook never comes — the real reconciler
against the PayOS simulator (through the unmodified SDK), a real ingest, Redis and MongoDB."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from payos import AsyncPayOS
from payos.types import CreatePaymentLinkRequest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from session_api.metrics import SessionMetrics
from session_api.reconciler import (
    BACKOFF_SECONDS,
    HOURLY,
    Reconciler,
    checks_over_life,
    next_check,
)
from shared.cache import StatusCache
from shared.ledger import Ledger
from shared.model import StreamStatus, utcnow
from shared.mongo import NO_CHECK, Store
from shared.payments import Payments
from shared.payos_client import payos_client
from shared.settings import Settings
from shared.tasks import Supervisor
from tests.helpers import add_session, simulator_to_ingest, subscribed

AFTER = 1.0
INTERVAL = 0.3


@dataclass
class World:
    sim_url: str
    http: aiohttp.ClientSession
    payos: AsyncPayOS
    redis: Redis
    store: Store
    settings: Settings

    async def faults(self, **faults: Any) -> None:
        async with self.http.post(f"{self.sim_url}/sim/faults", json=faults) as resp:
            assert resp.status == 200

    async def session_with_link(self, amount: int = 20_000, **fields: Any) -> dict[str, Any]:
        """A session as session-api makes it, created AFTER seconds ago, with its link."""
        fields.setdefault("createdAt", utcnow() - timedelta(seconds=AFTER))
        session = await add_session(self.store, amount=amount, **fields)
        await self.payos.payment_requests.create(
            CreatePaymentLinkRequest(
                order_code=session["orderCode"],
                amount=amount,
                description="NAPTIEN",
                cancel_url="http://127.0.0.1/",
                return_url="http://127.0.0.1/",
                expired_at=int(session["expiresAt"].timestamp()),
            )
        )
        return session

    async def pay(self, order_code: int, **body: Any) -> dict[str, Any]:
        async with self.http.post(f"{self.sim_url}/sim/pay/{order_code}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            result: dict[str, Any] = await resp.json()
            return result

    async def calls(self, order_code: int) -> int:
        async with self.http.get(f"{self.sim_url}/sim/calls") as resp:
            return int((await resp.json())["get"].get(str(order_code), 0))

    def reconciler(self, **overrides: Any) -> Reconciler:
        options: dict[str, Any] = {
            "after_seconds": AFTER,
            "max_per_second": 50.0,
            "interval_seconds": INTERVAL,
            "lease_seconds": 3.0,
            "payos_timeout": 0.5,
            "retry_seconds": 0.5,
            **overrides,
        }
        return Reconciler(
            store=self.store,
            cache=StatusCache(self.redis),
            redis=self.redis,
            payos=self.payos,
            payments=Payments(self.store, Ledger(self.store), grace_seconds=900),
            metrics=SessionMetrics.create(CollectorRegistry()),
            **options,
        )


@pytest.fixture
async def world(settings: Settings, store: Store) -> AsyncIterator[World]:
    async with simulator_to_ingest(settings) as (url, _ingest_url, http):
        client = payos_client(
            Settings.from_env(
                {},
                payos_checksum_key=settings.payos_checksum_key,
                payos_base_url=url,
                payos_timeout_seconds=0.5,
            )
        )
        redis = Redis.from_url(settings.redis_url)
        yield World(url, http, client, redis, store, settings)
        await redis.aclose()
        await client.aclose()


@contextlib.asynccontextmanager
async def running(reconciler: Reconciler) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor()
    reconciler.start(supervisor)
    try:
        yield supervisor
    finally:
        await reconciler.stop()
        await supervisor.stop()


async def test_a_payment_whose_every_webhook_was_dropped_reaches_the_waiting_stream_within_after_plus_one_cycle(  # noqa: E501
    world: World,
) -> None:
    session = await world.session_with_link(createdAt=utcnow())
    await world.faults(dropAllDeliveries=True)
    paid = await world.pay(session["orderCode"])
    assert paid["delivered"] is False
    async with subscribed(world.settings.redis_url, session["uuid"]) as waiting:
        started = time.monotonic()
        async with running(world.reconciler()):
            [event] = await waiting.wait_for(1, timeout=AFTER + INTERVAL + 2)
            took = time.monotonic() - started
    assert (event.status, event.amount_paid) == (StreamStatus.DONE, 20_000)
    assert took <= AFTER + INTERVAL + 1.5
    stored = await world.store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert (stored["status"], stored["references"]) == ("completed", [paid["reference"]])
    assert stored["checkAt"] == NO_CHECK


async def test_the_delayed_webhook_arriving_after_reconciliation_is_a_duplicate(
    world: World,
) -> None:
    session = await world.session_with_link()
    await world.faults(dropAllDeliveries=True)
    await world.pay(session["orderCode"])
    stats = await world.reconciler().cycle()
    assert (stats.checked, stats.recovered) == (1, 1)
    before = await world.store.sessions.find_one({"uuid": session["uuid"]})
    await world.faults()
    async with subscribed(world.settings.redis_url, session["uuid"]) as waiting:
        async with world.http.post(f"{world.sim_url}/sim/deliveries/redeliver") as resp:
            assert await resp.json() == {"attempted": 1, "delivered": 1}
        assert await waiting.settle() == []
    after = await world.store.sessions.find_one({"uuid": session["uuid"]})
    assert before is not None and after == before
    assert after["amountPaid"] == 20_000 and after["status"] == "completed"
    assert await world.store.issues.count_documents({}) == 0


async def test_a_partial_payment_is_counted_and_the_session_asked_again_later(
    world: World,
) -> None:
    session = await world.session_with_link(amount=30_000)
    await world.faults(dropAllDeliveries=True)
    await world.pay(session["orderCode"], amount=10_000)
    reconciler = world.reconciler()
    first = await reconciler.cycle()
    assert (first.checked, first.recovered) == (1, 1)
    # Checked again only when its backoff says so, and the counted payment not twice.
    assert (await reconciler.cycle()).checked == 0
    stored = await world.store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert (stored["status"], stored["amountPaid"], stored["reconcileChecks"]) == (
        "pending",
        10_000,
        1,
    )
    assert stored["checkAt"] == pytest.approx(time.time() + BACKOFF_SECONDS[0], abs=5)


async def test_a_session_younger_than_reconcile_after_is_not_asked_about(world: World) -> None:
    session = await world.session_with_link(createdAt=utcnow())
    stats = await world.reconciler(after_seconds=60).cycle()
    assert stats.checked == 0
    assert await world.calls(session["orderCode"]) == 0


@pytest.mark.parametrize(
    "faults", [{"mode": "down"}, {"mode": "slow", "delaySeconds": 2}], ids=["down", "slow"]
)
async def test_payos_failing_during_reconciliation_is_retried_later(
    world: World, faults: dict[str, Any]
) -> None:
    session = await world.session_with_link()
    await world.faults(dropAllDeliveries=True)
    await world.pay(session["orderCode"])
    await world.faults(dropAllDeliveries=True, **faults)
    reconciler = world.reconciler()
    failed = await reconciler.cycle()
    assert (failed.checked, failed.errors) == (0, 1)
    stored = await world.store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["status"] == "pending"
    assert "reconcileChecks" not in stored
    await world.faults(dropAllDeliveries=True)
    async with asyncio.timeout(5):
        while (await reconciler.cycle()).checked == 0:
            await asyncio.sleep(0.1)
    done = await world.store.sessions.find_one({"uuid": session["uuid"]})
    assert done is not None and done["status"] == "completed"


async def test_a_payos_error_ends_the_cycle_instead_of_asking_about_every_session(
    world: World,
) -> None:
    sessions = [await world.session_with_link() for _ in range(5)]
    await world.faults(mode="down")
    stats = await world.reconciler().cycle()
    assert (stats.checked, stats.errors) == (0, 1)
    assert sum([await world.calls(s["orderCode"]) for s in sessions]) == 0


async def test_the_rate_cap_paces_payos_calls(world: World) -> None:
    for _ in range(6):
        await world.session_with_link()
    reconciler = world.reconciler(max_per_second=10.0, interval_seconds=1.0)
    started = time.monotonic()
    stats = await reconciler.cycle()
    took = time.monotonic() - started
    assert stats.checked == 6
    # Six calls at 10/s: five gaps of 0.1 s at least.
    assert took >= 0.5


async def test_a_payment_made_before_expiry_found_after_it_completes_the_expired_session(
    world: World,
) -> None:
    session = await world.session_with_link(expiresAt=utcnow() + timedelta(seconds=3))
    await world.faults(dropAllDeliveries=True)
    await world.pay(session["orderCode"])
    await asyncio.sleep(3.2)
    await world.store.sessions.update_one(
        {"uuid": session["uuid"]}, {"$set": {"status": "expired"}, "$inc": {"version": 1}}
    )
    stats = await world.reconciler().cycle()
    assert stats.recovered == 1
    stored = await world.store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["status"] == "completed"


async def test_one_process_holds_the_lease_and_another_takes_over_when_it_stops_renewing(
    world: World,
) -> None:
    first, second = world.reconciler(lease_seconds=1.0), world.reconciler(lease_seconds=1.0)
    async with running(first):
        async with asyncio.timeout(3):
            while not first.holding:
                await asyncio.sleep(0.05)
        async with running(second):
            await asyncio.sleep(1.5)
            assert (first.holding, second.holding) == (True, False)
            # The holder dies without releasing: its lease runs out, the other takes over.
            await first.stop()
            await world.redis.set("paypush:reconciler:lease", first.lease.token, px=1000)
            started = time.monotonic()
            async with asyncio.timeout(3):
                while not second.holding:
                    await asyncio.sleep(0.05)
            assert time.monotonic() - started <= 1.0 + 1.0 / 3 + 0.5


def test_the_backoff_asks_at_2_then_2_5_15_minutes_then_hourly_then_once_after_expiry() -> None:
    day = 24 * 3600.0
    created = time.time()
    session = {"expiresAt": utcnow() + timedelta(seconds=day)}
    at, checks = created + 120, [created + 120]
    for n in range(1, 40):
        at = next_check(session, n, at, after=120)
        if at == NO_CHECK:
            break
        checks.append(at)
    gaps = [round(b - a) for a, b in itertools.pairwise(checks)]
    assert gaps[:3] == [120, 300, 900]
    assert set(gaps[3:-1]) == {HOURLY}
    assert checks[-1] == pytest.approx(session["expiresAt"].timestamp() + 60, abs=1)
    assert checks_over_life(after=120, life=day) == len(checks)
