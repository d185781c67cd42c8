"""Ingest benchmark: signed webhooks for distinct pending sessions against one ingest process,
and its HTTP + signature path against a bare aiohttp handler, same client, same run.

    python -m bench.ingest [--per-level 800] [--concurrency 1 10 50] [--rounds 2]
                           [--compare 3000]

Prints, per concurrency: webhooks/s and acknowledgement latency. Then the HTTP + JSON +
signature path alone (bad signatures: 401, nothing stored) beside `bench.bare`, a bare
aiohttp handler that reads the body and answers a constant, served as the services are
(uvloop, no access log, same host): `--rounds` rounds of `--compare` requests each at
concurrency 50, the two in turn, server CPU per request from /proc and the ratio "CPU per
request vs bare aiohttp" (the accepted webhook's too). Then where the time goes: CPU seconds
per webhook of each process (ingest, MongoDB, Redis) over the run at concurrency 50, and each
step of the ingest timed alone in this process (signature check, MongoDB, Redis), so a
MongoDB stand-in that is the limit shows as such.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pymongo.errors import PyMongoError

from devstack.seed import store_pending_sessions
from devstack.servers import free_port
from devstack.system import Backends, plan, wait_ready
from shared.cache import StatusCache
from shared.clients import redis_client
from shared.ledger import Ledger
from shared.model import StatusEvent
from shared.mongo import Store, mongo_client
from shared.payments import Payments, Transaction
from shared.settings import Settings
from webhook_ingest.ingest import Ingestor
from webhook_ingest.payload import parse_webhook
from webhook_ingest.resync import Resync

from ._common import (
    AMOUNT,
    CHECKSUM_KEY,
    backends,
    bare_aiohttp,
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


async def steps_alone(
    settings: Settings, n: int, concurrency: int
) -> tuple[list[list[object]], float]:
    """Each step of the ingest timed on its own, in this process, at `concurrency`; and the
    signature check + parse's seconds per webhook."""
    store = Store(mongo_client(settings))
    redis = redis_client(settings)
    cache = StatusCache(redis)
    payments = Payments(store, Ledger(store), grace_seconds=900)
    ingestor = Ingestor(store, cache, Resync(store, cache), payments)
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

    rows: list[list[object]] = [
        ["signature check + parse", f"{parse_s / n * 1e6:.0f} µs", f"{n / parse_s:,.0f}/s"]
    ]
    try:
        record_s, _ = await timed(ingestor._record, webhooks)
        txs = [Transaction(w.order_code, w.reference, w.amount, w.data) for w in webhooks]
        apply_s, applied = await timed(payments.apply, txs)
        events = [StatusEvent.from_session(a.session) for a in applied]
        redis_s, _ = await timed(cache.put, events)
    except PyMongoError as exc:
        # A MongoDB stand-in slowed down by other work on the machine times out here.
        rows.append(["MongoDB steps", f"failed: {type(exc).__name__}", ""])
    else:
        mongo_s = record_s + apply_s
        rows += [
            ["MongoDB: store delivery", f"{record_s / n * 1e6:.0f} µs", f"{n / record_s:,.0f}/s"],
            ["MongoDB: complete session", f"{apply_s / n * 1e6:.0f} µs", f"{n / apply_s:,.0f}/s"],
            ["MongoDB: both (store step)", f"{mongo_s / n * 1e6:.0f} µs", f"{n / mongo_s:,.0f}/s"],
            ["Redis: cache + publish", f"{redis_s / n * 1e6:.0f} µs", f"{n / redis_s:,.0f}/s"],
        ]
    finally:
        await redis.aclose()
        await store.client.close()
    return rows, parse_s / n


@dataclass
class Measured:
    """One request path under the same load: its server process and what was measured."""

    name: str
    pid: int
    requests: int = 0
    cpu: float = 0.0
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def cpu_per_request(self) -> float:
        return self.cpu / max(self.requests, 1)

    async def fire(self, url: str, bodies: list[bytes], concurrency: int) -> None:
        cpu0 = cpu_seconds(self.pid)
        elapsed, lat, outcomes = await fire(url, bodies, concurrency)
        self.cpu += cpu_seconds(self.pid) - cpu0
        self.requests += len(bodies)
        self.rates.append(len(bodies) / elapsed)
        self.latencies += lat
        for k, v in outcomes.items():
            self.outcomes[k] = self.outcomes.get(k, 0) + v


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
            # The level of 50 (the last one if there is none): its CPU per webhook is quoted.
            if concurrency == (50 if 50 in args.concurrency else args.concurrency[-1]):
                cpu_rows = [
                    [
                        name,
                        f"{(cpu1[name] - cpu0[name]) / len(rest) * 1000:.2f} ms",
                        f"{(cpu1[name] - cpu0[name]) / elapsed * 100:.0f} %",
                    ]
                    for name in pids
                ]
                cpu_level = concurrency
                accepted_cpu, accepted_n = ingest_cpu, len(rest)
                accepted_rate = f"{len(rest) / elapsed:,.0f}"
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
        # The same signed bodies, each with one character more in its signature: the whole
        # HMAC is computed and compared, then 401 (logged as a warning), nothing stored.
        signed = (bodies * (args.compare // len(bodies) + 1))[: args.compare]
        rejected = [b.replace(b'"signature": "', b'"signature": "0') for b in signed]
        with bare_aiohttp(settings.env()) as bare:
            bare_url = f"http://127.0.0.1:{bare.port}/api/webhooks"
            paths = [
                Measured("ingest: signature rejected (401)", ingest.pid),
                Measured("bare aiohttp", bare.pid),
            ]
            await fire(url, rejected[:200], 50)  # warm-up
            await fire(bare_url, signed[:200], 50)
            for _ in range(args.rounds):
                await paths[0].fire(url, rejected, 50)
                await paths[1].fire(bare_url, signed, 50)
        assert paths[0].outcomes == {"http 401": paths[0].requests}, paths[0].outcomes
        assert paths[1].outcomes == {"completed": paths[1].requests}, paths[1].outcomes
        compared = paths[1].cpu_per_request
        print(
            f"\nthe HTTP + JSON + signature path beside a bare aiohttp POST handler (reads the "
            f"body, answers a constant): {args.rounds} round(s) of {args.compare} requests each "
            f"at concurrency 50, in turn (load average {os.getloadavg()[0]:.1f}):"
        )
        compare_rows: list[list[object]] = [
            [
                p.name,
                f"{p.requests:,}",
                " / ".join(f"{r:,.0f}" for r in p.rates),
                f"{percentile(p.latencies, 50) * 1000:.2f}",
                f"{percentile(p.latencies, 99) * 1000:.2f}",
                f"{p.cpu_per_request * 1e6:.0f}",
                f"{p.cpu_per_request / compared:.2f}x",
            ]
            for p in paths
        ]
        compare_rows.insert(
            1,
            [
                f"ingest: accepted (MongoDB + Redis), concurrency {cpu_level}",
                f"{accepted_n:,}",
                accepted_rate,
                "",
                "",
                f"{accepted_cpu * 1e6:.0f}",
                f"{accepted_cpu / compared:.2f}x",
            ],
        )
        headers = ["path", "requests", "requests/s (each round)", "p50 ms", "p99 ms"]
        headers += ["server CPU/request µs", "CPU per request vs bare aiohttp"]
        print(table(headers, compare_rows))
        print(
            f"\nCPU per webhook by process at concurrency {cpu_level} "
            "(a process at ~100 % of a core is the limit):"
        )
        print(table(["process", "CPU / webhook", "CPU busy"], cpu_rows))
    finally:
        await asyncio.to_thread(system.stop)
        await store.client.close()

    print(f"\neach ingest step alone, in this process, {args.steps} webhooks at concurrency 50:")
    steps, parse_s = await steps_alone(settings, args.steps, 50)
    print(table(["step", "wall / webhook", "throughput"], steps))
    rejected_cpu = paths[0].cpu_per_request
    print(
        f"\nthe signature check + parse alone is {parse_s / rejected_cpu:.0%} of the ingest's "
        f"CPU per rejected request ({parse_s * 1e6:.0f} of {rejected_cpu * 1e6:.0f} µs), "
        f"{parse_s / accepted_cpu:.0%} of an accepted one ({accepted_cpu * 1e6:.0f} µs)"
    )
    print("\nlatency detail (last level):", summary_ms(lat))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Small enough for the whole run to take about a minute on a stand-in at full speed.
    parser.add_argument("--per-level", type=int, default=800)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the bare comparison")
    parser.add_argument("--compare", type=int, default=3000, help="requests per round")
    args = parser.parse_args()
    with backends() as env:
        asyncio.run(run(args, env))


if __name__ == "__main__":
    main()
