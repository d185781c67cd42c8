"""The shop's signed payment events (issue 17): the outbox written with the change, the
dispatcher under its lease, Standard Webhooks delivery verified by the `standardwebhooks`
library, retries, order per session, the pull API and replay, and the start-up refusals.

The delivery tests run webhook-ingest and session-api as real processes (as deployed), the
shop as a real HTTP server in the test (tests/shop.py), over the suite's Redis and MongoDB.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook

from devstack.servers import Process, free_port, redis_server
from devstack.system import Backends, service_process, start_ready, wait_ready
from session_api import create_app as create_api
from session_api.cleanup import run_cleanup
from session_api.dispatcher import retry_delay, schedule, sign
from session_api.event_log import EventLog
from shared import outbox
from shared.cache import StatusCache
from shared.ledger import IssueKind, Ledger, NewIssue
from shared.model import utcnow
from shared.mongo import Store
from shared.settings import Settings, SettingsError
from tests.helpers import add_session, signed_webhook
from tests.shop import ShopReceiver, new_secret, running_receiver

Client = TestClient[Any, Any]
SHOP_TOKEN = "shop-api-token-for-tests"
ADMIN = {"Authorization": "Bearer dev-admin-token"}
SHOP = {"Authorization": f"Bearer {SHOP_TOKEN}"}


def shop_settings(settings: Settings, receiver: ShopReceiver | None, **overrides: Any) -> Settings:
    """Quick retries, a short timeout and lease, so faults play out in seconds."""
    fields: dict[str, Any] = {
        "shop_api_token": SHOP_TOKEN,
        "shop_webhook_timeout_seconds": 0.5,
        "shop_webhook_retry_first_seconds": 0.05,
        "shop_webhook_retry_max_seconds": 0.3,
        "outbox_poll_seconds": 0.05,
        "outbox_lease_seconds": 1.5,
        "log_level": "WARNING",
    }
    if receiver is not None:
        fields["shop_webhook_url"] = (receiver.url,)
        fields["shop_webhook_secret"] = (receiver.secret,)
    fields.update(overrides)
    return dataclasses.replace(settings, **fields)


@pytest.fixture
async def receiver() -> AsyncIterator[ShopReceiver]:
    async with running_receiver() as r:
        yield r


class ServiceProcesses:
    """webhook-ingest and session-api processes over the suite's Redis and MongoDB."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[Process] = []

    async def start(self, service: str, **env: str) -> Process:
        """One more process of `service` ("webhook-ingest", "session-api"), once ready."""
        label = f"{service}-{len(self.procs)}"
        proc = service_process(self.settings, service, self.log_dir, label=label, env=env)
        self.procs.append(proc)
        return await start_ready(proc, 15)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.running:
                proc.stop()


@pytest.fixture
def system_factory(tmp_path: Path) -> Iterator[Callable[[Settings], ServiceProcesses]]:
    made: list[ServiceProcesses] = []

    def make(settings: Settings) -> ServiceProcesses:
        made.append(ServiceProcesses(settings, tmp_path))
        return made[-1]

    yield make
    for system in made:
        system.stop()


async def pay(ingest: Process, order_code: int, amount: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.post(
            f"http://127.0.0.1:{ingest.port}/api/webhooks",
            json=signed_webhook(order_code, amount),
        )
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def metric(proc: Process, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"http://127.0.0.1:{proc.port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _now(value: bool) -> bool:
    return value


async def all_delivered(store: Store) -> bool:
    return await store.deliveries.count_documents({"state": {"$ne": "delivered"}}) == 0 and (
        await store.sessions.count_documents({outbox.OUTBOX_PENDING: {"$gt": 0}}) == 0
    )


# --- a payment reaches the shop ---------------------------------------------------------------


async def test_a_payment_reaches_the_shop_once_and_verifies_with_the_standardwebhooks_library(
    settings: Settings, store: Store, receiver: ShopReceiver, system_factory: Any
) -> None:
    system = system_factory(shop_settings(settings, receiver))
    ingest = await system.start("webhook-ingest")
    await system.start("session-api")
    session = await add_session(store, amount=50_000, account="shop-user-1")
    assert (await pay(ingest, session["orderCode"], 50_000))["outcome"] == "completed"
    await receiver.wait_for(1, type_="payment.completed")
    await wait_until(lambda: all_delivered(store), 10, "every delivery recorded")
    assert receiver.rejected_signatures == 0
    [arrival] = receiver.accepted
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert arrival.type == "payment.completed"
    assert arrival.id == outbox.event_id(session["uuid"], "payment.completed")
    assert arrival.data["uuid"] == session["uuid"]
    assert arrival.data["orderCode"] == session["orderCode"]
    assert arrival.data["accountNumber"] == "shop-user-1"
    assert (arrival.data["amount"], arrival.data["amountPaid"]) == (50_000, 50_000)
    assert arrival.data["references"] == stored["references"]
    assert arrival.data["version"] == stored["version"]
    assert receiver.balance == {"shop-user-1": 50_000}


async def test_partial_then_completed_arrive_in_order_once_each_after_the_receiver_answered_500(
    settings: Settings, store: Store, receiver: ShopReceiver, system_factory: Any
) -> None:
    system = system_factory(shop_settings(settings, receiver))
    ingest = await system.start("webhook-ingest")
    await system.start("session-api")
    receiver.mode = "fail"
    session = await add_session(store, amount=30_000)
    assert (await pay(ingest, session["orderCode"], 10_000))["outcome"] == "partial"
    assert (await pay(ingest, session["orderCode"], 20_000))["outcome"] == "completed"
    await wait_until(lambda: _now(len(receiver.requests) >= 3), 10, "retries")
    receiver.mode = "ok"
    await receiver.wait_for(2)
    await wait_until(lambda: all_delivered(store), 10, "every delivery recorded")
    # Every failed attempt was of the partial: the completed never overtook it.
    assert all(r.type == "payment.partial" for r in receiver.requests if r.answered == 500)
    assert [a.type for a in receiver.of_session(session["uuid"])] == [
        "payment.partial",
        "payment.completed",
    ]
    assert all(n == 1 for n in receiver.accepted_ids().values())


async def test_a_receiver_that_is_down_gets_the_event_once_it_is_back(
    settings: Settings, store: Store, system_factory: Any
) -> None:
    receiver = ShopReceiver(new_secret())  # not started: its port refuses connections
    system = system_factory(shop_settings(settings, receiver))
    ingest = await system.start("webhook-ingest")
    api = await system.start("session-api")
    session = await add_session(store, amount=20_000)
    await pay(ingest, session["orderCode"], 20_000)
    await wait_until(
        lambda: _at_least(metric(api, "paypush_outbox_retried"), 2), 10, "failed attempts"
    )
    await receiver.start()
    try:
        await receiver.wait_for(1)
        assert receiver.accepted[0].id == outbox.event_id(session["uuid"], "payment.completed")
    finally:
        await receiver.stop()


async def test_a_receiver_back_after_an_outage_gets_the_backlog_without_waiting_for_retries(
    settings: Settings, store: Store, receiver: ShopReceiver, system_factory: Any
) -> None:
    """Retries are a minute away; the receiver's first success after the outage (a new
    event) makes every waiting delivery due at once."""
    system = system_factory(
        shop_settings(
            settings,
            receiver,
            shop_webhook_retry_first_seconds=60.0,
            shop_webhook_retry_max_seconds=120.0,
        )
    )
    ingest = await system.start("webhook-ingest")
    api = await system.start("session-api")
    receiver.mode = "fail"
    during = [await add_session(store, amount=10_000) for _ in range(4)]
    for session in during:
        await pay(ingest, session["orderCode"], 10_000)
    await wait_until(
        lambda: _at_least(metric(api, "paypush_outbox_retried"), 4), 10, "one failure each"
    )
    receiver.mode = "ok"
    back_at = time.monotonic()
    after = await add_session(store, amount=10_000)
    await pay(ingest, after["orderCode"], 10_000)
    await receiver.wait_for(5, timeout=20)
    caught_up = time.monotonic() - back_at
    # Well within the first retry's delay (60 s ± 20 %): not the retries, the catch-up.
    assert caught_up < 30, caught_up
    assert {a.data["uuid"] for a in receiver.accepted} == {s["uuid"] for s in [*during, after]}
    assert all(n == 1 for n in receiver.accepted_ids().values())


async def _at_least(value: Awaitable[float], minimum: float) -> bool:
    return await value >= minimum


async def test_a_receiver_slower_than_the_timeout_is_retried_and_credits_once(
    settings: Settings, store: Store, receiver: ShopReceiver, system_factory: Any
) -> None:
    system = system_factory(shop_settings(settings, receiver))
    ingest = await system.start("webhook-ingest")
    await system.start("session-api")
    receiver.mode, receiver.slow_seconds = "slow", 1.0  # twice the 0.5 s timeout
    session = await add_session(store, amount=20_000, account="slow-shop")
    await pay(ingest, session["orderCode"], 20_000)
    await wait_until(lambda: _now(len(receiver.requests) >= 2), 10, "a retry")
    receiver.mode = "ok"
    await wait_until(lambda: all_delivered(store), 15, "the delivery recorded")
    ids = {r.id for r in receiver.requests}
    assert ids == {outbox.event_id(session["uuid"], "payment.completed")}
    # The slow answers still arrived (after the dispatcher gave up on them): several 200s for
    # one id, and the balance credited once.
    assert receiver.balance == {"slow-shop": 20_000}


# --- crashes -----------------------------------------------------------------------------------


async def leader_of(procs: list[Process]) -> list[Process]:
    return [p for p in procs if p.running and await metric(p, "paypush_outbox_leader") == 1]


async def test_two_session_api_processes_dispatch_one_at_a_time(
    settings: Settings, store: Store, receiver: ShopReceiver, system_factory: Any
) -> None:
    system = system_factory(shop_settings(settings, receiver))
    ingest = await system.start("webhook-ingest")
    apis = [await system.start("session-api"), await system.start("session-api")]
    sessions = [await add_session(store, amount=10_000) for _ in range(10)]

    async def one_leader() -> bool:
        return len(await leader_of(apis)) == 1

    await wait_until(one_leader, 10, "a leader")
    for session in sessions:
        await pay(ingest, session["orderCode"], 10_000)
        leaders = await leader_of(apis)
        assert len(leaders) == 1
    await receiver.wait_for(10)
    delivered = [await metric(p, "paypush_outbox_delivered") for p in apis]
    assert sorted(delivered) == [0, 10]


async def test_the_dispatcher_killed_mid_delivery_its_successor_delivers_the_same_id(
    settings: Settings, store: Store, receiver: ShopReceiver, system_factory: Any
) -> None:
    system = system_factory(shop_settings(settings, receiver))
    ingest = await system.start("webhook-ingest")
    apis = [await system.start("session-api"), await system.start("session-api")]

    async def one_leader() -> bool:
        return len(await leader_of(apis)) == 1

    await wait_until(one_leader, 10, "a leader")
    [leader] = await leader_of(apis)
    receiver.mode = "hang"
    session = await add_session(store, amount=10_000)
    await pay(ingest, session["orderCode"], 10_000)
    async with asyncio.timeout(10):
        await receiver.hanging.wait()
    leader.kill()  # SIGKILL while the request is in flight: no state was written
    receiver.mode = "ok"
    receiver.release.set()
    [survivor] = [p for p in apis if p is not leader]
    # The survivor takes the lease once the dead holder's has run out, and sends it again.
    await wait_until(
        lambda: _at_least(metric(survivor, "paypush_outbox_delivered"), 1), 15, "redelivery"
    )
    assert await metric(survivor, "paypush_outbox_leader") == 1
    expected = outbox.event_id(session["uuid"], "payment.completed")
    assert {r.id for r in receiver.requests} == {expected}
    assert len(receiver.requests) == 2  # at least once: the killed attempt and the new one


async def test_the_ingest_killed_right_after_completing_the_event_still_arrives(
    settings: Settings,
    store: Store,
    receiver: ShopReceiver,
    servers: Backends,
    system_factory: Any,
) -> None:
    # The ingest's own Redis is frozen: it completes the session in MongoDB, then hangs on
    # the cache write, where it is killed — it never answered PayOS nor published anything.
    frozen = redis_server(free_port(), servers.dir, name="redis-frozen")
    await asyncio.to_thread(frozen.start)
    try:
        system = system_factory(shop_settings(settings, receiver))
        await system.start("session-api")
        ingest = await system.start(
            "webhook-ingest", REDIS_URL=f"redis://127.0.0.1:{frozen.port}/0"
        )
        session = await add_session(store, amount=10_000)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            posting = asyncio.create_task(pay(ingest, session["orderCode"], 10_000))

            async def completed() -> bool:
                doc = await store.sessions.find_one({"uuid": session["uuid"]})
                return doc is not None and doc["status"] == "completed"

            await wait_until(completed, 10, "the session completed")
            ingest.kill()
            with pytest.raises((httpx.HTTPError, AssertionError)):
                await posting
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        await receiver.wait_for(1)
        assert receiver.accepted[0].id == outbox.event_id(session["uuid"], "payment.completed")
    finally:
        frozen.stop()


# --- the outbox itself (in process) -----------------------------------------------------------


async def test_the_completing_update_holds_its_event_with_the_version_it_leaves(
    settings: Settings, store: Store, system_factory: Any
) -> None:
    system = system_factory(shop_settings(settings, None))
    ingest = await system.start("webhook-ingest")
    session = await add_session(store, amount=10_000)
    await pay(ingest, session["orderCode"], 10_000)
    doc = await store.sessions.find_one({"uuid": session["uuid"]})
    assert doc is not None and doc[outbox.OUTBOX_PENDING] == 1
    [raw] = doc[outbox.OUTBOX]
    event = json.loads(raw)
    assert event["type"] == "payment.completed"
    assert event["data"]["version"] == doc["version"] == 2
    assert event["data"]["status"] == "completed"


async def test_cleanup_writes_session_expired_into_the_outbox_with_the_expiry(
    settings: Settings, store: Store
) -> None:
    # Created over 24 h ago (a past `expiresAt` may be taken by the TTL monitor first).
    session = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    redis = Redis.from_url(settings.redis_url)
    redis_cache = StatusCache(redis)
    result = await run_cleanup(store, redis_cache)
    assert result.expired == 1
    doc = await store.sessions.find_one({"uuid": session["uuid"]})
    assert doc is not None and doc["status"] == "expired"
    [raw] = doc[outbox.OUTBOX]
    event = json.loads(raw)
    assert event["id"] == outbox.event_id(session["uuid"], "session.expired")
    assert (event["type"], event["data"]["version"]) == ("session.expired", doc["version"])
    # Not deleted while its event waits for the dispatcher, even once past expiry.
    await run_cleanup(store, redis_cache, now=utcnow() + timedelta(days=2))
    await redis.aclose()
    assert await store.sessions.find_one({"uuid": session["uuid"]}) is not None


async def test_a_relay_repeated_after_dying_before_emptying_the_outbox_appends_nothing_twice(
    settings: Settings, store: Store
) -> None:
    session = await add_session(store)
    entry = outbox.session_entry(outbox.EventType.EXPIRED, {**session, "status": "expired"})
    await store.sessions.update_one(
        {"uuid": session["uuid"]}, outbox.with_entry({"$set": {"x": 1}}, entry)
    )
    log = EventLog(store, urls=["http://shop.example/hook"], retention_seconds=3600)
    doc = await store.sessions.find_one({"uuid": session["uuid"]})
    assert doc is not None
    # A relay that appended, then died before emptying the outbox: the same entry again.
    await log._append(store.sessions, [{**doc, outbox.OUTBOX_PENDING: -1}])
    assert await log.relay() == 1
    assert await store.events.count_documents({}) == 1
    assert await store.deliveries.count_documents({}) == 1
    [event] = [e async for e in store.events.find({})]
    [delivery] = [d async for d in store.deliveries.find({})]
    assert delivery["seq"] == event["seq"]
    doc = await store.sessions.find_one({"uuid": session["uuid"]})
    assert doc is not None and (doc[outbox.OUTBOX], doc[outbox.OUTBOX_PENDING]) == ([], 0)


async def test_a_sequence_counter_behind_the_log_drops_no_event(
    settings: Settings, store: Store
) -> None:
    """The counter's document lost (or restored from an older backup) while the log stays:
    the numbers it hands out are taken. The relay moves past the log's last number; an
    event refused for its number is never taken for one appended before and dropped."""
    for seq in (1, 2, 3):
        await store.events.insert_one({"_id": f"evt_before_{seq}", "seq": seq})
    session = await add_session(store)
    entries = [
        outbox.session_entry(outbox.EventType.PARTIAL, session, reference=ref)
        for ref in ("FT1", "FT2")
    ]
    await store.sessions.update_one(
        {"uuid": session["uuid"]}, outbox.with_entry({"$set": {"x": 1}}, *entries)
    )
    log = EventLog(store, urls=[], retention_seconds=3600)
    assert await log.relay() == 2
    relayed = [e async for e in store.events.find({"session": session["uuid"]}).sort("seq", 1)]
    assert [e["_id"] for e in relayed] == [json.loads(raw)["id"] for raw in entries]
    assert [e["seq"] for e in relayed] == [4, 5]
    doc = await store.sessions.find_one({"uuid": session["uuid"]})
    assert doc is not None and (doc[outbox.OUTBOX], doc[outbox.OUTBOX_PENDING]) == ([], 0)


def test_signatures_verify_with_the_standardwebhooks_library_under_either_secret_in_rotation() -> (
    None
):
    new, old = new_secret(), new_secret()
    keys = [base64.b64decode(s.removeprefix("whsec_")) for s in (new, old)]
    body = b'{"id":"evt_1","type":"payment.completed"}'
    timestamp = int(time.time())
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(keys, "evt_1", timestamp, body),
    }
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (new, old):
        assert Webhook(secret).verify(body, headers)["type"] == "payment.completed"


def test_retry_delays_grow_exponentially_with_jitter_and_give_up_after_three_days() -> None:
    rng = random.Random(7)
    delays = [retry_delay(n, 5.0, 6 * 3600.0, rng) for n in range(1, 16)]
    assert 4.0 <= delays[0] <= 6.0 and 8.0 <= delays[1] <= 12.0
    assert max(delays) <= 6 * 3600.0 * 1.2
    times = schedule(Settings.from_env({}))
    assert times[-1] < 3 * 86400 and len(times) > 10


# --- pull API and replay ----------------------------------------------------------------------


@pytest.fixture
async def api(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, receiver: ShopReceiver
) -> Client:
    client = await aiohttp_client(create_api(shop_settings(settings, receiver)))
    await wait_ready(str(client.make_url("")), 5)
    return client


async def expire_sessions(store: Store, settings: Settings, n: int) -> list[dict[str, Any]]:
    sessions = [
        await add_session(store, createdAt=utcnow() - timedelta(hours=25)) for _ in range(n)
    ]
    redis = Redis.from_url(settings.redis_url)
    try:
        await run_cleanup(store, StatusCache(redis))
    finally:
        await redis.aclose()
    return sessions


async def relayed(store: Store, n: int) -> None:
    """Until the app's dispatcher has moved `n` events into the log."""

    async def done() -> bool:
        return await store.events.count_documents({}) >= n

    await wait_until(done, 10, f"{n} events in the log")


async def test_the_pull_api_pages_through_events_in_order_with_its_cursor(
    api: Client, store: Store, settings: Settings
) -> None:
    await expire_sessions(store, settings, 5)
    await relayed(store, 5)
    resp = await api.get("/api/events?limit=2", headers=SHOP)
    assert resp.status == 200
    first = await resp.json()
    assert first["hasMore"] is True and len(first["events"]) == 2
    seen = [e["id"] for e in first["events"]]
    cursor = first["next"]
    while True:
        page = await (await api.get(f"/api/events?after={cursor}&limit=2", headers=SHOP)).json()
        seen += [e["id"] for e in page["events"]]
        cursor = page["next"]
        if not page["hasMore"]:
            break
    assert len(seen) == len(set(seen)) == 5
    all_events = await (await api.get("/api/events", headers=SHOP)).json()
    assert [e["id"] for e in all_events["events"]] == seen
    assert all(e["type"] == "session.expired" for e in all_events["events"])


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("", {}, 401),
        ("", {"Authorization": "Bearer wrong"}, 401),
        ("", ADMIN, 401),
        ("?after=abc", SHOP, 400),
        ("?after=-1", SHOP, 400),
        ("?after=1" + "0" * 30, SHOP, 400),
        ("?limit=0", SHOP, 400),
        ("?limit=1001", SHOP, 400),
        ("?limit=x", SHOP, 400),
        ("?cursor=1", SHOP, 400),
    ],
)
async def test_bad_pull_requests_are_4xx_with_a_json_error(
    api: Client, query: str, headers: dict[str, str], status: int
) -> None:
    resp = await api.get(f"/api/events{query}", headers=headers)
    assert resp.status == status
    body = await resp.json()
    assert body["success"] is False and body["error"]


async def test_the_pull_api_is_off_without_a_shop_token(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings
) -> None:
    client = await aiohttp_client(create_api(shop_settings(settings, None, shop_api_token="")))
    resp = await client.get("/api/events", headers={"Authorization": "Bearer "})
    assert resp.status == 404


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ({"id": outbox.event_id("x")}, {}, 401),
        ({"id": outbox.event_id("x")}, SHOP, 401),
        (b"{not json", ADMIN, 400),
        ([], ADMIN, 400),
        ({}, ADMIN, 400),
        ({"id": "evt_nope"}, ADMIN, 400),
        ({"id": outbox.event_id("x"), "from": "2026-01-01T00:00:00Z"}, ADMIN, 400),
        ({"from": "2026-01-01T00:00:00Z"}, ADMIN, 400),
        ({"from": "yesterday", "to": "2026-01-01T00:00:00Z"}, ADMIN, 400),
        ({"from": "2026-01-01T00:00:00", "to": "2026-01-02T00:00:00"}, ADMIN, 400),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, ADMIN, 400),
        ({"id": outbox.event_id("x"), "extra": 1}, ADMIN, 400),
        ({"id": outbox.event_id("unknown")}, ADMIN, 404),
    ],
)
async def test_bad_replay_requests_are_4xx_and_change_nothing(
    api: Client, store: Store, settings: Settings, body: Any, headers: dict[str, str], status: int
) -> None:
    await expire_sessions(store, settings, 1)
    await relayed(store, 1)
    await wait_until(lambda: all_delivered(store), 10, "the delivery done")
    before = [d async for d in store.deliveries.find({}, {"nextMs": 0})]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await api.post("/api/events/replay", data=raw, headers=headers)
    assert resp.status == status
    assert (await resp.json())["success"] is False
    assert [d async for d in store.deliveries.find({}, {"nextMs": 0})] == before


async def test_replay_of_one_event_delivers_it_again_with_the_same_id(
    api: Client, store: Store, settings: Settings, receiver: ShopReceiver
) -> None:
    [session] = await expire_sessions(store, settings, 1)
    expected = outbox.event_id(session["uuid"], "session.expired")
    await receiver.wait_for(1)
    resp = await api.post("/api/events/replay", json={"id": expected}, headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["replayed"] == 1
    async with asyncio.timeout(10):
        while len(receiver.accepted) < 2:
            await asyncio.sleep(0.05)
    assert [a.id for a in receiver.accepted] == [expected, expected]


async def test_replay_of_a_time_range_delivers_every_event_in_it(
    api: Client, store: Store, settings: Settings, receiver: ShopReceiver
) -> None:
    await expire_sessions(store, settings, 3)
    await receiver.wait_for(3)
    now = utcnow()
    body = {
        "from": (now - timedelta(minutes=5)).isoformat(),
        "to": (now + timedelta(minutes=1)).isoformat(),
    }
    resp = await api.post("/api/events/replay", json=body, headers=ADMIN)
    assert (await resp.json())["replayed"] == 3
    async with asyncio.timeout(10):
        while len(receiver.accepted) < 6:
            await asyncio.sleep(0.05)
    assert set(receiver.accepted_ids().values()) == {2}


async def test_replay_without_a_receiver_url_is_409(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, store: Store
) -> None:
    client = await aiohttp_client(create_api(shop_settings(settings, None)))
    [session] = await expire_sessions(store, settings, 1)
    await relayed(store, 1)
    event = outbox.event_id(session["uuid"], "session.expired")
    resp = await client.post("/api/events/replay", json={"id": event}, headers=ADMIN)
    assert resp.status == 409


# --- start-up refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8081/api/webhooks",
        "http://localhost:8083/api/events",
        "http://127.0.0.1:8082/",
    ],
)
def test_a_shop_url_pointing_at_our_own_services_is_refused(url: str) -> None:
    with pytest.raises(SettingsError, match="points at one of our services"):
        Settings.from_env({"SHOP_WEBHOOK_URL": url, "SHOP_WEBHOOK_SECRET": new_secret()})


@pytest.mark.parametrize(
    "secret", ["plain-secret", "whsec_not*base64", "whsec_" + base64.b64encode(b"short").decode()]
)
def test_a_malformed_shop_secret_is_refused_without_echoing_it(secret: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {"SHOP_WEBHOOK_URL": "http://shop.example/", "SHOP_WEBHOOK_SECRET": secret}
        )
    assert secret not in str(info.value)


def test_session_api_refuses_to_start_with_a_shop_url_that_is_itself(settings: Settings) -> None:
    port = free_port()
    env = {
        **os.environ,
        **settings.env(),
        "SESSION_API_PORT": str(port),
        "SHOP_WEBHOOK_URL": f"http://127.0.0.1:{port}/api/events",
        "SHOP_WEBHOOK_SECRET": new_secret(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "session_api"], env=env, capture_output=True, timeout=30, text=True
    )
    assert done.returncode != 0
    assert "points at one of our services" in done.stderr + done.stdout


def test_other_processes_hold_neither_the_shop_secret_nor_its_url() -> None:
    env = {"SHOP_WEBHOOK_URL": "http://shop.example/h", "SHOP_WEBHOOK_SECRET": new_secret()}
    ingest = Settings.from_env(env, secrets=("payos_checksum_key",))
    assert (ingest.shop_webhook_url, ingest.shop_webhook_secret) == ((), ())


async def test_a_new_ledger_item_raises_one_payment_needs_attention_event(
    api: Client, store: Store
) -> None:
    ledger = Ledger(store)
    issue = NewIssue(IssueKind.UNKNOWN_ORDER, 987_654, "FT-LOST-1", 5_000, {"amount": 5_000})
    assert await ledger.record(issue)
    assert not await ledger.record(issue)  # the same case again: no second item, no event
    await relayed(store, 1)
    page = await (await api.get("/api/events", headers=SHOP)).json()
    [event] = page["events"]
    assert event["type"] == "payment.needs_attention"
    assert (event["data"]["kind"], event["data"]["orderCode"]) == ("unknown_order", 987_654)
    assert await store.events.count_documents({}) == 1


async def test_a_delivery_refused_past_the_give_up_time_is_failed_and_a_ledger_item(
    aiohttp_client: Callable[..., Awaitable[Client]],
    settings: Settings,
    store: Store,
    receiver: ShopReceiver,
) -> None:
    receiver.mode = "fail"
    quick = shop_settings(settings, receiver, shop_webhook_give_up_seconds=0.5)
    client = await aiohttp_client(create_api(quick))
    [session] = await expire_sessions(store, settings, 1)
    event_id = outbox.event_id(session["uuid"], "session.expired")

    async def failed() -> bool:
        return await store.deliveries.count_documents({"state": "failed"}) == 1

    await wait_until(failed, 10, "the delivery given up")
    [item] = [i async for i in store.issues.find({"kind": "shop_not_told"})]
    assert item["data"]["event"] == event_id and item["status"] == "open"
    assert item["orderCode"] == session["orderCode"]
    assert len(receiver.requests) >= 1
    metrics = await (await client.get("/metrics")).text()
    assert "paypush_outbox_failed_total 1.0" in metrics
    # No `payment.needs_attention` about it: it would go where every attempt failed.
    assert await store.events.count_documents({"type": "payment.needs_attention"}) == 0
