"""Ingest benchmark: signed webhooks for distinct pending sessions against one ingest process.

    python -m bench.ingest [--per-level 2000] [--concurrency 1 10 50 100]

Prints, per concurrency: webhooks/s and acknowledgement latency; then where the time goes:
CPU seconds per webhook of each process (ingest, MongoDB, Redis) over the run at concurrency
50, and each step of the ingest timed alone in this process (signature check, MongoDB,
Redis), so a MongoDB stand-in that is the limit shows as such.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from devstack.seed import store_pending_sessions
from devstack.servers import free_port
from devstack.system import Backends, plan, wait_ready
from shared.cache import StatusCache
from shared.clients import redis_client
from shared.mongo import Store, mongo_client
from shared.settings import Settings
from webhook_ingest.ingest import Ingestor
from webhook_ingest.payload import parse_webhook
from webhook_ingest.resync import Resync

from ._common import (
    AMOUNT,
    CHECKSUM_KEY,
    backends,
    cpu_seconds,
    percentile,
    signed_body,
    summary_ms,
    table,
)


async def sessions_to_pay(store: Store, n: int) -> list[bytes]:
    """`n` pending sessions, and a signed webhook body paying each in full."""
    return [
        signed_body(doc["orderCode"])
        for doc in await store_pending_sessions(store, n, amount=AMOUNT)
    ]


async def fire(
    url: str, bodies: list[bytes], concurrency: int
) -> tuple[float, list[float], dict[str, int]]:
    """Send every body with `concurrency` workers; (elapsed, latencies, outcomes)."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    queue = iter(bodies)
    conn = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=conn) as http:

        async def worker() -> None:
            for body in queue:
                t0 = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as resp:
                    answer = await resp.json()
                    latencies.append(time.perf_counter() - t0)
                    key = answer.get("outcome") or f"http {resp.status}"
                    outcomes[key] = outcomes.get(key, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, outcomes


async def steps_alone(settings: Settings, n: int, concurrency: int) -> list[list[object]]:
    """Each step of the ingest timed on its own, in this process, at `concurrency`."""
    store = Store(mongo_client(settings))
    redis = redis_client(settings)
    cache = StatusCache(redis)
    ingestor = Ingestor(store, cache, Resync(store, cache))
    await store.ensure_indexes()
    bodies = await sessions_to_pay(store, n)
    webhooks = []
    t0 = time.perf_counter()
    for body in bodies:
        webhooks.append(parse_webhook(body, CHECKSUM_KEY))
    parse_s = time.perf_counter() - t0

    async def timed(
        op: Callable[[Any], Awaitable[Any]], items: list[Any]
    ) -> tuple[float, list[Any]]:
        results: list[Any] = [None] * len(items)
        it = iter(enumerate(items))

        async def worker() -> None:
            for i, item in it:
                results[i] = await op(item)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, results

    record_s, _ = await timed(ingestor._record, webhooks)
    apply_s, applied = await timed(ingestor._apply, webhooks)
    from shared.model import StatusEvent

    events = [StatusEvent.from_session(doc) for doc, _ in applied]
    redis_s, _ = await timed(cache.put, events)
    await redis.aclose()
    await store.client.close()
    mongo_s = record_s + apply_s
    rows: list[list[object]] = [
        ["signature check + parse", f"{parse_s / n * 1e6:.0f} µs", f"{n / parse_s:,.0f}/s"],
        ["MongoDB: store delivery", f"{record_s / n * 1e6:.0f} µs", f"{n / record_s:,.0f}/s"],
        ["MongoDB: complete session", f"{apply_s / n * 1e6:.0f} µs", f"{n / apply_s:,.0f}/s"],
        ["MongoDB: both (store step)", f"{mongo_s / n * 1e6:.0f} µs", f"{n / mongo_s:,.0f}/s"],
        ["Redis: cache + publish", f"{redis_s / n * 1e6:.0f} µs", f"{n / redis_s:,.0f}/s"],
    ]
    return rows


async def run(args: argparse.Namespace, env: Backends) -> None:
    assert env.mongo is not None, "the benchmark's own MongoDB stand-in"
    base = Settings.from_env(
        {},
        payos_checksum_key=CHECKSUM_KEY,
        log_level="WARNING",
        app_env="production",
        payos_client_id="bench",
        payos_api_key="bench",
        cron_secret="bench",
        admin_token="bench",
        webhook_ingest_port=free_port(),
    )
    system = plan(base, env, services=("webhook-ingest",), own_ports=True, owns_backends=False)
    settings, ingest = system.settings, system.ingest
    await asyncio.to_thread(system.start)
    url = f"{system.replica_url(ingest)}/api/webhooks"
    store = Store(mongo_client(settings))
    await wait_ready(system.replica_url(ingest))

    print(
        f"one webhook-ingest process (pid {ingest.pid}), {os.cpu_count()} cores, "
        f"{args.per_level} webhooks per level\n"
    )
    rows: list[list[object]] = []
    cpu_rows: list[list[object]] = []
    try:
        for concurrency in args.concurrency:
            bodies = await sessions_to_pay(store, args.per_level)
            await fire(url, bodies[: min(200, len(bodies))], concurrency)  # warm-up
            rest = bodies[min(200, len(bodies)) :]
            pids = {
                "ingest": ingest.pid,
                "mongodb stand-in": env.mongo.pid,
                "redis": env.redis.pid,
                "load client": os.getpid(),
            }
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            elapsed, lat, outcomes = await fire(url, rest, concurrency)
            cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
            ingest_cpu = (cpu1["ingest"] - cpu0["ingest"]) / len(rest)
            mongo_cpu = (cpu1["mongodb stand-in"] - cpu0["mongodb stand-in"]) / len(rest)
            rows.append(
                [
                    concurrency,
                    f"{len(rest) / elapsed:,.0f}",
                    f"{percentile(lat, 50) * 1000:.1f}",
                    f"{percentile(lat, 99) * 1000:.1f}",
                    f"{max(lat) * 1000:.1f}",
                    f"{ingest_cpu * 1000:.2f}",
                    f"{1 / ingest_cpu:,.0f}",
                    f"{mongo_cpu * 1000:.2f}",
                    ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
                ]
            )
            if concurrency == 50 or concurrency == args.concurrency[-1]:
                cpu_rows = [
                    [
                        name,
                        f"{(cpu1[name] - cpu0[name]) / len(rest) * 1000:.2f} ms",
                        f"{(cpu1[name] - cpu0[name]) / elapsed * 100:.0f} %",
                    ]
                    for name in pids
                ]
                cpu_level = concurrency
        print(
            table(
                [
                    "concurrency",
                    "webhooks/s",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "ingest CPU ms",
                    "ingest-only cap/s",
                    "mongo CPU ms",
                    "outcomes",
                ],
                rows,
            )
        )
        print(
            "(ingest-only cap = 1 / the ingest process's CPU per webhook: its ceiling on one "
            "core if MongoDB answered instantly)"
        )
        rejected = [b.replace(b'"signature": "', b'"signature": "0') for b in bodies[:2000]]
        elapsed, lat_r, outcomes_r = await fire(url, rejected * 2, 50)
        assert outcomes_r == {"http 401": len(rejected) * 2}, outcomes_r
        print(
            f"\nthe HTTP + JSON + signature path alone (bad signatures, 401, no store) at "
            f"concurrency 50: {len(rejected) * 2 / elapsed:,.0f} requests/s, {summary_ms(lat_r)}"
        )
        print(
            f"\nCPU per webhook by process at concurrency {cpu_level} "
            "(a process at ~100 % of a core is the limit):"
        )
        print(table(["process", "CPU / webhook", "CPU busy"], cpu_rows))
    finally:
        await asyncio.to_thread(system.stop)
        await store.client.close()

    print(f"\neach ingest step alone, in this process, {args.steps} webhooks at concurrency 50:")
    print(
        table(["step", "wall / webhook", "throughput"], await steps_alone(settings, args.steps, 50))
    )
    print("\nlatency detail (last level):", summary_ms(lat))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-level", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50, 100])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    with backends() as env:
        asyncio.run(run(args, env))


if __name__ == "__main__":
    main()
