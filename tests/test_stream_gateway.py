"""stream-gateway: each session's status pushed over SSE, multiplexed over one Redis pub/sub.

Driven through real servers (redis-server, the MongoDB stand-in, webhook-ingest for payments)
with an SSE client that is not ours: httpx + httpx-sse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from httpx_sse import EventSource, ServerSentEvent, aconnect_sse
from pymongo import ReturnDocument
from redis.asyncio import Redis

from devstack.servers import Process
from devstack.system import Backends, service_process
from devstack.system import wait_ready as until_ready
from shared import keys
from shared.appkeys import SUPERVISOR
from shared.cache import StatusCache
from shared.model import StatusEvent
from shared.mongo import Store
from shared.settings import Settings
from stream_gateway import create_app, links
from stream_gateway.appkeys import HUB
from tests.helpers import add_session, signed_webhook
from webhook_ingest import create_app as create_ingest_app

Client = TestClient[Any, Any]
STREAM = "/api/webhooks/stream"
ALLOWED_ORIGIN = "http://127.0.0.1:8083"


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def gateway_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, sse_keepalive_seconds=0.2, shutdown_timeout_seconds=3)


async def wait_ready(http: httpx.AsyncClient, timeout: float = 10) -> None:
    """Until every check passes (readiness itself needs none of the backends)."""
    await until_ready(str(http.base_url), timeout, ready=lambda _, body: body["status"] == "ready")


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, app: web.Application | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway (`app`, or a new one) in this process on a real port, and an HTTP client
    pointed at it."""
    # As `python -m stream_gateway` runs it: a browser that leaves cancels its handler.
    server = TestServer(app if app is not None else create_app(settings), handler_cancellation=True)
    await server.start_server()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    timeout = httpx.Timeout(10, read=None)
    try:
        async with httpx.AsyncClient(
            base_url=str(server.make_url("")), limits=limits, timeout=timeout
        ) as http:
            await wait_ready(http)
            yield http
    finally:
        await server.close()


@pytest.fixture
async def gateway(gateway_settings: Settings, store: Store) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(gateway_settings) as http:
        yield http


@pytest.fixture
async def ingest(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, store: Store
) -> Client:
    client = await aiohttp_client(create_ingest_app(settings))
    await until_ready(str(client.make_url("")), 5)
    return client


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


async def pay(ingest: Client, session: dict[str, Any]) -> None:
    body = signed_webhook(session["orderCode"], session["amount"])
    resp = await ingest.post("/api/webhooks", json=body)
    assert resp.status == 200, await resp.text()


class Stream:
    """One open SSE stream as a browser's EventSource would read it."""

    def __init__(self, source: EventSource) -> None:
        self.response = source.response
        self._events = source.aiter_sse()

    async def next(self, timeout: float = 10) -> ServerSentEvent:
        async with asyncio.timeout(timeout):
            while True:
                event = await anext(self._events)
                # EventSource dispatches nothing for a block without data (a keep-alive
                # comment, a bare `retry:`); httpx-sse 0.4 yields those once an id was seen.
                if event.data:
                    return event

    async def status(self, timeout: float = 10) -> str:
        return str(json.loads((await self.next(timeout)).data)["status"])

    async def closed(self, timeout: float = 10) -> bool:
        """True once the server ended the stream (no further event arrived)."""
        async with asyncio.timeout(timeout):
            async for event in self._events:
                if event.data:
                    return False
        return True


@contextlib.asynccontextmanager
async def open_stream(
    http: httpx.AsyncClient, uuid: str, headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    async with aconnect_sse(
        http, "GET", STREAM, params={"uuid": uuid}, headers=dict(headers or {})
    ) as src:
        yield Stream(src)


async def stats(http: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await http.get("/api/stats")).json()
    return body


async def wait_for_stats(http: httpx.AsyncClient, connections: int, subscriptions: int) -> None:
    async with asyncio.timeout(10):
        while True:
            s = await stats(http)
            if (s["connectionCount"], s["activeSubscriptions"]) == (connections, subscriptions):
                return
            await asyncio.sleep(0.02)


async def numsub(redis: Redis, uuid: str) -> int:
    [(_, count)] = await redis.pubsub_numsub(keys.status_channel(uuid))
    return int(count)


async def wait_numsub(redis: Redis, uuid: str, expected: int) -> None:
    async with asyncio.timeout(10):
        while await numsub(redis, uuid) != expected:
            await asyncio.sleep(0.02)


async def redis_clients(redis: Redis, role: str) -> list[dict[str, Any]]:
    clients: list[dict[str, Any]] = await redis.client_list()
    return [
        c for c in clients if c["name"].startswith("stream-gateway-") and c["name"].endswith(role)
    ]


# -- the stream ----------------------------------------------------------------------------


async def test_paid_after_connect_done_arrives_and_stream_closes(
    gateway: httpx.AsyncClient, ingest: Client, store: Store
) -> None:
    session = await add_session(store, amount=25_000)
    async with open_stream(gateway, session["uuid"]) as stream:
        assert await stream.status() == "pending"
        await pay(ingest, session)
        done = await stream.next()
        assert await stream.closed()
    data = json.loads(done.data)
    assert (data["uuid"], data["orderCode"], data["status"]) == (
        session["uuid"],
        session["orderCode"],
        "done",
    )
    assert (data["amount"], data["amountPaid"]) == (25_000, 25_000)
    assert done.id == str(data["version"])


async def test_paid_before_connect_done_is_the_first_event(
    gateway: httpx.AsyncClient, ingest: Client, store: Store
) -> None:
    session = await add_session(store)
    await pay(ingest, session)
    async with open_stream(gateway, session["uuid"]) as stream:
        assert await stream.status() == "done"
        assert await stream.closed()


async def test_first_event_carries_version_as_id_and_a_jittered_retry_hint(
    gateway: httpx.AsyncClient, gateway_settings: Settings, store: Store
) -> None:
    session = await add_session(store)
    async with open_stream(gateway, session["uuid"]) as stream:
        first = await stream.next()
        assert stream.response.headers["content-type"] == "text/event-stream"
    assert first.id == "1"
    assert first.retry is not None
    assert (
        0.75 * gateway_settings.sse_retry_ms <= first.retry <= 1.25 * gateway_settings.sse_retry_ms
    )


async def test_500_streams_on_one_order_all_receive_done_over_one_pubsub_connection(
    gateway: httpx.AsyncClient, ingest: Client, store: Store, redis: Redis
) -> None:
    session = await add_session(store)
    async with contextlib.AsyncExitStack() as stack:
        streams = await asyncio.gather(
            *(stack.enter_async_context(open_stream(gateway, session["uuid"])) for _ in range(500))
        )
        assert {await s.status() for s in streams} == {"pending"}
        assert await numsub(redis, session["uuid"]) == 1
        assert len(await redis_clients(redis, "-pubsub")) == 1
        assert len(await redis_clients(redis, "-commands")) <= 1
        assert (await stats(gateway))["connectionCount"] == 500
        await pay(ingest, session)
        statuses = await asyncio.gather(*(s.status() for s in streams))
        closed = await asyncio.gather(*(s.closed() for s in streams))
    assert statuses == ["done"] * 500
    assert all(closed)
    await wait_for_stats(gateway, 0, 0)


@pytest.mark.parametrize("final", ["expired", "cancelled"])
async def test_an_expired_or_cancelled_event_closes_the_stream_and_is_not_sent_again(
    gateway: httpx.AsyncClient, store: Store, settings: Settings, redis: Redis, final: str
) -> None:
    session = await add_session(store)
    async with open_stream(gateway, session["uuid"]) as stream:
        assert await stream.status() == "pending"
        # What session-api's cleanup (or a cancel) does: close the session, then publish it.
        doc = await store.sessions.find_one_and_update(
            {"uuid": session["uuid"]},
            {"$set": {"status": final}, "$inc": {"version": 1}},
            return_document=ReturnDocument.AFTER,
            projection={"_id": 0},
        )
        assert doc is not None
        assert await StatusCache(redis).put(StatusEvent.from_session(doc))
        closing = await stream.next()
        assert await stream.closed()
    assert (json.loads(closing.data)["status"], closing.id) == (final, "2")
    # Seen: EventSource is told to stop reconnecting.
    resp = await gateway.get(
        "/api/webhooks/stream", params={"uuid": session["uuid"]}, headers={"Last-Event-ID": "2"}
    )
    assert resp.status_code == 204


async def test_each_version_is_sent_once(
    gateway: httpx.AsyncClient, ingest: Client, store: Store, redis: Redis
) -> None:
    session = await add_session(store, amount=30_000)
    async with open_stream(gateway, session["uuid"]) as stream:
        await stream.next()
        body = signed_webhook(session["orderCode"], 10_000)
        assert (await ingest.post("/api/webhooks", json=body)).status == 200
        partial = await stream.next()
        # The same state published again (a cache refill, a second replica's resync).
        await redis.publish(keys.status_channel(session["uuid"]), partial.data)
        await pay(ingest, {**session, "amount": 20_000})
        done = await stream.next()
    assert json.loads(partial.data)["amountPaid"] == 10_000
    assert json.loads(done.data)["status"] == "done"
    assert int(partial.id) < int(done.id)


# -- resuming with Last-Event-ID -----------------------------------------------------------


async def test_resume_with_older_last_event_id_sends_the_newer_status(
    gateway: httpx.AsyncClient, ingest: Client, store: Store
) -> None:
    session = await add_session(store)
    await pay(ingest, session)
    async with open_stream(gateway, session["uuid"], {"Last-Event-ID": "1"}) as stream:
        assert await stream.status() == "done"
        assert await stream.closed()


async def test_resume_of_a_final_status_already_seen_is_204(
    gateway: httpx.AsyncClient, ingest: Client, store: Store
) -> None:
    session = await add_session(store)
    await pay(ingest, session)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    resp = await gateway.get(
        STREAM,
        params={"uuid": session["uuid"]},
        headers={"Last-Event-ID": str(stored["version"])},
    )
    assert resp.status_code == 204
    await wait_for_stats(gateway, 0, 0)


async def test_a_new_eventsource_says_its_version_in_the_query_and_gets_204_for_a_final_one(
    gateway: httpx.AsyncClient, ingest: Client, store: Store
) -> None:
    """A page opening a new EventSource after one gave up cannot send Last-Event-ID."""
    session = await add_session(store)
    await pay(ingest, session)
    resp = await gateway.get(STREAM, params={"uuid": session["uuid"], "lastEventId": "2"})
    assert resp.status_code == 204
    # The header, when there is one, is what EventSource says: it wins.
    async with aconnect_sse(
        gateway,
        "GET",
        STREAM,
        params={"uuid": session["uuid"], "lastEventId": "2"},
        headers={"Last-Event-ID": "1"},
    ) as src:
        assert json.loads((await Stream(src).next()).data)["status"] == "done"


@pytest.mark.parametrize("version", ["\u00b2", "\u0662", "-1", "1e3"])
async def test_a_version_that_is_not_ascii_digits_counts_as_none(
    gateway: httpx.AsyncClient, ingest: Client, store: Store, version: str
) -> None:
    # "²" and "٢" are digits to str.isdigit; the schema fuzzer found "²" made a 500.
    session = await add_session(store)
    await pay(ingest, session)
    async with aconnect_sse(
        gateway, "GET", STREAM, params={"uuid": session["uuid"], "lastEventId": version}
    ) as src:
        assert src.response.status_code == 200
        assert json.loads((await Stream(src).next()).data)["status"] == "done"


async def test_resume_of_a_pending_status_already_seen_waits_for_the_change(
    gateway: httpx.AsyncClient, ingest: Client, store: Store
) -> None:
    session = await add_session(store)
    async with open_stream(gateway, session["uuid"], {"Last-Event-ID": "1"}) as stream:
        await wait_for_stats(gateway, 1, 1)
        await pay(ingest, session)
        first = await stream.next()
    assert json.loads(first.data)["status"] == "done"


# -- bad requests, CORS, timers ------------------------------------------------------------


async def test_malformed_uuid_is_400_json_before_any_stream(gateway: httpx.AsyncClient) -> None:
    resp = await gateway.get(STREAM, params={"uuid": "not-a-uuid"})
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["success"] is False


async def test_unknown_uuid_is_404_json_and_subscribes_nothing(
    gateway: httpx.AsyncClient,
) -> None:
    resp = await gateway.get(STREAM, params={"uuid": "0b7b2b0e-8a8f-4f5e-9c1e-1d2f3a4b5c6d"})
    assert resp.status_code == 404
    assert resp.json() == {"success": False, "error": "no session with this uuid"}
    await wait_for_stats(gateway, 0, 0)


async def test_cors_allowed_origin_is_echoed_on_the_stream(
    gateway: httpx.AsyncClient, store: Store
) -> None:
    session = await add_session(store)
    async with open_stream(gateway, session["uuid"], {"Origin": ALLOWED_ORIGIN}) as stream:
        headers = stream.response.headers
    assert headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert headers["vary"] == "Origin"


async def test_cors_other_origin_gets_no_cors_headers(
    gateway: httpx.AsyncClient, store: Store
) -> None:
    session = await add_session(store)
    async with open_stream(gateway, session["uuid"], {"Origin": "https://evil.example"}) as s:
        headers = s.response.headers
    bad = await gateway.get(STREAM, params={"uuid": "x"}, headers={"Origin": ALLOWED_ORIGIN})
    assert "access-control-allow-origin" not in headers
    assert bad.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


async def test_keepalive_comments_flow_while_waiting(
    gateway: httpx.AsyncClient, store: Store
) -> None:
    session = await add_session(store)
    async with gateway.stream("GET", STREAM, params={"uuid": session["uuid"]}) as resp:
        lines = resp.aiter_lines()
        async with asyncio.timeout(5):
            while (await anext(lines)) != ": ping":
                pass


async def test_max_wait_ends_the_stream(gateway_settings: Settings, store: Store) -> None:
    session = await add_session(store)
    async with (
        running_gateway(dataclasses.replace(gateway_settings, sse_max_wait_seconds=0.5)) as http,
        open_stream(http, session["uuid"]) as stream,
    ):
        assert await stream.status() == "pending"
        assert await stream.closed(timeout=5)
        await wait_for_stats(http, 0, 0)


# -- leaks, faults, several processes ------------------------------------------------------


async def open_raw_stream(url: httpx.URL, uuid: str) -> asyncio.StreamWriter:
    """A bare TCP client that reads the first event of a stream, then just holds the socket."""
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        f"GET {STREAM}?uuid={uuid} HTTP/1.1\r\nHost: {url.host}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    async with asyncio.timeout(10):
        await reader.readuntil(b"data: ")
    return writer


async def test_vanished_clients_release_their_subscriptions(
    gateway: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    sessions = [await add_session(store) for _ in range(5)]
    writers = [
        await open_raw_stream(gateway.base_url, s["uuid"]) for s in sessions for _ in range(4)
    ]
    await wait_for_stats(gateway, 20, 5)
    assert await numsub(redis, sessions[0]["uuid"]) == 1
    # Every socket dropped at once, without a goodbye (a closed laptop lid, a killed tab).
    for writer in writers:
        writer.transport.abort()
    await wait_for_stats(gateway, 0, 0)
    for s in sessions:
        await wait_numsub(redis, s["uuid"], 0)


async def test_redis_restart_while_streams_wait_still_delivers_done(
    gateway: httpx.AsyncClient, ingest: Client, store: Store, servers: Backends
) -> None:
    sessions = [await add_session(store) for _ in range(10)]
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(open_stream(gateway, s["uuid"]))
            for s in sessions
            for _ in range(3)
        ]
        assert {await s.status() for s in streams} == {"pending"}
        servers.redis.stop()
        # Still ready (new streams read MongoDB), reported degraded.
        ready = await gateway.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        # Payments land while Redis is down: stored in MongoDB, acknowledged to PayOS.
        for session in sessions:
            await pay(ingest, session)
        servers.redis.start()
        statuses = await asyncio.gather(*(s.status(timeout=20) for s in streams))
    assert statuses == ["done"] * 30
    await wait_ready(gateway)


async def test_stream_opened_while_redis_is_down_gets_done_after_it_returns(
    gateway: httpx.AsyncClient, ingest: Client, store: Store, servers: Backends
) -> None:
    session = await add_session(store)
    servers.redis.stop()
    async with open_stream(gateway, session["uuid"]) as stream:
        # Read from MongoDB while the cache is away.
        assert await stream.status() == "pending"
        await pay(ingest, session)
        servers.redis.start()
        assert await stream.status(timeout=20) == "done"


async def test_a_browser_leaving_before_its_subscribe_is_confirmed_leaves_no_subscription(
    gateway: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    session = await add_session(store)
    uuid = session["uuid"]
    # Redis stalls (a busy or failing-over server): the SUBSCRIBE waits unconfirmed.
    await redis.client_pause(1500)
    _, writer = await asyncio.open_connection(gateway.base_url.host, gateway.base_url.port)
    writer.write(f"GET {STREAM}?uuid={uuid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.3)
    assert (await stats(gateway))["activeSubscriptions"] == 1  # joined, waiting
    writer.transport.abort()  # the browser goes while the join waits
    await wait_for_stats(gateway, 0, 0)
    # Once Redis answers again, the late SUBSCRIBE is undone: nobody is subscribed.
    await wait_numsub(redis, uuid, 0)
    await asyncio.sleep(1.5)  # past the pause: the confirmation, then the UNSUBSCRIBE
    await wait_numsub(redis, uuid, 0)
    assert (await stats(gateway))["activeSubscriptions"] == 0


async def test_a_reconnect_repairs_a_done_the_redis_failover_lost(
    gateway: httpx.AsyncClient, store: Store, redis: Redis
) -> None:
    """A failover lost the `done` write and its publish; the ingest saw success, so nothing
    is marked for re-publication. The gateway's re-read after reconnecting goes to MongoDB,
    tells the browser, and repairs the cache for pollers and other gateways."""
    session = await add_session(store)
    uuid = session["uuid"]
    async with open_stream(gateway, uuid) as stream:
        assert await stream.status() == "pending"  # the cache now holds pending, v1
        await store.sessions.update_one(
            {"uuid": uuid},
            {"$set": {"status": "completed", "amountPaid": session["amount"], "version": 2}},
        )
        # The failover: the gateway's pub/sub connection is cut, the cache still says pending.
        await redis.client_kill_filter(_type="pubsub")
        assert await stream.status(timeout=10) == "done"
    cached = await StatusCache(redis).get(uuid)
    assert cached is not None and (cached.status, cached.version) == ("done", 2)


async def test_a_hub_task_that_dies_is_restarted_and_pushes_flow_again(
    gateway_settings: Settings, store: Store, ingest: Client
) -> None:
    app = create_app(gateway_settings)
    server = TestServer(app, handler_cancellation=True)
    await server.start_server()
    try:
        async with httpx.AsyncClient(
            base_url=str(server.make_url("")), timeout=httpx.Timeout(10, read=None)
        ) as http:
            await wait_ready(http)
            supervisor = app[SUPERVISOR]
            reader = supervisor.states()
            assert reader["hub-reader"] == "running"
            [task] = [t for t in asyncio.all_tasks() if t.get_name() == "hub-reader"]
            task.cancel()  # dies, as by an exception nobody foresaw
            async with asyncio.timeout(5):
                while (await http.get("/readyz")).json()["status"] != "ready" or not any(
                    t.get_name() == "hub-reader" and not t.done() for t in asyncio.all_tasks()
                ):
                    await asyncio.sleep(0.02)
            health = (await http.get("/healthz")).json()
            assert health == {
                "status": "ok",
                "tasks": {
                    "mongo-indexes": "finished",
                    "hub-reader": "running",
                    "hub-flusher": "running",
                    "hub-reread": "running",
                    "stream-keepalive": "running",
                    "gc-full-collection": "running",
                },
            }
            assert (
                'paypush_task_restarts_total{task="hub-reader"} 1.0'
                in (await http.get("/metrics")).text
            )
            session = await add_session(store)
            async with open_stream(http, session["uuid"]) as stream:
                assert await stream.status() == "pending"
                await pay(ingest, session)
                assert await stream.status() == "done"
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def gateway_processes(
    settings: Settings, servers: Backends, count: int
) -> AsyncIterator[list[tuple[Process, httpx.AsyncClient]]]:
    """`count` gateways as their own processes (`python -m stream_gateway`) on one Redis."""
    procs: list[Process] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for i in range(count):
                proc = service_process(
                    settings, "stream-gateway", servers.dir, label=f"gateway-{i}"
                )
                procs.append(proc)
                await asyncio.to_thread(proc.start)
                http = httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{proc.port}", timeout=httpx.Timeout(10, read=None)
                )
                clients.append(await stack.enter_async_context(http))
                await wait_ready(http)
            yield list(zip(procs, clients, strict=True))
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.stop)


async def test_two_gateway_processes_on_one_redis_both_deliver(
    gateway_settings: Settings, servers: Backends, ingest: Client, store: Store, redis: Redis
) -> None:
    session = await add_session(store)
    async with (
        gateway_processes(gateway_settings, servers, 2) as two_gateways,
        contextlib.AsyncExitStack() as stack,
    ):
        streams = [
            await stack.enter_async_context(open_stream(http, session["uuid"]))
            for _, http in two_gateways
            for _ in range(3)
        ]
        assert {await s.status() for s in streams} == {"pending"}
        # One subscription per process, however many streams each holds.
        assert await numsub(redis, session["uuid"]) == 2
        await pay(ingest, session)
        statuses = await asyncio.gather(*(s.status() for s in streams))
    assert statuses == ["done"] * 6


async def test_sigterm_ends_open_streams_and_exits_within_the_shutdown_timeout(
    gateway_settings: Settings, servers: Backends, store: Store
) -> None:
    session = await add_session(store)
    async with gateway_processes(gateway_settings, servers, 1) as [(proc, http)]:
        async with open_stream(http, session["uuid"]) as stream:
            assert await stream.status() == "pending"
            assert proc.proc is not None
            os.kill(proc.pid, signal.SIGTERM)
            # The stream ends (the browser reconnects, to another replica) ...
            assert await stream.closed(timeout=5)
        # ... and the process is gone well within its shutdown timeout (3 s here).
        assert await asyncio.to_thread(proc.proc.wait, 3) == 0


async def test_draining_after_sigterm_restarts_no_background_task(
    gateway_settings: Settings, store: Store
) -> None:
    """SIGTERM runs the shutdown handlers (the hub is closing, its streams are ended) well
    before the cleanup stops the hub's tasks: in between, none of them may end, or the
    supervisor takes it for a death and restarts it again and again."""
    session = await add_session(store)
    app = create_app(gateway_settings)
    async with running_gateway(gateway_settings, app) as http:
        async with open_stream(http, session["uuid"]) as stream:
            assert await stream.status() == "pending"
            await app.on_shutdown.send(app)  # what SIGTERM runs first
            assert await stream.closed(timeout=5)
        await asyncio.sleep(0.5)
        health = (await http.get("/healthz")).json()
        assert health["status"] == "ok", health
        assert set(health["tasks"].values()) <= {"running", "finished"}, health
        assert "paypush_task_restarts_total{" not in (await http.get("/metrics")).text


async def test_a_stream_still_joining_when_sigterm_comes_is_ended_as_well(
    gateway_settings: Settings, servers: Backends, store: Store
) -> None:
    """A stream whose join is under way when SIGTERM runs the shutdown handlers is not among
    the open streams they end: it ends by itself once joined (after its first event), or the
    drain would wait for it until the shutdown timeout."""
    session = await add_session(store)
    app = create_app(gateway_settings)

    async with running_gateway(gateway_settings, app) as http:

        async def browser() -> tuple[str, bool]:
            async with open_stream(http, session["uuid"]) as stream:
                return await stream.status(), await stream.closed(timeout=5)

        os.kill(servers.redis.pid, signal.SIGSTOP)  # the join waits for its confirmation
        try:
            opening = asyncio.create_task(browser())
            async with asyncio.timeout(5):
                while app[HUB].subscription_count == 0:
                    await asyncio.sleep(0.01)
            await app.on_shutdown.send(app)  # what SIGTERM runs first
        finally:
            os.kill(servers.redis.pid, signal.SIGCONT)
        assert await opening == ("pending", True)


# -- ops ---------------------------------------------------------------------------------


async def test_metrics_count_streams_subscriptions_and_deliveries(
    gateway: httpx.AsyncClient, ingest: Client, store: Store
) -> None:
    session = await add_session(store)
    async with open_stream(gateway, session["uuid"]) as stream:
        await stream.next()
        during = (await gateway.get("/metrics")).text
        await pay(ingest, session)
        await stream.next()
    await wait_for_stats(gateway, 0, 0)
    after = (await gateway.get("/metrics")).text
    assert "paypush_stream_open 1.0" in during
    assert "paypush_stream_subscriptions 1.0" in during
    assert 'paypush_stream_events_delivered_total{origin="push"} 1.0' in after
    assert "paypush_stream_delivery_seconds_count 1.0" in after
    assert "paypush_stream_open 0.0" in after


async def test_readiness_requires_accepting_and_watches_the_backends(
    gateway: httpx.AsyncClient,
) -> None:
    body = (await gateway.get("/readyz")).json()
    assert body["checks"] == {"accepting": "ok", "redis": "ok", "mongodb": "ok", "pubsub": "ok"}
    assert body["required"] == ["accepting"]


def test_app_factory_builds_without_connecting(settings: Settings) -> None:
    assert isinstance(create_app(settings), web.Application)


async def test_a_pubsub_link_silent_even_to_its_ping_fails_on_its_own(
    settings: Settings, servers: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link owns its liveness: a quiet connection is pinged, a dead one raises from read."""
    monkeypatch.setattr(links, "DEAD_AFTER_SECONDS", 0.6)
    redis = Redis.from_url(settings.redis_url)
    link = links.PubSubLink(redis)
    try:
        await link.open()
        assert await link.read(idle=0.1) is None  # quiet: pinged
        message = await link.read(idle=1.0)
        assert message is not None and message.kind == "pong"  # ... and alive
        os.kill(servers.redis.pid, signal.SIGSTOP)  # now nothing answers, not even PONG
        try:
            with pytest.raises(TimeoutError, match="silent, even to PING"):
                async with asyncio.timeout(5):
                    while True:
                        assert await link.read(idle=0.1) is None
        finally:
            os.kill(servers.redis.pid, signal.SIGCONT)
    finally:
        await link.close()
        await redis.aclose()
