"""Replicas for real: two of each service behind Debian's nginx with the deploy configuration.

One system for the module (`devstack.replicas`): its own redis-server and MongoDB stand-in,
the PayOS simulator delivering webhooks to nginx, two each of webhook-ingest, stream-gateway
and session-api. Browsers are `devstack.sse.EventSourceClient`s (reconnecting with
`Last-Event-ID`, as EventSource does), all through nginx.

The gateway-kill test holds 1,000 streams (about 5 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from devstack.balancer import find_nginx
from devstack.replicas import REPLICATED, running
from devstack.seed import store_pending_sessions
from devstack.sse import EventSourceClient
from devstack.system import System
from shared.cache import StatusCache
from shared.model import StatusEvent, StreamStatus
from shared.mongo import Store, mongo_client
from shared.settings import Settings
from tests.helpers import signed_webhook

STREAM = "/api/webhooks/stream"
# Browsers wait `retry` ms before reconnecting: short here, so the test is quick.
RETRY_MS = 400
STREAMS = 1000
# Streams opened at once (a page load is not 1,000 SYNs in the same millisecond).
OPEN_CONCURRENCY = 100

pytestmark = pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    base = Settings.from_env({}, log_level="WARNING", sse_retry_ms=RETRY_MS)
    with running(base, tmp_path_factory.mktemp("replicas")) as replicas:
        yield replicas


@pytest.fixture
def replicas(system: System) -> System:
    """The system with every process up (a test may have killed one)."""
    system.revive()
    return system


@pytest.fixture
async def http(replicas: System) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=replicas.url, timeout=10, limits=limits) as client:
        yield client


@pytest.fixture
async def store(replicas: System) -> AsyncIterator[Store]:
    client = mongo_client(replicas.settings)
    yield Store(client)
    await client.close()


@pytest.fixture
async def cache(replicas: System) -> AsyncIterator[StatusCache]:
    redis = Redis.from_url(replicas.settings.redis_url)
    yield StatusCache(redis)
    await redis.aclose()


async def gateway_stats(replicas: System) -> list[dict[str, Any]]:
    """Each gateway's own /api/stats (per process, so asked of each replica directly)."""
    out = []
    async with httpx.AsyncClient(timeout=5) as client:
        for proc in replicas.gateways:
            if proc.running:
                resp = await client.get(f"{replicas.replica_url(proc)}/api/stats")
                out.append(resp.json())
            else:
                out.append({"connectionCount": 0, "activeSubscriptions": 0})
    return out


async def wait_for(check: Any, timeout: float, what: str) -> None:
    """Poll the async predicate `check` until it holds."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@contextlib.asynccontextmanager
async def browsers(
    replicas: System, uuids: list[str], per_uuid: int = 1
) -> AsyncIterator[list[EventSourceClient]]:
    """EventSource clients through nginx, `per_uuid` for each uuid, opened a few at a time;
    yields once every one has its first event."""
    clients = [
        EventSourceClient(f"{replicas.url}{STREAM}?uuid={u}")
        for u in uuids
        for _ in range(per_uuid)
    ]
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def open_one(client: EventSourceClient) -> None:
        async with gate:
            task = asyncio.create_task(client.run())
            tasks.append(task)
            await asyncio.wait(
                [task, asyncio.ensure_future(client.first_event.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )

    tasks: list[asyncio.Task[str]] = []
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(open_one(c) for c in clients))
        assert all(c.first_event.is_set() for c in clients), "a stream got no first event"
        yield clients
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def all_final(clients: list[EventSourceClient], timeout: float) -> None:
    async def check() -> bool:
        return all(c.outcome for c in clients)

    with contextlib.suppress(AssertionError):
        await wait_for(check, timeout, "every stream to end")


def done_event(doc: dict[str, Any]) -> StatusEvent:
    """What the ingest writes last for a paid session: the cache entry and its event."""
    return StatusEvent(
        uuid=doc["uuid"],
        order_code=doc["orderCode"],
        status=StreamStatus.DONE,
        amount=doc["amount"],
        amount_paid=doc["amount"],
        updated_at=datetime.now(UTC),
        version=2,
    )


# -- the tests -------------------------------------------------------------------------------


async def test_sessions_through_nginx_paid_through_the_simulator_reach_both_gateways(
    replicas: System, http: httpx.AsyncClient
) -> None:
    sessions = []
    for i in range(6):
        resp = await http.post(
            "/api/sessions", json={"accountNumber": f"00099988{i:02d}", "amount": 20_000 + i}
        )
        assert resp.status_code == 201, resp.text
        sessions.append(resp.json())
    uuids = [s["uuid"] for s in sessions]
    async with browsers(replicas, uuids, per_uuid=4) as clients:
        assert {c.status for c in clients} == {"pending"}
        # nginx spread the 24 streams over both gateways.
        stats = await gateway_stats(replicas)
        assert [s["connectionCount"] > 0 for s in stats] == [True, True], stats
        assert sum(s["connectionCount"] for s in stats) == len(clients)
        # session-api counts every gateway's subscriptions, in Redis.
        # (The admin stats are not public: nginx routes them nowhere; ask a replica.)
        site_api = replicas.replica_url(replicas.replicas["session-api"][0])
        site = (await http.get(f"{site_api}/api/stats")).json()
        assert site["activeSubscriptions"] == sum(s["activeSubscriptions"] for s in stats)

        # The bank transfers arrive: the simulator sends each signed webhook to nginx.
        async with httpx.AsyncClient(base_url=replicas.settings.payos_base_url) as sim:
            for session in sessions:
                resp = await sim.post(f"/sim/pay/{session['orderCode']}", json={})
                assert resp.status_code == 200, resp.text
        await all_final(clients, timeout=15)
    assert [c.outcome for c in clients] == ["final"] * len(clients)
    assert {c.status for c in clients} == {"done"}
    for session in sessions:
        polled = (await http.get("/api/webhooks", params={"uuid": session["uuid"]})).json()
        assert polled["status"] == "done"


async def test_gateway_killed_while_streams_wait_every_browser_reconnects_and_gets_done(
    replicas: System,
    http: httpx.AsyncClient,
    store: Store,
    cache: StatusCache,
) -> None:
    streams = STREAMS
    docs = await store_pending_sessions(store, streams, amount=50_000)
    # What session-api does on create: the status is cached.
    for doc in docs:
        await cache.put(StatusEvent.from_session(doc))
    victim, survivor = replicas.gateways

    async with browsers(replicas, [d["uuid"] for d in docs]) as clients:
        before = await gateway_stats(replicas)
        assert sum(s["connectionCount"] for s in before) == streams
        assert min(s["connectionCount"] for s in before) > 0, before
        on_victim = before[0]["connectionCount"]

        os.kill(victim.pid, signal.SIGKILL)
        # While the victim's browsers are away, some sessions are paid: they learn it from
        # the status read when they reconnect, not from the event they missed.
        random.shuffle(docs)
        gap, rest = docs[: streams // 10], docs[streams // 10 :]
        for doc in gap:
            await cache.put(done_event(doc))

        async def all_back() -> bool:
            waiting = sum(1 for c in clients if not c.outcome)
            held = (await gateway_stats(replicas))[1]["connectionCount"]
            return held == waiting and all(c.connected.is_set() for c in clients if not c.outcome)

        await wait_for(all_back, 30, "every waiting browser back on the surviving gateway")

        # The rest is paid: a share as signed webhooks through nginx, the others straight into
        # the cache and feed (what the ingest does last), as the MongoDB stand-in is slow.
        key = replicas.settings.payos_checksum_key
        by_webhook, direct = rest[:50], rest[50:]

        async def webhook(doc: dict[str, Any]) -> None:
            body = signed_webhook(doc["orderCode"], doc["amount"], key=key)
            resp = await http.post("/api/webhooks", json=body)
            assert resp.status_code == 200, resp.text

        async def pay_direct() -> None:
            for doc in direct:
                await cache.put(done_event(doc))

        await asyncio.gather(pay_direct(), *(webhook(d) for d in by_webhook))
        await all_final(clients, timeout=30)

    outcomes = [c.outcome for c in clients]
    assert outcomes.count("final") == streams, {o: outcomes.count(o) for o in set(outcomes)}
    assert {c.status for c in clients} == {"done"}
    moved = [c for c in clients if c.connects > 1]
    # Every browser of the killed gateway came back (through nginx, to the survivor) ...
    assert len(moved) >= on_victim
    # ... and said which event it had: the pending one, whose id is its version.
    assert all(c.sent_last_event_ids[:1] == ["1"] for c in moved)
    assert survivor.running


def test_replicas_have_their_own_ports_behind_one_nginx(replicas: System) -> None:
    ports = [p.port for p in replicas.processes]
    assert len(set(ports)) == len(ports)
    assert {name: len(group) for name, group in replicas.replicas.items()} == {
        "payos-simulator": 1,
        "webhook-ingest": 2,
        "stream-gateway": 2,
        "session-api": 2,
    }
    assert replicas.nginx is not None
    conf = (Path(replicas.nginx.log_path).parent / "nginx.conf").read_text()
    for name in REPLICATED:
        for proc in replicas.replicas[name]:
            assert f"server 127.0.0.1:{proc.port};" in conf
    assert replicas.settings.payos_webhook_url == f"{replicas.url}/api/webhooks"


async def test_redis_down_every_replica_stays_ready_and_payments_flow_through_nginx(
    replicas: System, http: httpx.AsyncClient
) -> None:
    """Issue 15: a Redis outage is a degraded system, not a dead one. Every replica stays in
    rotation (its /readyz, which the readiness probes use, answers 200 `degraded`), nginx
    routes creations, webhooks, streams and polls as before, and once Redis is back the
    waiting browser learns `done`."""
    redis = replicas.backends.redis
    resp = await http.post("/api/sessions", json={"accountNumber": "0009997001", "amount": 31_000})
    assert resp.status_code == 201, resp.text
    before = resp.json()
    redis.stop()
    try:
        async with httpx.AsyncClient(timeout=5) as direct:
            for name in REPLICATED:
                for proc in replicas.replicas[name]:
                    ready = await direct.get(f"{replicas.replica_url(proc)}/readyz")
                    assert ready.status_code == 200, (name, ready.text)
                    body = ready.json()
                    assert body["status"] == "degraded", (name, body)
                    assert body["checks"]["redis"].startswith("down"), (name, body)
                    assert "redis" not in body["required"], (name, body)
                    metrics = (await direct.get(f"{replicas.replica_url(proc)}/metrics")).text
                    assert 'paypush_dependency_up{dependency="redis",required="false"} 0.0' in (
                        metrics
                    ), name
        # A session is created through nginx (limit and record in MongoDB) ...
        resp = await http.post(
            "/api/sessions", json={"accountNumber": "0009997002", "amount": 32_000}
        )
        assert resp.status_code == 201, resp.text
        during = resp.json()
        sessions = [before, during]
        # ... its browser gets its first event (from MongoDB) through nginx ...
        async with browsers(replicas, [s["uuid"] for s in sessions]) as clients:
            assert {c.status for c in clients} == {"pending"}
            # ... and PayOS's webhooks reach an ingest, which stores them and says 200.
            async with httpx.AsyncClient(base_url=replicas.settings.payos_base_url) as sim:
                for session in sessions:
                    paid = await sim.post(f"/sim/pay/{session['orderCode']}", json={})
                    assert paid.status_code == 200, paid.text
                    assert paid.json()["firstStatuses"] == [200], paid.json()
            # Polling through nginx reads MongoDB: already done while Redis is down.
            for session in sessions:
                polled = await http.get("/api/webhooks", params={"uuid": session["uuid"]})
                assert polled.status_code == 200, polled.text
                assert polled.json()["status"] == "done", polled.json()
            redis.start()
            # Redis back: the ingest's publishPending sweep and the gateways' re-read after
            # the pub/sub reconnect tell the waiting browsers.
            await all_final(clients, timeout=30)
        assert [c.outcome for c in clients] == ["final"] * len(clients)
        assert {c.status for c in clients} == {"done"}
    finally:
        if not redis.running:
            redis.start()
