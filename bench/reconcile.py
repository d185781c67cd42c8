"""What reconciliation with PayOS costs, and how soon it tells a browser whose webhook was lost.

    python -m bench.reconcile [--pending 10000] [--payments 100] [--after 120] [--skip-latency]

Over a redis-server and MongoDB stand-in of its own, the PayOS simulator in a process of its
own (the reconciler talks to it through the unmodified payos SDK), the real `Reconciler` in
this process:

1. PayOS calls per pending session over its life: the backoff schedule the reconciler uses
   (`next_check`), for a session never paid in 24 h; and measured, the simulator's count of
   `payment_requests.get` calls per session in part 3.
2. The cost at `--pending` pending sessions (all past RECONCILE_AFTER_SECONDS): MongoDB
   commands (counted by a pymongo command listener) and this process's CPU per cycle, for
   the first cycle of a new lease holder (none checked yet), a cycle with its whole rate
   budget due, and an idle cycle (nothing due).
3. Dropped webhook → `done`: `--payments` sessions created at once, each paid at a random
   moment of its first minute with every webhook dropped, the reconciler at the defaults
   (RECONCILE_AFTER_SECONDS, 5 s cycles, 5 PayOS calls/s): time from the transfer to the
   `done` on the session's channel, median and max.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import time
from datetime import timedelta
from typing import Any

import aiohttp
from payos.types import CreatePaymentLinkRequest
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, monitoring
from redis.asyncio import Redis

from devstack.servers import free_port, python_service
from session_api.metrics import SessionMetrics
from session_api.reconciler import Reconciler, checks_over_life, next_check
from shared import keys
from shared.cache import StatusCache
from shared.ledger import Ledger
from shared.logs import configure_logging
from shared.model import StatusEvent, StreamStatus, new_session, utcnow
from shared.mongo import Store
from shared.payments import Payments
from shared.payos_client import payos_client
from shared.settings import Settings

from ._common import AMOUNT, CHECKSUM_KEY, backends, redis_for, table

DAY = 24 * 3600.0


class Commands(monitoring.CommandListener):
    """Every command this process sends to MongoDB."""

    def __init__(self) -> None:
        self.count = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in ("hello", "isMaster", "ping", "endSessions"):
            self.count += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def schedule_rows(after: float) -> list[list[object]]:
    session = {"expiresAt": utcnow() + timedelta(seconds=DAY)}
    start = time.time()
    at, n, offsets = start + after, 0, []
    while at > 0:
        n += 1
        offsets.append(at - start)
        at = next_check(session, n, at, after=after)
    shown = ", ".join(f"{o / 60:.0f}" for o in offsets[:6])
    return [
        ["checks (PayOS calls) over 24 h, never paid", checks_over_life(after=after, life=DAY)],
        ["checks, minutes after creation", f"{shown}, … the last {offsets[-1] / 3600:.2f} h"],
    ]


async def store_sessions(store: Store, n: int, age: float) -> list[dict[str, Any]]:
    created = utcnow() - timedelta(seconds=age)
    docs = [
        new_session(
            uuid=secrets.token_hex(16),
            order_code=secrets.randbelow(10**12) + 1,
            account_number="0001112223",
            amount=AMOUNT,
            description="NAPTIEN",
            now=created,
            ttl_seconds=keys.SESSION_TTL_SECONDS,
        )
        for _ in range(n)
    ]
    for i in range(0, n, 1000):
        await store.sessions.insert_many([dict(d) for d in docs[i : i + 1000]])
    return docs


def reconciler(
    store: Store, redis: Redis, payos: Any, settings: Settings, **options: Any
) -> Reconciler:
    return Reconciler(
        store=store,
        cache=StatusCache(redis),
        redis=redis,
        payos=payos,
        payments=Payments(store, Ledger(store), grace_seconds=settings.late_payment_grace_seconds),
        metrics=SessionMetrics.create(CollectorRegistry()),
        after_seconds=options.get("after", settings.reconcile_after_seconds),
        max_per_second=settings.reconcile_max_per_second,
        interval_seconds=settings.reconcile_interval_seconds,
        lease_seconds=settings.reconcile_lease_seconds,
        payos_timeout=settings.payos_timeout_seconds,
    )


async def cost(
    args: argparse.Namespace, store: Store, listener: Commands, rec: Reconciler
) -> list[list[object]]:
    await store_sessions(store, args.pending, age=args.after + 60)
    rows: list[list[object]] = []

    async def measure(label: str) -> None:
        before_q, before_cpu, t0 = listener.count, time.process_time(), time.perf_counter()
        stats = await rec.cycle()
        took = time.perf_counter() - t0
        cpu = time.process_time() - before_cpu
        rows.append(
            [
                label,
                stats.checked,
                listener.count - before_q,
                f"{cpu * 1000:.1f}",
                f"{took * 1000:,.0f}",
            ]
        )

    await measure("first cycle of a new holder (none checked)")
    await measure("a cycle with its rate budget due")
    # Every session checked once (as after the first 2 minutes of a holder's life): idle.
    await store.sessions.update_many({}, {"$set": {"checkAt": time.time() + 3600}})
    await measure("idle cycle (nothing due)")
    return rows


async def latency(
    args: argparse.Namespace,
    store: Store,
    redis: Redis,
    rec: Reconciler,
    payos: Any,
    sim_url: str,
) -> tuple[list[float], dict[int, int]]:
    await store.sessions.delete_many({})
    docs = await store_sessions(store, args.payments, age=0)
    for doc in docs:
        await payos.payment_requests.create(
            CreatePaymentLinkRequest(
                order_code=doc["orderCode"],
                amount=AMOUNT,
                description="NAPTIEN",
                cancel_url="http://127.0.0.1/",
                return_url="http://127.0.0.1/",
                expired_at=int(doc["expiresAt"].timestamp()),
            )
        )
    done_at: dict[str, float] = {}
    paid_at: dict[str, float] = {}
    pubsub = redis.pubsub()
    await pubsub.psubscribe(f"{keys.PREFIX}:events:*")

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] != "pmessage":
                continue
            event = StatusEvent.from_json(msg["data"])
            if event.status is StreamStatus.DONE:
                done_at.setdefault(event.uuid, time.monotonic())

    async with aiohttp.ClientSession() as http:
        await http.post(f"{sim_url}/sim/faults", json={"dropAllDeliveries": True})
        rng = random.Random(7)

        async def pay(doc: dict[str, Any]) -> None:
            await asyncio.sleep(rng.uniform(0, 60) * args.after / 120)
            paid_at[doc["uuid"]] = time.monotonic()
            async with http.post(f"{sim_url}/sim/pay/{doc['orderCode']}", json={}) as resp:
                assert (await resp.json())["delivered"] is False

        listener = asyncio.create_task(listen())
        from shared.tasks import Supervisor

        supervisor = Supervisor()
        rec.start(supervisor)
        await asyncio.gather(*(pay(d) for d in docs))
        async with asyncio.timeout(args.after * 10 + 600):
            while len(done_at) < len(docs):
                await asyncio.sleep(0.2)
        await rec.stop()
        await supervisor.stop()
        listener.cancel()
        async with http.get(f"{sim_url}/sim/calls") as resp:
            calls = {int(k): v for k, v in (await resp.json())["get"].items()}
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    return [done_at[u] - paid_at[u] for u in paid_at], calls


async def run(args: argparse.Namespace) -> None:
    with backends() as env:
        sim_port = free_port()
        settings = Settings.from_env(
            {},
            redis_url=env.redis_url,
            mongodb_url=env.mongodb_url(),
            payos_checksum_key=CHECKSUM_KEY,
            payos_base_url=f"http://127.0.0.1:{sim_port}",
            log_level="WARNING",
            reconcile_after_seconds=args.after,
        )
        sim = python_service(
            "payos-simulator",
            "devstack.payos_simulator",
            sim_port,
            {**settings.env(), "PAYOS_SIMULATOR_PORT": str(sim_port)},
            env.dir / "logs",
        )
        sim.start()
        configure_logging(settings)
        listener = Commands()
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            settings.mongodb_url, tz_aware=True, event_listeners=[listener]
        )
        store = Store(client)
        await store.ensure_indexes()
        redis = redis_for(settings.redis_url)
        payos = payos_client(settings)
        try:
            print("PayOS calls per pending session (the reconciler's backoff):")
            print(table(["", ""], schedule_rows(args.after)))
            rec = reconciler(store, redis, payos, settings, after=args.after)
            rows = await cost(args, store, listener, rec)
            print(
                f"\nreconciler cost at {args.pending:,} pending sessions "
                f"(cycle every {settings.reconcile_interval_seconds:g} s, "
                f"{settings.reconcile_max_per_second:g} PayOS calls/s):"
            )
            print(
                table(
                    ["cycle", "sessions asked", "MongoDB commands", "CPU ms", "wall ms"],
                    rows,
                )
            )
            if not args.skip_latency:
                times, calls = await latency(
                    args, store, redis, rec, payos, settings.payos_base_url
                )
                per = list(calls.values())
                print(
                    f"\ndropped webhook → `done`, {len(times)} payments, every webhook dropped, "
                    f"RECONCILE_AFTER_SECONDS={args.after:g}, each paid 0 to "
                    f"{60 * args.after / 120:g} s after its session was created:"
                )
                print(
                    table(
                        ["median s", "max s", "PayOS calls per session (max)"],
                        [
                            [
                                f"{statistics.median(times):.1f}",
                                f"{max(times):.1f}",
                                f"{statistics.mean(per):.2f} ({max(per)})",
                            ]
                        ],
                    )
                )
        finally:
            await payos.aclose()
            await redis.aclose()
            await client.close()
            sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--payments", type=int, default=100)
    parser.add_argument("--after", type=float, default=120.0, help="RECONCILE_AFTER_SECONDS")
    parser.add_argument("--skip-latency", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
