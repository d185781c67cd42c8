"""The shop's events (issue 17): lag, catch-up after an outage, dispatcher CPU.

    python -m bench.outbox [--rate 100] [--seconds 20] [--backlog 10000] [--outage 600]

One webhook-ingest and one session-api process (the dispatcher) over a redis-server and a
MongoDB stand-in of the benchmark's own; the shop is a receiver in this process that verifies
every signature (the `standardwebhooks` library) and notes when each event id first arrived.

1. Lag: signed PayOS webhooks at `--rate` payments/s for `--seconds`, each completing a
   session; lag = first arrival at the shop minus the event's timestamp (taken by the ingest in
   the update that completes the session), p50/p99/max. Dispatcher CPU per delivered event:
   session-api's CPU time over the phase / events delivered (it does nothing else here).
2. Catch-up: a real outage — the shop answers 503 for `--outage` seconds (10 minutes by
   default) while `--backlog` completed sessions with their events are stored (written as
   the ingest writes them, in bulk), the dispatcher relaying and retrying on the production
   schedule (5 s, doubling) all along; then the shop answers again: time from its return
   until every event was delivered, and the dispatcher's CPU per event over that time. (A
   receiver back after failures makes every waiting retry due at once: session_api.dispatcher.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from devstack.seed import store_pending_sessions
from devstack.servers import Process, free_port
from devstack.system import service_process, start_ready
from shared import outbox
from shared.model import SessionStatus, new_session, utcnow
from shared.mongo import Store, mongo_client
from shared.settings import Settings

from ._common import AMOUNT, CHECKSUM_KEY, backends, cpu_seconds, percentile, signed_body, table

SECRET = "whsec_" + "QmVuY2hTZWNyZXRGb3JUaGVPdXRib3hCZW5jaG1hcms="


class Shop:
    """A receiver noting the first arrival of each event id (and verifying every one)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.first: dict[str, float] = {}
        self.timestamps: dict[str, datetime] = {}
        self.requests = 0
        # While down, every delivery is refused (503) and counted.
        self.down = False
        self.refused = 0
        self._verifier = Webhook(SECRET)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = self._verifier.verify(body, dict(request.headers))
        if self.down:
            self.refused += 1
            return web.Response(status=503)
        self.requests += 1
        if event["id"] not in self.first:
            self.first[event["id"]] = time.time()
            self.timestamps[event["id"]] = datetime.fromisoformat(
                event["timestamp"].replace("Z", "+00:00")
            )
        return web.Response(status=204)


async def until(condition: Any, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def lag_phase(
    ingest_url: str, store: Store, shop: Shop, api: Process, rate: float, seconds: float
) -> list[object]:
    n = int(rate * seconds)
    docs = await store_pending_sessions(store, n, amount=AMOUNT)
    bodies = [signed_body(d["orderCode"]) for d in docs]
    expected = {outbox.event_id(d["uuid"], "payment.completed") for d in docs}
    cpu0 = cpu_seconds(api.pid)
    redelivered = [0]
    conn = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=conn) as http:
        start = time.monotonic()

        async def one(i: int, body: bytes) -> None:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # As PayOS does: delivered again until acknowledged (a 503 under load).
            for attempt in range(20):
                async with http.post(
                    ingest_url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return
                redelivered[0] += 1
                await asyncio.sleep(0.5 * (attempt + 1))

        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        sent_for = time.monotonic() - start
    with contextlib.suppress(TimeoutError):
        await until(lambda: expected <= shop.first.keys(), 300, "every event delivered")
    cpu = cpu_seconds(api.pid) - cpu0
    arrived = [i for i in expected if i in shop.first]
    lags = [shop.first[i] - shop.timestamps[i].timestamp() for i in arrived]
    return [
        f"{n} payments offered at {rate:.0f}/s, sent in {sent_for:.1f} s "
        f"({redelivered[0]} redelivered after a 5xx), {len(arrived)} delivered",
        f"{percentile(lags, 50) * 1000:.0f} ms",
        f"{percentile(lags, 99) * 1000:.0f} ms",
        f"{max(lags) * 1000:.0f} ms",
        f"{cpu / max(len(arrived), 1) * 1000:.2f} ms",
    ]


async def store_completed(store: Store, n: int) -> None:
    """`n` completed sessions with their `payment.completed` events, written as the ingest
    writes them (in bulk: the benchmark measures the dispatcher, not the ingest)."""
    now = utcnow()
    for start in range(0, n, 250):
        batch = []
        for _ in range(min(250, n - start)):
            doc = new_session(
                uuid=secrets.token_hex(16),
                order_code=secrets.randbelow(10**12) + 1,
                account_number="0001112223",
                amount=AMOUNT,
                description="NAPTIEN",
                now=now,
                ttl_seconds=86400,
            )
            ref = "FT" + secrets.token_hex(6)
            doc.update(
                status=SessionStatus.COMPLETED.value,
                amountPaid=AMOUNT,
                references=[ref],
                version=2,
            )
            doc.update(outbox.initial(outbox.session_entry(outbox.EventType.COMPLETED, doc)))
            batch.append(doc)
        await store.sessions.insert_many(batch)


async def outage_phase(
    store: Store, shop: Shop, api: Process, n: int, outage: float
) -> list[object]:
    """A real receiver outage: the shop answers 503 for `outage` seconds while `n` events
    queue (stored at its start), the dispatcher running and retrying on the production
    schedule all along; then the shop answers again and the catch-up is timed from then."""
    shop.down = True
    began = time.monotonic()
    before = len(shop.first)
    await store_completed(store, n)
    await asyncio.sleep(max(0.0, outage - (time.monotonic() - began)))
    refused = shop.refused
    shop.down = False
    back = time.monotonic()
    cpu0 = cpu_seconds(api.pid)
    await until(lambda: len(shop.first) >= before + n, 1800, "the backlog delivered")
    took = time.monotonic() - back
    cpu = cpu_seconds(api.pid) - cpu0
    return [
        f"{n} events queued during a {outage:.0f} s outage ({refused} attempts refused)",
        f"{took:.1f} s",
        f"{n / took:.0f}/s",
        f"{cpu / n * 1000:.2f} ms",
    ]


async def run(args: argparse.Namespace) -> None:
    with backends() as env:
        shop = Shop(free_port())
        settings = Settings.from_env(
            {},
            redis_url=env.redis_url,
            mongodb_url=env.mongodb_url(),
            payos_checksum_key=CHECKSUM_KEY,
            log_level="WARNING",
            shop_webhook_url=(f"http://127.0.0.1:{shop.port}/hook",),
            shop_webhook_secret=(SECRET,),
            # The production retry schedule (5 s, doubling): what a real outage waits on.
            outbox_poll_seconds=0.05,
        )
        logs = env.dir / "logs"
        procs = [
            service_process(settings, name, logs) for name in ("webhook-ingest", "session-api")
        ]
        try:
            for proc in procs:
                await start_ready(proc, 30)
            api = procs[1]
            # The benchmark's own client waits longer: the stand-in is busy serving both services.
            store = Store(mongo_client(replace(settings, mongodb_timeout_ms=30_000)))
            await shop.start()
            lag = await lag_phase(
                f"http://127.0.0.1:{procs[0].port}/api/webhooks",
                store,
                shop,
                api,
                args.rate,
                args.seconds,
            )
            await shop.stop()
            print("\nEvent lag, change → first delivery (healthy shop)")
            print(table(["load", "p50", "p99", "max", "dispatcher CPU/event"], [lag]), flush=True)
            await shop.start()
            backlog = await outage_phase(store, shop, api, args.backlog, args.outage)
            await shop.stop()
            await store.client.close()
        finally:
            for proc in reversed(procs):
                proc.stop()
    print("\nCatch-up after an outage (the shop answering 503 while the backlog queued)")
    print(table(["backlog", "delivered in (from its return)", "rate", "CPU/event"], [backlog]))
    print(json.dumps({"lag": lag, "catchUp": backlog}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--outage", type=float, default=600.0, help="seconds the shop is down")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
