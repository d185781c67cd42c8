"""Replica benchmark: N browsers through nginx onto 1, then 2 gateway processes.

    python -m bench.replicas [--streams 3000] [--rate 300] [--ingest-payments 100]
                             [--ingest-rate 25] [--gateways 1,2]

For each gateway count: starts the replicated system (`devstack.replicas`: own redis-server,
MongoDB stand-in, PayOS simulator, one webhook-ingest and one session-api, the gateways,
Debian's nginx with the deploy configuration), stores N pending sessions and caches their
status (as session-api does on create), opens N SSE streams through nginx from
`CLIENT_PROCESSES` client processes (`devstack.sse.EventSourceClient`), then pays every
session: `--ingest-payments` as signed webhooks through nginx to webhook-ingest (bounded by
the SQLite-backed MongoDB stand-in), the rest straight into the status cache and feed
(`StatusCache.put`, what the ingest does last) at a steady `--rate`. Prints, per run, streams
held per replica, opening rate, gateway RSS and CPU, event latency p50/p99 (payment sent →
event read by the client) over all payments and for each path, and the 1 → 2 replica ratios.
The ingest's payments are a few percent of all, and slower (MongoDB): the overall p99 falls
among them, so it moves with the stand-in; "p99 direct" is the gateways' own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from devstack.replicas import running
from devstack.seed import store_pending_sessions
from devstack.servers import Process
from devstack.sse import EventSourceClient
from devstack.system import System
from shared.cache import StatusCache
from shared.model import StatusEvent
from shared.mongo import Store, mongo_client
from shared.settings import Settings

from ._common import (
    AMOUNT,
    CHECKSUM_KEY,
    Paid,
    cpu_seconds,
    paced,
    pay_directly,
    percentile,
    post_webhook,
    raise_nofile,
    reap,
    redis_for,
    rss_kib,
    signed_body,
    spawn_client,
    stop_clients,
    table,
)

CLIENT_PROCESSES = 2
STREAM_PATH = "/api/webhooks/stream"
# Streams a client process opens at once.
OPEN_CONCURRENCY = 200


# -- the client processes ----------------------------------------------------------------


async def client_main(base_url: str) -> None:
    """A client process: read uuids on stdin, hold a stream each, report when each is paid."""
    uuids: list[str] = json.loads(sys.stdin.readline())
    clients = [EventSourceClient(f"{base_url}{STREAM_PATH}?uuid={u}") for u in uuids]
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    tasks: list[asyncio.Task[str]] = []

    async def open_one(client: EventSourceClient) -> None:
        async with gate:
            task = asyncio.create_task(client.run())
            tasks.append(task)
            first = asyncio.ensure_future(client.first_event.wait())
            await asyncio.wait([task, first], return_when=asyncio.FIRST_COMPLETED)
            first.cancel()

    await asyncio.gather(*(open_one(c) for c in clients))
    opened = sum(1 for c in clients if c.first_event.is_set())
    print(json.dumps({"open": opened, "failures": len(clients) - opened}), flush=True)
    # The parent writes a line once every payment is made: the stragglers get a grace period.
    await asyncio.to_thread(sys.stdin.readline)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3):
            await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    done_at = {
        uuid: c.final_at
        for uuid, c in zip(uuids, clients, strict=True)
        if c.final_at is not None and c.status == "done"
    }
    print(json.dumps({"done_at": done_at}), flush=True)


# -- the parent ----------------------------------------------------------------------------


@dataclass
class Run:
    gateways: int
    held: list[int]  # streams per gateway, from each one's /api/stats
    open_seconds: float
    failures: int
    rss_kib: list[int]
    cpu_seconds: list[float]  # per gateway, during the payments
    ingest: list[float]  # latencies (s) of payments through the ingest
    direct: list[float]  # latencies (s) of payments straight into the cache and feed
    paid: int
    delivered: int
    direct_rate: float

    @property
    def latencies(self) -> list[float]:
        return self.ingest + self.direct


async def held_streams(http: aiohttp.ClientSession, system: System) -> list[int]:
    counts = []
    for gateway in system.gateways:
        async with http.get(f"{system.replica_url(gateway)}/api/stats") as resp:
            counts.append(int((await resp.json())["connectionCount"]))
    return counts


async def one_run(args: argparse.Namespace, gateways: int, run_dir: Path) -> Run:
    base = Settings.from_env({}, log_level="WARNING", payos_checksum_key=CHECKSUM_KEY)
    with running(base, run_dir, replicas=1, gateways=gateways) as system:
        return await measure(args, system)


async def measure(args: argparse.Namespace, system: System) -> Run:
    n = args.streams
    store = Store(mongo_client(system.settings))
    redis = redis_for(system.settings.redis_url)
    cache = StatusCache(redis)
    clients: list[subprocess.Popen[str]] = []
    gateways: list[Process] = system.gateways
    try:
        docs = await store_pending_sessions(store, n, amount=AMOUNT)
        for doc in docs:
            await cache.put(StatusEvent.from_session(doc))

        async with aiohttp.ClientSession() as http:
            t0 = time.monotonic()
            for i in range(CLIENT_PROCESSES):
                share = [d["uuid"] for d in docs[i::CLIENT_PROCESSES]]
                argv = ["bench.replicas", "--client", system.url]
                clients.append(await asyncio.to_thread(spawn_client, argv, share))
            failures = 0
            for p in clients:
                assert p.stdout is not None
                failures += json.loads(await asyncio.to_thread(p.stdout.readline))["failures"]
            open_seconds = time.monotonic() - t0
            await asyncio.sleep(1.0)
            held = await held_streams(http, system)
            rss = [rss_kib(g.pid) for g in gateways]
            cpu_before = [cpu_seconds(g.pid) for g in gateways]

            ingest_docs, direct_docs = docs[: args.ingest_payments], docs[args.ingest_payments :]
            url = f"{system.url}/api/webhooks"
            bodies = {d["uuid"]: signed_body(d["orderCode"]) for d in ingest_docs}

            async def via_ingest(doc: dict[str, Any]) -> bool:
                return await post_webhook(http, url, bodies[doc["uuid"]])

            async def direct(doc: dict[str, Any]) -> bool:
                return await pay_directly(cache, doc)

            paid_ingest, _ = await paced(ingest_docs, args.ingest_rate, 64, via_ingest)
            paid_direct, direct_s = await paced(direct_docs, args.rate, 64, direct)
            await asyncio.sleep(1.0)
            cpu = [cpu_seconds(g.pid) - c for g, c in zip(gateways, cpu_before, strict=True)]

        results: dict[str, float] = {}
        for report in await stop_clients(clients):
            results.update(report["done_at"])
    finally:
        reap(clients)
        await redis.aclose()
        await store.client.close()

    def latencies(paid: list[Paid]) -> list[float]:
        return [max(0.0, results[p.uuid] - p.sent) for p in paid if p.uuid in results]

    return Run(
        gateways=len(gateways),
        held=held,
        open_seconds=open_seconds,
        failures=failures,
        rss_kib=rss,
        cpu_seconds=cpu,
        ingest=latencies(paid_ingest),
        direct=latencies(paid_direct),
        paid=len(paid_ingest) + len(paid_direct),
        delivered=len(results),
        direct_rate=len(paid_direct) / max(direct_s, 1e-9),
    )


def ms(values: Sequence[float], pct: float) -> str:
    return f"{percentile(values, pct) * 1000:.1f} ms" if values else "n/a"


def report(args: argparse.Namespace, runs: list[Run]) -> None:
    print()
    print(
        f"{args.streams:,} streams through nginx; payments: {args.ingest_payments} through "
        f"webhook-ingest at {args.ingest_rate:g}/s, the rest straight to cache + feed at "
        f"{args.rate:g}/s; {os.cpu_count()} cores shared by nginx, the gateways, the clients"
    )
    rows = []
    for r in runs:
        rows.append(
            [
                str(r.gateways),
                " + ".join(f"{h:,}" for h in r.held),
                f"{sum(r.held) / r.open_seconds:,.0f}/s",
                " + ".join(f"{k / 1024:,.0f}" for k in r.rss_kib) + " MiB",
                " + ".join(f"{c:.1f}" for c in r.cpu_seconds) + " s",
                f"{r.delivered:,}/{r.paid:,}",
                ms(r.latencies, 50),
                ms(r.latencies, 99),
                ms(r.ingest, 50),
                ms(r.ingest, 99),
                ms(r.direct, 99),
            ]
        )
    print(
        table(
            [
                "gateways",
                "streams held per replica",
                "opened",
                "gateway RSS",
                "gateway CPU (payments)",
                "done read",
                "p50",
                "p99",
                "p50 via ingest",
                "p99 via ingest",
                "p99 direct",
            ],
            rows,
        )
    )
    if len(runs) >= 2:
        one, two = runs[0], runs[-1]
        ratios = [
            [
                "streams held per replica",
                f"{max(two.held) / max(one.held):.2f}",
                "the load splits: each replica holds about half",
            ],
            [
                "streams held in total",
                f"{sum(two.held) / sum(one.held):.2f}",
                "every stream held either way (N is below one process's limit)",
            ],
            [
                "opening rate",
                f"{(sum(two.held) / two.open_seconds) / (sum(one.held) / one.open_seconds):.2f}",
                "",
            ],
            [
                "p50 event latency",
                f"{percentile(two.latencies, 50) / percentile(one.latencies, 50):.2f}",
                "",
            ],
            [
                "p99 event latency",
                f"{percentile(two.latencies, 99) / percentile(one.latencies, 99):.2f}",
                "",
            ],
            [
                "gateway CPU per replica",
                f"{max(two.cpu_seconds) / max(one.cpu_seconds):.2f}",
                "",
            ],
        ]
        print()
        print(f"{two.gateways} replicas / {one.gateways} replica:")
        print(table(["figure", "ratio", "note"], ratios))


async def run(args: argparse.Namespace) -> None:
    runs = []
    with tempfile.TemporaryDirectory(prefix="paypush-replicas-") as tmp:
        for count in args.gateways:
            print(
                f"-- {count} gateway replica(s) behind nginx, {args.streams:,} streams", flush=True
            )
            r = await one_run(args, count, Path(tmp) / f"gw{count}")
            print(
                f"   held {' + '.join(f'{h:,}' for h in r.held)}, {r.failures} failed to open, "
                f"{r.delivered:,}/{r.paid:,} done events read",
                flush=True,
            )
            runs.append(r)
    report(args, runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=3_000)
    parser.add_argument("--rate", type=float, default=300, help="direct payments per second")
    parser.add_argument("--ingest-payments", type=int, default=100)
    parser.add_argument("--ingest-rate", type=float, default=25, help="webhooks per second")
    parser.add_argument(
        "--gateways",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2],
        help="gateway counts to compare (comma-separated)",
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile()
    if args.client:
        asyncio.run(client_main(args.client))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
