"""Small builders shared by the tests: sessions in MongoDB, signed webhooks, a subscriber,
the PayOS simulator delivering to a real ingest (`Sim`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from payos import AsyncPayOS
from playwright.async_api import Page, ViewportSize
from redis.asyncio import Redis

from devstack.browser import chromium
from devstack.payos_simulator import create_app as create_simulator
from devstack.payos_simulator.state import VN, Transaction, new_reference, vn_now
from devstack.payos_simulator.webhooks import webhook_body
from devstack.servers import Process
from devstack.system import Backends, System, plan, running, wait_ready
from shared import keys
from shared.model import StatusEvent, new_session, utcnow
from shared.mongo import Store
from shared.payos_client import payos_client
from shared.settings import Settings
from webhook_ingest import create_app as create_ingest

TEST_CHECKSUM_KEY = "test-checksum-key"


async def add_session(
    store: Store, *, amount: int = 50_000, account: str = "0001112223", **fields: Any
) -> dict[str, Any]:
    """Store a new pending session, as session-api would, and return it."""
    doc = new_session(
        uuid=str(uuidlib.uuid4()),
        order_code=secrets.randbelow(10**12) + 1,
        account_number=account,
        amount=amount,
        description="NAPTIEN",
        now=utcnow(),
        ttl_seconds=keys.SESSION_TTL_SECONDS,
    )
    doc.update(fields)
    await store.sessions.insert_one(dict(doc))
    doc.pop("_id", None)
    return doc


def signed_webhook(
    order_code: int,
    amount: int,
    *,
    reference: str | None = None,
    key: str = TEST_CHECKSUM_KEY,
    code: str = "00",
    made_at: datetime | None = None,
    description: str = "NAPTIEN",
) -> dict[str, Any]:
    """A webhook body exactly as PayOS (and our simulator) sends it; `made_at`: when the
    transfer was made (default now), written in Vietnam time as PayOS does."""
    when = vn_now() if made_at is None else made_at.astimezone(VN).replace(microsecond=0)
    tx = Transaction(reference or new_reference(), amount, description, when)
    return webhook_body(
        order_code=order_code,
        link_id="link-" + secrets.token_hex(4),
        description=description,
        tx=tx,
        checksum_key=key,
        code=code,
    )


class Subscriber:
    """A real Redis pub/sub subscriber on one session's channel, collecting its events."""

    def __init__(self, redis: Redis, uuid: str) -> None:
        self.events: list[StatusEvent] = []
        self._redis = redis
        self._uuid = uuid
        self._arrived = asyncio.Event()
        self._sentinels: dict[bytes, asyncio.Event] = {}

    async def run(self, ready: asyncio.Event) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(keys.status_channel(self._uuid))
            ready.set()
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is None:
                    continue
                if msg["data"] in self._sentinels:
                    self._sentinels[msg["data"]].set()
                    continue
                self.events.append(StatusEvent.from_json(msg["data"]))
                self._arrived.set()

    async def settle(self, timeout: float = 5.0) -> list[StatusEvent]:
        """Every event published before this call, and only those: a sentinel is published
        on the channel and awaited. Redis delivers one channel's messages in the order it ran
        the PUBLISH commands, so whatever was published earlier has arrived by then — no
        "sleep, then assert nothing arrived", which passes whenever the sleep is too short."""
        sentinel = b"sentinel-" + secrets.token_hex(8).encode()
        seen = self._sentinels[sentinel] = asyncio.Event()
        await self._redis.publish(keys.status_channel(self._uuid), sentinel)
        async with asyncio.timeout(timeout):
            await seen.wait()
        return list(self.events)

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[StatusEvent]:
        async with asyncio.timeout(timeout):
            while len(self.events) < n:
                self._arrived.clear()
                await self._arrived.wait()
        return self.events


@contextlib.asynccontextmanager
async def subscribed(redis_url: str, uuid: str) -> AsyncIterator[Subscriber]:
    """Subscribe to `uuid`'s channel for the duration of the block."""
    redis = Redis.from_url(redis_url)
    sub = Subscriber(redis, uuid)
    ready = asyncio.Event()
    task = asyncio.create_task(sub.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        yield sub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()


@dataclass
class Sim:
    """The PayOS simulator delivering webhooks to a real ingest, its controls, and the
    unmodified payos SDK pointed at it."""

    url: str
    ingest_url: str
    http: aiohttp.ClientSession
    payos: AsyncPayOS

    async def faults(self, mode: str, delay: float = 0.0) -> None:
        body = {"mode": mode, "delaySeconds": delay}
        async with self.http.post(f"{self.url}/sim/faults", json=body) as resp:
            assert resp.status == 200

    async def pay(self, ref: object, **body: Any) -> dict[str, Any]:
        async with self.http.post(f"{self.url}/sim/pay/{ref}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            result: dict[str, Any] = await resp.json()
            return result


@contextlib.asynccontextmanager
async def simulator_to_ingest(settings: Settings) -> AsyncIterator[Sim]:
    """A real webhook-ingest and the PayOS simulator (quick redeliveries) delivering to it,
    as test servers, once the ingest is ready."""
    ingest = TestServer(create_ingest(settings))
    await ingest.start_server()
    ingest_url = str(ingest.make_url("/api/webhooks"))
    sim_server = TestServer(
        create_simulator(
            Settings.from_env(
                {}, payos_checksum_key=settings.payos_checksum_key, payos_webhook_url=ingest_url
            ),
            retry_delays=(0.05, 0.1, 0.2),
        )
    )
    await sim_server.start_server()
    url = str(sim_server.make_url("")).rstrip("/")
    payos = payos_client(
        Settings.from_env({}, payos_checksum_key=settings.payos_checksum_key, payos_base_url=url)
    )
    try:
        await wait_ready(str(ingest.make_url("")).rstrip("/"), 5)
        async with aiohttp.ClientSession() as http:
            yield Sim(url, ingest_url, http, payos)
    finally:
        await payos.aclose()
        await sim_server.close()
        await ingest.close()


@contextlib.contextmanager
def paused(proc: Process) -> Iterator[None]:
    """SIGSTOP for the block: the process holds its connections and answers nothing."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def run_cleanup_job(settings: Settings) -> list[tuple[str, str, str]]:
    """One real run of the cleanup CronJob (`python -m session_api.cleanup`) on `settings`,
    pushing to a stand-in Pushgateway; what it pushed, as (method, path, body)."""
    pushed: list[tuple[str, str, str]] = []

    async def receive(request: web.Request) -> web.Response:
        pushed.append((request.method, request.path, await request.text()))
        return web.Response()

    gateway = web.Application()
    gateway.router.add_route("*", "/metrics/job/{job}", receive)
    server = TestServer(gateway)
    await server.start_server()
    try:
        env = {**settings.env(), "PUSHGATEWAY_URL": str(server.make_url("")).rstrip("/")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "session_api.cleanup",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await server.close()
    assert proc.returncode == 0, out.decode()
    return pushed


PHONE: ViewportSize = {"width": 390, "height": 844}


@contextlib.contextmanager
def system_over(servers: Backends, name: str, **settings: Any) -> Iterator[System]:
    """The whole system as processes over the suite's backends, in a database of its own
    (`name_…`), with `settings` over the defaults."""
    servers.ensure_running()
    base = Settings.from_env({}, log_level="WARNING", **settings)
    database = f"{name}_{secrets.token_hex(4)}"
    with running(plan(base, servers, database=database, owns_backends=False)) as system:
        yield system


@contextlib.asynccontextmanager
async def browser_page(
    viewport: ViewportSize = PHONE, locale: str = "vi-VN"
) -> AsyncIterator[Page]:
    """A page of a fresh headless Chromium; Vietnamese, as the shoppers' browsers are."""
    async with chromium() as browser:
        context = await browser.new_context(viewport=viewport, locale=locale)
        yield await context.new_page()
        await context.close()
