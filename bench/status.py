"""Status-read benchmark: N concurrent pollers on one session-api process.

    python -m bench.status [--pollers 64] [--clients 2] [--duration 15] [--sessions 200]

Starts its own redis-server, MongoDB stand-in, PayOS simulator and ONE session-api process
(LOG_LEVEL=WARNING, so the one-line-per-request log does not dominate), creates sessions
through `POST /api/sessions` (which caches them), then runs the pollers hammering
`GET /api/webhooks?uuid=` for those cached sessions from separate client processes (they
share this machine's cores with the service). Prints reads/s, p50/p99 latency and MongoDB
queries per 1,000 reads, read from the service's own `/metrics` counter.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import re
import time
from dataclasses import dataclass

import aiohttp

from devstack.servers import free_port
from shared.settings import Settings

from ._common import cpu_seconds, own_system, percentile

DB_QUERIES = re.compile(r"^paypush_status_db_queries_total ([0-9.e+]+)$", re.M)


@dataclass(frozen=True, slots=True)
class ClientResult:
    reads: int
    errors: int
    latencies: list[float]
    elapsed: float  # the client's own polling window, without process start-up


async def _poll(base: str, uuids: list[str], pollers: int, duration: float) -> ClientResult:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=pollers)
    async with aiohttp.ClientSession(base, connector=connector) as http:
        began = time.monotonic()
        deadline = began + duration

        async def poller() -> None:
            nonlocal errors
            rnd = random.Random()
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with http.get(f"/api/webhooks?uuid={rnd.choice(uuids)}") as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(poller() for _ in range(pollers)))
        elapsed = time.monotonic() - began
    return ClientResult(len(latencies), errors, latencies, elapsed)


def _client_process(
    base: str, uuids: list[str], pollers: int, duration: float, out: multiprocessing.Queue[object]
) -> None:
    out.put(asyncio.run(_poll(base, uuids, pollers, duration)))


async def _create_sessions(base: str, n: int) -> list[str]:
    async with aiohttp.ClientSession(base) as http:

        async def one(i: int) -> str:
            body = {"accountNumber": f"{100000 + i // 5}", "amount": 10_000 + i}
            async with http.post("/api/sessions", json=body) as resp:
                data = await resp.json()
                assert resp.status == 201, data
                return str(data["uuid"])

        sem = asyncio.Semaphore(16)

        async def bounded(i: int) -> str:
            async with sem:
                return await one(i)

        return list(await asyncio.gather(*(bounded(i) for i in range(n))))


async def _db_queries(base: str) -> float:
    async with aiohttp.ClientSession(base) as http, http.get("/metrics") as resp:
        match = DB_QUERIES.search(await resp.text())
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pollers", type=int, default=64, help="concurrent pollers in all")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of polling")
    parser.add_argument("--sessions", type=int, default=200, help="sessions to poll")
    args = parser.parse_args()

    sim_port = free_port()
    base = Settings.from_env(
        {},
        payos_base_url=f"http://127.0.0.1:{sim_port}",
        payos_simulator_port=sim_port,
        session_api_port=free_port(),
        # The limit is not what this measures.
        max_pending_per_account=args.sessions,
        session_rate_limit_per_minute=0,
        log_level="WARNING",
    )
    services = ("payos-simulator", "session-api")
    with own_system(base, services=services, own_ports=True) as system:
        run(system.api_url, args, system.session_api.pid)


def run(base: str, args: argparse.Namespace, service_pid: int) -> None:
    uuids = asyncio.run(_create_sessions(base, args.sessions))
    # Index creation is in the background; /readyz waited for it via the creates above.
    queries_before = asyncio.run(_db_queries(base))
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[object] = ctx.Queue()
    per_client = [args.pollers // args.clients] * args.clients
    per_client[0] += args.pollers - sum(per_client)
    procs = [
        ctx.Process(target=_client_process, args=(base, uuids, n, args.duration, out))
        for n in per_client
    ]
    cpu_before, wall_before = cpu_seconds(service_pid), time.monotonic()
    for p in procs:
        p.start()
    results = [r for r in (out.get() for _ in procs) if isinstance(r, ClientResult)]
    cpu_used = cpu_seconds(service_pid) - cpu_before
    service_cpu = cpu_used / (time.monotonic() - wall_before)
    for p in procs:
        p.join()
    queries = asyncio.run(_db_queries(base)) - queries_before

    reads = sum(r.reads for r in results)
    errors = sum(r.errors for r in results)
    latencies = [x for r in results for x in r.latencies]
    rate = sum(r.reads / r.elapsed for r in results)
    print(
        f"session-api status reads: 1 service process (LOG_LEVEL=WARNING), "
        f"{args.pollers} pollers in {args.clients} client process(es), "
        f"{args.sessions} cached sessions, {args.duration:g} s"
    )
    print(f"  reads            {reads} ({errors} not 200)")
    print(f"  reads/s          {rate:,.0f}")
    print(
        f"  latency          p50 {percentile(latencies, 50) * 1000:.2f} ms"
        f"  p99 {percentile(latencies, 99) * 1000:.2f} ms"
    )
    print(
        f"  service CPU      {service_cpu:.0%} of one core (load average {os.getloadavg()[0]:.1f})"
    )
    print(
        f"  service CPU/read {cpu_used / max(reads, 1) * 1e6:.0f} µs"
        f" (one free core would serve ~{reads / max(cpu_used, 1e-9):,.0f} reads/s)"
    )
    print(f"  MongoDB queries  {queries:g} ({queries / max(reads, 1) * 1000:.3f} per 1,000 reads)")


if __name__ == "__main__":
    main()
