"""Faults while payments flow: nothing lost, nobody let in, nobody left waiting.

Each test runs the whole system as processes (webhook-ingest, two stream-gateways,
session-api; the PayOS simulator in the test, redelivering quickly) on the suite's real
redis-server and MongoDB stand-in, drives payments as people make them (a session through
session-api, browsers on the gateways' SSE streams, the transfer through the simulator),
injects one kind of fault while they flow, then reconciles (`harness.reconcile`):

- every paid session is `completed` in MongoDB once: amountPaid == amount, its one reference,
  version 2 (pending → completed, no second transition), one webhook record per
  orderCode + reference;
- every browser of a paid session got exactly one `done`, with versions only increasing
  across reconnects, and then a 204 (final, stop); the polling endpoint says `done` too;
- a session never paid is still pending, version 1, and none of its browsers saw anything
  but `pending`;
- the webhooks the simulator reports acknowledged == the webhook records stored; none lost.

Tests marked `redis_cluster` run the same system on a local 3-primary Redis Cluster of their
own. The `faults_long` variants (`make faults`) run at four times the load, and a chaos run
injects every fault over and over while payments flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from httpx_sse import aconnect_sse
from redis.asyncio import RedisCluster

from devstack.servers import LocalRedisCluster, free_port
from devstack.system import Backends, System, wait_ready
from shared.mongo import Store
from tests.faults.conftest import paused
from tests.faults.harness import (
    Driver,
    Payment,
    Report,
    deliveries,
    kill,
    leftovers,
    metric,
    reconcile,
    settle,
    start,
    stop,
    subscribed,
)

pytestmark = pytest.mark.faults

SCALES = [1, pytest.param(4, marks=[pytest.mark.faults_long, pytest.mark.timeout(600)])]
TEST_CLIENT = "fault-test"  # the test's own Redis connections, left out of the counts


async def audit(driver: Driver, store: Store, report: Report, timeout: float = 60) -> None:
    await settle(driver, timeout)
    await reconcile(driver, store, report)
    assert report.problems == [], "\n".join(report.problems[:40])
    assert report.payments > 0
    assert (report.lost, report.unnotified) == (0, 0)


async def waiting_sessions(driver: Driver, n: int) -> list[Payment]:
    """`n` sessions with their browsers waiting, to be paid while a fault is on."""
    return list(await asyncio.gather(*(driver.one(pay=False) for _ in range(n))))


async def set_faults(http: httpx.AsyncClient, system: System, **faults: object) -> None:
    resp = await http.post(f"{system.sim_url}/sim/faults", json=faults)
    resp.raise_for_status()


@pytest.mark.parametrize("scale", SCALES)
async def test_redis_kill_9_and_restart_while_payments_flow(
    system: System, driver: Driver, servers: Backends, store: Store, ledger: Report, scale: int
) -> None:
    """Redis loses every key and every subscription: gateways resubscribe and re-read,
    the ingest acknowledges what MongoDB stored and republishes once Redis is back."""
    waiting = await waiting_sessions(driver, 3 * scale)
    flow = asyncio.create_task(driver.flow(rate=6 * scale, duration=4 * scale))
    pays = []
    for i in range(scale):
        await asyncio.sleep(1.5)
        await kill(servers.redis)
        ledger.faults.append("redis kill -9")
        pays += [asyncio.create_task(driver.pay(p)) for p in waiting[3 * i : 3 * i + 3]]
        await asyncio.sleep(1.0)
        await start(servers.redis)
    await asyncio.gather(*pays, flow)
    await audit(driver, store, ledger)


@pytest.mark.redis_cluster
@pytest.mark.parametrize("scale", SCALES)
async def test_every_redis_cluster_node_kill_9_and_restart_while_payments_flow(
    system: System,
    driver: Driver,
    redis_cluster: LocalRedisCluster,
    store: Store,
    ledger: Report,
    scale: int,
) -> None:
    """The system on a 3-primary Redis Cluster; every node killed at once (no node left to
    ask, which redis-py reports as RedisClusterException, not a RedisError), down 1.5 s, the
    same cluster back empty. Payments made during the outage and after are told; the
    gateways are subscribed again within a bounded time; nothing is left subscribed."""
    waiting = await waiting_sessions(driver, 3 * scale)
    flow = asyncio.create_task(driver.flow(rate=4 * scale, duration=4 * scale))
    pays = []
    for i in range(scale):
        await asyncio.sleep(1.5)
        restarted = asyncio.create_task(asyncio.to_thread(redis_cluster.restart, 1.5))
        async with asyncio.timeout(5):
            while any(node.running for node in redis_cluster.nodes):
                await asyncio.sleep(0.01)
        down = time.monotonic()
        ledger.faults.append("redis cluster: every node kill -9, 1.5 s down")
        pays += [asyncio.create_task(driver.pay(p)) for p in waiting[3 * i : 3 * i + 3]]
        await restarted
        ledger.figures["cluster_back_s"] = time.monotonic() - down
        async with asyncio.timeout(30):
            while not all([await subscribed(driver.http, u) for u in system.gateway_urls]):
                await asyncio.sleep(0.05)
        ledger.figures["gateways_subscribed_s"] = time.monotonic() - down
    await asyncio.gather(*pays, flow)
    await audit(driver, store, ledger)
    await driver.close()
    uuids = [p.uuid for p in driver.payments]
    async with cluster_client(redis_cluster) as cluster:
        # Every connection was lost with the nodes, so none can be left over from before;
        # the pools' sizes follow the load. What must hold: nothing subscribed, and each
        # gateway on one sharded pub/sub connection per primary (no link left half-open).
        problems = await leftovers(driver, cluster, uuids, None)
        assert problems == [], problems
        assert await sharded_links(cluster, system) == [[1, 1, 1]] * len(system.gateways)
    for url in system.gateway_urls:
        health = (await driver.http.get(f"{url}/healthz")).json()
        assert set(health["tasks"].values()) <= {"running", "finished"}, health
        restarts = await metric(driver.http, url, "paypush_task_restarts_total")
        assert restarts == 0, f"{url}: the supervisor restarted a task {restarts} times"


@pytest.mark.redis_cluster
async def test_while_no_redis_cluster_node_answers_every_service_falls_back_to_mongodb(
    system: System,
    driver: Driver,
    redis_cluster: LocalRedisCluster,
    store: Store,
    ledger: Report,
) -> None:
    """The promises for "Redis unavailable", with every node of the cluster down (redis-py:
    RedisClusterException, which is not a RedisError): the ingest stores a delivery and
    acknowledges it, its publish deferred; session-api creates a session (counted once)
    and answers a poll from MongoDB; the gateway opens a stream whose first event it read
    from MongoDB. Once the cluster is back, the deferred `done` reaches the waiting browser."""
    waiting = await driver.one(pay=False)
    for url in system.gateway_urls:
        await driver.http.get(f"{url}/readyz")
    await asyncio.to_thread(redis_cluster.kill)
    ledger.faults.append("redis cluster: every node kill -9")
    problems = []
    try:
        body = await driver.pay(waiting)
        if not body["delivered"]:
            problems.append("ingest: a delivery stored during the outage was not acknowledged")
        polled = await driver.http.get(
            f"{system.api_url}/api/webhooks", params={"uuid": waiting.uuid}
        )
        if polled.status_code != 200 or polled.json().get("status") != "done":
            problems.append(f"session-api poll: {polled.status_code} {polled.text[:150]}")
        account = "8" + "".join(driver.rng.choice("0123456789") for _ in range(9))
        created = await driver.http.post(
            f"{system.api_url}/api/sessions", json={"accountNumber": account, "amount": 20_000}
        )
        if created.status_code != 201:
            problems.append(f"session-api create: {created.status_code} {created.text[:150]}")
        uuid = created.json()["uuid"] if created.status_code == 201 else waiting.uuid
        first = await first_event(driver.http, system.gateway_urls[0], uuid)
        if first[0] != 200 or first[1] is None:
            problems.append(f"gateway: a stream opened during the outage answered {first}")
    finally:
        await asyncio.to_thread(redis_cluster.revive)
    # What the failed attempts left behind: each one counts against the account's limit.
    limit = await driver.http.get(
        f"{system.api_url}/api/webhooks/check-session-limit", params={"accountNumber": account}
    )
    pending, created_ = limit.json()["pendingCount"], int(created.status_code == 201)
    if pending != created_:
        problems.append(f"session-api: {pending} pending sessions counted, {created_} created")
    await audit(driver, store, ledger, timeout=30)
    assert problems == [], problems


async def first_event(
    http: httpx.AsyncClient, gateway: str, uuid: str, timeout: float = 5.0
) -> tuple[int, str | None]:
    """Open a stream, read its first event: (HTTP status, the event's data or None)."""
    try:
        async with (
            asyncio.timeout(timeout),
            aconnect_sse(
                http, "GET", f"{gateway}/api/webhooks/stream", params={"uuid": uuid}
            ) as source,
        ):
            if source.response.status_code != 200:
                return source.response.status_code, None
            async for sse in source.aiter_sse():
                if sse.data:
                    return 200, sse.data
    except (TimeoutError, httpx.HTTPError) as exc:
        return 0, type(exc).__name__
    return 200, None


async def sharded_links(cluster: RedisCluster, system: System) -> list[list[int]]:
    """Each gateway's connections in sharded pub/sub mode, on each primary."""
    out = []
    for gateway in system.gateways:
        name = f"stream-gateway-{gateway.pid}-pubsub"
        per_node = []
        for node in cluster.get_primaries():
            listed = await cluster.client_list(target_nodes=node)
            per_node.append(
                sum(1 for c in listed if c["name"] == name and int(c.get("ssub", 0)) > 0)
            )
        out.append(per_node)
    return out


@contextlib.asynccontextmanager
async def cluster_client(cluster: LocalRedisCluster) -> AsyncIterator[RedisCluster]:
    """The test's own cluster client (a new one after an outage: the old one's connections
    are gone, and a command sent to a given node is not retried)."""
    client = RedisCluster.from_url(cluster.url, client_name=TEST_CLIENT)
    try:
        await client.initialize()
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("scale", SCALES)
async def test_mongodb_stop_and_start_while_payments_flow(
    system: System, driver: Driver, servers: Backends, store: Store, ledger: Report, scale: int
) -> None:
    """MongoDB away: the ingest answers 503 (nothing acknowledged that is not stored) and
    the simulator redelivers; session creation answers 503 and the client retries."""
    assert servers.mongo is not None, "needs the MongoDB stand-in (a process we can stop)"
    waiting = await waiting_sessions(driver, 3 * scale)
    flow = asyncio.create_task(driver.flow(rate=6 * scale, duration=4 * scale))
    pays = []
    for i in range(scale):
        await asyncio.sleep(1.5)
        await stop(servers.mongo)
        ledger.faults.append("mongodb stop")
        pays += [asyncio.create_task(driver.pay(p)) for p in waiting[3 * i : 3 * i + 3]]
        await asyncio.sleep(1.5)
        await start(servers.mongo)
    await asyncio.gather(*pays, flow)
    await audit(driver, store, ledger)
    # Those paid while MongoDB was away were refused (503) and delivered again.
    by_code = await deliveries(driver.http, system.sim_url)
    for p in waiting:
        attempts = by_code[p.order_code][0]["attempts"]
        assert attempts[0] != 200 and attempts[-1] == 200, attempts


@pytest.mark.parametrize("scale", SCALES)
async def test_gateway_kill_9_mid_stream_browsers_resume_elsewhere(
    system: System, driver: Driver, store: Store, ledger: Report, scale: int
) -> None:
    """Browsers on a gateway killed mid-stream reconnect (Last-Event-ID) to the other one,
    or to the restarted one, and still get `done` exactly once."""
    pinned: list[Payment] = await asyncio.gather(
        *(driver.one(pay=False, gateway=0) for _ in range(8 * scale))
    )
    flow = asyncio.create_task(driver.flow(rate=5 * scale, duration=4))
    await asyncio.sleep(1.0)
    await kill(system.gateways[0])
    ledger.faults.append("stream-gateway-0 kill -9")
    half = len(pinned) // 2
    # Paid while their gateway is dead: they must learn it from the other one.
    await asyncio.gather(*(driver.pay(p) for p in pinned[:half]))
    await start(system.gateways[0])
    await asyncio.gather(*(driver.pay(p) for p in pinned[half:]))
    await flow
    await kill(system.gateways[1])
    ledger.faults.append("stream-gateway-1 kill -9")
    await asyncio.sleep(0.5)
    await start(system.gateways[1])
    await audit(driver, store, ledger)
    for p in pinned:
        for w in p.watchers:
            assert w.connects >= 3, f"{p.order_code}: connected {w.connects} times"


@pytest.mark.parametrize("where", ["before-store", "after-store"])
@pytest.mark.parametrize("scale", SCALES)
async def test_ingest_kill_9_mid_request_is_redelivered(
    system: System,
    driver: Driver,
    servers: Backends,
    store: Store,
    ledger: Report,
    scale: int,
    where: str,
) -> None:
    """The ingest dies holding requests: before it stored them (MongoDB paused) or after it
    stored them and before it answered (Redis paused, so the publish hangs). The simulator
    redelivers to the restarted ingest; each transfer counts once, each browser gets `done`."""
    assert servers.mongo is not None, "needs the MongoDB stand-in (a process we can pause)"
    victims: list[Payment] = await asyncio.gather(
        *(driver.one(pay=False) for _ in range(6 * scale))
    )
    flow = asyncio.create_task(driver.flow(rate=4 * scale, duration=3))
    await asyncio.sleep(0.5)
    held = servers.mongo if where == "before-store" else servers.redis
    with paused(held):
        pays = [asyncio.create_task(driver.pay(p)) for p in victims]
        codes = [p.order_code for p in victims]
        if where == "after-store":
            # Stored (MongoDB is up), not answered (the publish waits on Redis).
            async with asyncio.timeout(2):
                while await store.webhooks.count_documents({"orderCode": {"$in": codes}}) < len(
                    codes
                ):
                    await asyncio.sleep(0.02)
        else:
            await asyncio.sleep(0.5)
        by_code = await deliveries(driver.http, system.sim_url)
        acked = [c for c in codes for d in by_code.get(c, []) if d["delivered"]]
        assert acked == [], "acknowledged before the kill: not mid-request"
        await kill(system.ingest)
        ledger.faults.append(f"webhook-ingest kill -9 {where} ({len(codes)} in flight)")
    await start(system.ingest)
    await asyncio.gather(*pays)
    await flow
    await audit(driver, store, ledger)
    for p in victims:
        (sent,) = (await deliveries(driver.http, system.sim_url))[p.order_code]
        assert sent["attempts"][0] == 0, "the first attempt should have died with the ingest"


@pytest.mark.parametrize("scale", SCALES)
async def test_payos_deliveries_dropped_and_delayed(
    system: System, driver: Driver, store: Store, ledger: Report, scale: int
) -> None:
    """PayOS slow and lossy: deliveries dropped (and redelivered), held back, and some sent
    twice at once: every transfer counts once and every browser learns it."""
    await set_faults(driver.http, system, dropDeliveries=10 * scale, deliveryDelaySeconds=0.3)
    ledger.faults.append(f"drop {10 * scale} deliveries, delay each by 0.3 s")
    await driver.flow(rate=6 * scale, duration=3 * scale, duplicate_every=3)
    await set_faults(driver.http, system)
    await audit(driver, store, ledger)
    assert ledger.failed_attempts >= 10 * scale


@pytest.mark.faults_long
@pytest.mark.timeout(900)
async def test_chaos_every_fault_again_and_again_while_payments_flow(
    system: System, driver: Driver, servers: Backends, store: Store, ledger: Report
) -> None:
    """Ninety seconds of steady payments with a fault every few seconds, in random order."""
    assert servers.mongo is not None
    rng = random.Random(2024)
    mongo = servers.mongo

    async def redis_kill() -> None:
        await kill(servers.redis)
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        await start(servers.redis)

    async def mongo_stop() -> None:
        await stop(mongo)
        await asyncio.sleep(rng.uniform(0.3, 2.0))
        await start(mongo)

    async def gateway_kill() -> None:
        gateway = rng.choice(system.gateways)
        await kill(gateway)
        await asyncio.sleep(rng.uniform(0.1, 1.5))
        await start(gateway)

    async def ingest_kill() -> None:
        await kill(system.ingest)
        await asyncio.sleep(rng.uniform(0.1, 1.0))
        await start(system.ingest)

    async def redis_pause() -> None:
        with paused(servers.redis):
            await asyncio.sleep(rng.uniform(0.5, 2.5))

    async def mongo_pause() -> None:
        with paused(mongo):
            await asyncio.sleep(rng.uniform(0.5, 2.5))

    async def lossy_payos() -> None:
        await set_faults(
            driver.http, system, dropDeliveries=rng.randrange(5, 30), deliveryDelaySeconds=0.5
        )
        await asyncio.sleep(rng.uniform(1, 3))
        await set_faults(driver.http, system)

    faults = [
        redis_kill,
        mongo_stop,
        gateway_kill,
        ingest_kill,
        redis_pause,
        mongo_pause,
        lossy_payos,
    ]
    flow = asyncio.create_task(driver.flow(rate=8, duration=90))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 80:
        rng.shuffle(faults)
        for fault in faults:
            await asyncio.sleep(rng.uniform(1, 4))
            await fault()
            ledger.faults.append(fault.__name__)
    await flow
    await audit(driver, store, ledger, timeout=120)


async def test_ingest_restart_with_a_deferred_publish_leaves_no_browser_waiting(
    system: System, driver: Driver, store: Store, ledger: Report
) -> None:
    """The ingest cannot reach Redis (its own network path: Redis is fine for everyone
    else), acknowledges stored webhooks with the publish deferred (marked in MongoDB), and is
    killed; the restarted ingest finds the marks and publishes `done`."""
    victims: list[Payment] = await asyncio.gather(*(driver.one(pay=False) for _ in range(4)))
    ingest = system.ingest
    healthy_env = dict(ingest.env or {})
    await stop(ingest)
    ingest.env = {**healthy_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    await start(ingest)
    ledger.faults.append("webhook-ingest cut off from Redis")
    # Until its unique indexes are confirmed the ingest refuses deliveries (503, redelivered
    # later); this test wants the first delivery acknowledged, so it waits for MongoDB.
    await wait_ready(
        f"http://127.0.0.1:{ingest.port}",
        20,
        ready=lambda _, body: body.get("checks", {}).get("mongodb") == "ok",
    )
    for p in victims:
        body = await driver.pay(p)
        assert body["delivered"], "stored and acknowledged, the publish deferred"
    await kill(ingest)
    ledger.faults.append("webhook-ingest kill -9 with a deferred publish")
    ingest.env = healthy_env
    await start(ingest)
    # Within a few sweeps (every 5 s) even if the first one finds MongoDB not yet reachable.
    await audit(driver, store, ledger, timeout=20)
