"""The payment flow on a local 3-primary Redis Cluster (`REDIS_CLUSTER=true`).

Every service runs as its own process (`devstack.replicas`, one replica each, behind nginx)
against Debian's redis-server in cluster mode. Sessions are chosen so their uuids land on
every shard: the cache-and-publish script runs on the shard owning the session's hash tag and
SPUBLISHes there; the gateway holds one sharded pub/sub connection per primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis, RedisCluster

from devstack.balancer import find_nginx
from devstack.replicas import REPLICATED, running
from devstack.servers import Process
from devstack.sse import EventSourceClient
from devstack.system import System, wait_ready
from shared import keys
from shared.cache import StatusCache
from shared.clients import redis_client
from shared.model import StatusEvent, StreamStatus, utcnow
from shared.settings import Settings

STREAM = "/api/webhooks/stream"
SESSIONS_PER_SHARD = 2

pytestmark = pytest.mark.skipif(
    find_nginx() is None or shutil.which("redis-cli") is None,
    reason="needs nginx and redis-cli",
)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    base = Settings.from_env({}, log_level="WARNING", sse_retry_ms=300)
    with running(base, tmp_path_factory.mktemp("cluster"), replicas=1, cluster=True) as s:
        yield s


@pytest.fixture
async def cluster(system: System) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(system.settings.redis_url)
    await client.initialize()
    yield client
    await client.aclose()


@pytest.fixture
async def http(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=system.url, timeout=10) as client:
        yield client


def direct(system: System, service: str) -> str:
    [proc] = system.replicas[service]
    return system.replica_url(proc)


def uuids_on_every_shard(cluster: RedisCluster, per_shard: int) -> dict[str, list[str]]:
    """Fresh uuids, `per_shard` for each primary (by their channel's slot)."""
    by_node: dict[str, list[str]] = {node.name: [] for node in cluster.get_primaries()}
    while any(len(v) < per_shard for v in by_node.values()):
        uuid = str(uuidlib.uuid4())
        node = cluster.get_node_from_key(keys.status_channel(uuid))
        assert node is not None
        if len(by_node[node.name]) < per_shard:
            by_node[node.name].append(uuid)
    return by_node


async def create_session(http: httpx.AsyncClient, uuid: str, account: str) -> dict[str, Any]:
    resp = await http.post(
        "/api/sessions", json={"accountNumber": account, "amount": 30_000, "uuid": uuid}
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    assert body["uuid"] == uuid
    return body


@contextlib.asynccontextmanager
async def waiting(urls: list[str]) -> AsyncIterator[list[EventSourceClient]]:
    clients = [EventSourceClient(url) for url in urls]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(c.first_event.wait() for c in clients))
        yield clients
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_final(clients: list[EventSourceClient], timeout: float = 15) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not all(c.outcome for c in clients):
                await asyncio.sleep(0.05)


async def shard_connections(cluster: RedisCluster, gateway: Process) -> dict[str, list[int]]:
    """node name → ids of the gateway's connections in sharded pub/sub mode on that node (its
    cluster client's topology connections carry the same name but subscribe nothing)."""
    name = f"stream-gateway-{gateway.pid}-pubsub"
    out: dict[str, list[int]] = {}
    for node in cluster.get_primaries():
        listed: list[dict[str, Any]] = await cluster.client_list(target_nodes=node)
        out[node.name] = [
            int(c["id"]) for c in listed if c["name"] == name and int(c.get("ssub", 0)) > 0
        ]
    return out


async def connections_per_shard(cluster: RedisCluster, gateway: Process) -> list[int]:
    return sorted(len(ids) for ids in (await shard_connections(cluster, gateway)).values())


async def test_every_service_is_ready_on_the_cluster(system: System) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for service in REPLICATED:
            resp = await client.get(f"{direct(system, service)}/readyz")
            assert resp.status_code == 200, (service, resp.text)
            checks = resp.json()["checks"]
            assert checks["redis"] == checks["mongodb"] == "ok"
            if service == "stream-gateway":
                assert checks["pubsub"] == "ok"


async def test_gateway_holds_one_sharded_pubsub_connection_per_primary(
    system: System, cluster: RedisCluster
) -> None:
    [gateway] = system.gateways
    assert await connections_per_shard(cluster, gateway) == [1, 1, 1]


async def test_payment_flow_on_every_shard(
    system: System, cluster: RedisCluster, http: httpx.AsyncClient
) -> None:
    by_node = uuids_on_every_shard(cluster, SESSIONS_PER_SHARD)
    uuids = [u for group in by_node.values() for u in group]
    sessions = [await create_session(http, u, f"00077766{i:02d}") for i, u in enumerate(uuids)]
    gateway = direct(system, "stream-gateway")
    # Two browsers per session: one on the gateway itself, one through nginx.
    urls = [f"{base}{STREAM}?uuid={u}" for u in uuids for base in (gateway, system.url)]
    async with waiting(urls) as clients:
        assert {c.status for c in clients} == {"pending"}
        # Each session's channel is subscribed once (one gateway process), on its own shard.
        for node_name, group in by_node.items():
            node = cluster.get_node(node_name=node_name)
            counts = await cluster.pubsub_shardnumsub(
                *(keys.status_channel(u) for u in group), target_nodes=node
            )
            assert [int(n) for _, n in counts] == [1] * len(group)
        # The admin stats are not public (nginx routes them nowhere): ask a replica.
        site = direct(system, "session-api")
        stats = (await http.get(f"{site}/api/stats")).json()
        assert stats["activeSubscriptions"] == len(uuids)
        assert stats["cachedOrders"] >= len(uuids)
        assert stats["pendingSessions"] >= len(uuids)
        gateway_stats = (await http.get(f"{gateway}/api/stats")).json()
        assert (gateway_stats["connectionCount"], gateway_stats["activeSubscriptions"]) == (
            len(urls),
            len(uuids),
        )

        # The bank transfers: the simulator signs each webhook and delivers it (to nginx →
        # webhook-ingest), which caches `done` and SPUBLISHes it on the session's shard.
        async with httpx.AsyncClient(base_url=system.settings.payos_base_url) as sim:
            for session in sessions:
                resp = await sim.post(f"/sim/pay/{session['orderCode']}", json={})
                assert resp.status_code == 200, resp.text
        await until_final(clients)
    assert [c.outcome for c in clients] == ["final"] * len(clients)
    assert {c.status for c in clients} == {"done"}
    for uuid in uuids:
        polled = (await http.get("/api/webhooks", params={"uuid": uuid})).json()
        assert (polled["status"], polled["amount"]) == ("done", 30_000)
        # The cached status lives on the shard of the uuid's hash tag.
        assert await cluster.get(keys.status_key(uuid)) is not None


async def test_a_shard_connection_dropped_while_streams_wait_still_delivers_done(
    system: System, cluster: RedisCluster, http: httpx.AsyncClient
) -> None:
    by_node = uuids_on_every_shard(cluster, 1)
    uuids = [u for group in by_node.values() for u in group]
    sessions = [await create_session(http, u, f"00055544{i:02d}") for i, u in enumerate(uuids)]
    gateway = direct(system, "stream-gateway")
    [gateway_proc] = system.gateways
    async with waiting([f"{gateway}{STREAM}?uuid={u}" for u in uuids]) as clients:
        # Redis drops the gateway's connection to one shard; the payment of that shard's
        # session lands while the gateway is away from it.
        victim = next(iter(by_node))
        [conn_id] = (await shard_connections(cluster, gateway_proc))[victim]
        await cluster.client_kill_filter(
            _id=str(conn_id), target_nodes=cluster.get_node(node_name=victim)
        )
        async with httpx.AsyncClient(base_url=system.settings.payos_base_url) as sim:
            for session in sessions:
                resp = await sim.post(f"/sim/pay/{session['orderCode']}", json={})
                assert resp.status_code == 200, resp.text
        await until_final(clients)
        # The gateway is connected to every shard again.
        async with asyncio.timeout(10):
            while await connections_per_shard(cluster, gateway_proc) != [1, 1, 1]:
                await asyncio.sleep(0.05)
    assert {c.status for c in clients} == {"done"}
    assert all(c.connects == 1 for c in clients), "the browsers never noticed"


async def test_status_cache_on_the_cluster_publishes_once_per_version(
    system: System, cluster: RedisCluster
) -> None:
    """The cache-and-publish script's keys share a slot; SPUBLISH reaches shard subscribers."""
    uuid = str(uuidlib.uuid4())
    client = redis_client(system.settings)
    node = cluster.get_node_from_key(keys.status_channel(uuid))
    assert node is not None
    sub = Redis(host=node.host, port=int(node.port))
    pubsub = sub.pubsub()
    try:
        await pubsub.ssubscribe(keys.status_channel(uuid))
        assert (await pubsub.get_message(timeout=2))["type"] == "ssubscribe"
        cache = StatusCache(client, sharded=True)
        event = StatusEvent(uuid, 42, StreamStatus.PENDING, 1000, 0, utcnow(), 1)
        assert await cache.put(event) is True
        assert await cache.put(event) is False  # same version: nothing published
        message = await pubsub.get_message(timeout=2)
        assert message is not None and message["type"] == "smessage"
        assert message["data"] == event.to_json().encode()
        assert await pubsub.get_message(timeout=0.2) is None
        cached = await cache.get(uuid)
        assert cached is not None and cached.to_json() == event.to_json()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await sub.aclose()
        await client.aclose()


async def move_slot(cluster: RedisCluster, key: str) -> str:
    """Move `key`'s slot (and its keys) to another primary, as resharding does; returns the
    new owner's name."""
    slot = cluster.keyslot(key)
    source = cluster.get_node_from_key(key)
    assert source is not None
    target = next(n for n in cluster.get_primaries() if n.name != source.name)
    source_id = await cluster.execute_command("CLUSTER MYID", target_nodes=source)
    target_id = await cluster.execute_command("CLUSTER MYID", target_nodes=target)
    await cluster.execute_command(
        "CLUSTER SETSLOT", slot, "IMPORTING", source_id, target_nodes=target
    )
    await cluster.execute_command(
        "CLUSTER SETSLOT", slot, "MIGRATING", target_id, target_nodes=source
    )
    while keys_in_slot := await cluster.execute_command(
        "CLUSTER GETKEYSINSLOT", slot, 100, target_nodes=source
    ):
        await cluster.execute_command(
            "MIGRATE",
            target.host,
            target.port,
            "",
            0,
            5000,
            "KEYS",
            *keys_in_slot,
            target_nodes=source,
        )
    for node in (target, source, *cluster.get_primaries()):
        await cluster.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id, target_nodes=node)
    return str(target.name)


async def test_a_slot_moved_to_another_primary_while_a_stream_waits_still_delivers_done(
    system: System, cluster: RedisCluster, http: httpx.AsyncClient
) -> None:
    uuid = str(uuidlib.uuid4())
    session = await create_session(http, uuid, "0004443332")
    gateway = direct(system, "stream-gateway")
    async with waiting([f"{gateway}{STREAM}?uuid={uuid}"]) as clients:
        new_owner = await move_slot(cluster, keys.status_channel(uuid))
        # Redis ended the gateway's subscription on the old owner; the gateway follows the slot.
        node = cluster.get_node(node_name=new_owner)
        async with asyncio.timeout(10):
            while True:
                [(_, count)] = await cluster.pubsub_shardnumsub(
                    keys.status_channel(uuid), target_nodes=node
                )
                if count == 1:
                    break
                await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=system.settings.payos_base_url) as sim:
            resp = await sim.post(f"/sim/pay/{session['orderCode']}", json={})
            assert resp.status_code == 200, resp.text
        await until_final(clients)
    assert clients[0].statuses == ["pending", "done"]
    assert clients[0].connects == 1


# -- every node killed at once -------------------------------------------------------------

HUB_TASKS = ("hub-reader", "hub-flusher", "hub-reread")


async def gateway_recovered(client: httpx.AsyncClient, url: str) -> bool:
    """/healthz 200 with the hub's tasks running, and /readyz saying pub/sub (and Redis) ok."""
    health = await client.get(f"{url}/healthz")
    tasks = health.json()["tasks"]
    if health.status_code != 200 or any(tasks.get(t) != "running" for t in HUB_TASKS):
        return False
    checks = (await client.get(f"{url}/readyz")).json()["checks"]
    return bool(checks["pubsub"] == checks["redis"] == "ok")


async def task_restarts(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The supervisor's restarts per task, from /metrics (none listed: none restarted)."""
    text = (await client.get(f"{url}/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("paypush_task_restarts_total{"):
            name = line.split('task="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


async def all_ready(system: System, timeout: float) -> None:
    """Until every service's /readyz answers 200 (the cluster is usable by all of them).

    Also what every service's cluster client needs before a burst: redis-py 8.1's async
    `RedisCluster`, given a dozen concurrent first commands while it initialises, fails a few
    of them (AttributeError: 'NoneType' object has no attribute 'writelines', or
    ConnectionError; 2 to 4 % of 12 concurrent GETs on a new client, none once one command
    has run), which a gateway answers with a 500 (an AttributeError is no RedisError). One
    /readyz (a PING) first keeps that out of these tests; the race itself is redis-py's and
    is left as found.
    """
    async with asyncio.timeout(timeout):
        for service in REPLICATED:
            await wait_ready(direct(system, service), timeout)


async def test_every_cluster_node_killed_and_restarted_pushes_flow_again(
    system: System, cluster: RedisCluster, http: httpx.AsyncClient
) -> None:
    """kill -9 of every node while streams wait, 1.5 s down, the same (empty) cluster back.

    Nothing was persisted: the cache is empty, MongoDB is the truth. The gateway's reader
    survives the outage on its own (no supervisor restart), is healthy and subscribed again
    within a bounded time, and every waiting browser learns `done`: of a payment made while
    the cluster was down (MongoDB has it; the gateway re-reads it after reconnecting) and of
    one made afterwards (pushed). The browsers never notice the outage.
    """
    assert system.backends.cluster is not None
    # Every service's cluster client initialised before the burst of streams (see
    # `all_ready`), whichever test of this module ran first.
    await all_ready(system, 30)
    by_node = uuids_on_every_shard(cluster, 2)
    during = [group[0] for group in by_node.values()]
    after = [group[1] for group in by_node.values()]
    sessions = {
        u: await create_session(http, u, f"00033322{i:02d}") for i, u in enumerate(during + after)
    }
    gateway = direct(system, "stream-gateway")
    [gateway_proc] = system.gateways
    urls = {u: [f"{base}{STREAM}?uuid={u}" for base in (gateway, system.url)] for u in sessions}
    ops = httpx.AsyncClient(timeout=2)
    sim = httpx.AsyncClient(base_url=system.settings.payos_base_url, timeout=10)
    nodes = system.backends.cluster.nodes
    try:
        async with waiting([url for u in sessions for url in urls[u]]) as clients:
            by_uuid = {u: clients[2 * i : 2 * i + 2] for i, u in enumerate(sessions)}
            restarted = asyncio.create_task(asyncio.to_thread(system.backends.cluster.restart, 1.5))
            async with asyncio.timeout(5):
                while any(node.running for node in nodes):
                    await asyncio.sleep(0.01)
            down = time.monotonic()
            # The cluster is gone: these transfers reach MongoDB, not Redis.
            paid_during = [
                (await sim.post(f"/sim/pay/{sessions[u]['orderCode']}", json={})).json()
                for u in during
            ]
            await restarted
            back = time.monotonic()
            async with asyncio.timeout(20):
                while not await gateway_recovered(ops, gateway):
                    await asyncio.sleep(0.05)
            recovered = time.monotonic()
            # Those paid during the outage: learnt from MongoDB by the re-read (or pushed by
            # the redelivery of a webhook the ingest could not publish).
            await until_final([c for u in during for c in by_uuid[u]], timeout=20)
            assert {c.status for u in during for c in by_uuid[u]} == {"done"}
            paid_at = time.monotonic()
            for u in after:
                resp = await sim.post(f"/sim/pay/{sessions[u]['orderCode']}", json={})
                assert resp.status_code == 200, resp.text
            await until_final(clients)
            pushed_s = time.monotonic() - paid_at
        assert [c.outcome for c in clients] == ["final"] * len(clients)
        assert {c.status for c in clients} == {"done"}
        assert [c.connects for c in clients] == [1] * len(clients), "a browser noticed"
        print(
            f"\nevery node killed → cluster_state:ok again {back - down:.2f} s later, the "
            f"gateway healthy and subscribed {recovered - down:.2f} s after the kill "
            f"({recovered - back:.2f} s after the cluster); {len(after)} payments after the "
            f"outage told to {2 * len(after)} browsers in {pushed_s:.2f} s; first delivery "
            f"of the {len(during)} made during the outage acknowledged: "
            f"{[p['delivered'] for p in paid_during]}"
        )
        assert await task_restarts(ops, gateway) == {}, "the supervisor had to restart a task"
        # One sharded pub/sub connection per primary again; nothing left subscribed once the
        # browsers are gone. (A new client: this test's own lost its connections.)
        fresh = RedisCluster.from_url(system.settings.redis_url)
        try:
            await fresh.initialize()
            assert await connections_per_shard(fresh, gateway_proc) == [1, 1, 1]
            async with asyncio.timeout(5):
                while True:
                    stats = (await ops.get(f"{gateway}/api/stats")).json()
                    if (stats["connectionCount"], stats["activeSubscriptions"]) == (0, 0):
                        break
                    await asyncio.sleep(0.05)
            for node_name, group in by_node.items():
                counts = await fresh.pubsub_shardnumsub(
                    *(keys.status_channel(u) for u in group),
                    target_nodes=fresh.get_node(node_name=node_name),
                )
                assert [int(n) for _, n in counts] == [0] * len(group)
            for u in sessions:
                polled = (await http.get("/api/webhooks", params={"uuid": u})).json()
                assert polled["status"] == "done", polled
        finally:
            await fresh.aclose()
    finally:
        await ops.aclose()
        await sim.aclose()
        # The module's later tests need the cluster, and every service on it.
        if any(not node.running for node in nodes):
            await asyncio.to_thread(system.backends.cluster.restart, 0)
        await all_ready(system, 30)
