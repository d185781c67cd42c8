"""Status-read benchmark: cached status reads on one session-api process, against a bare
aiohttp handler returning a constant, same clients, same run.

    python -m bench.status [--pollers 64] [--clients 2] [--duration 8] [--rounds 2]
                           [--sessions 200]

Starts its own redis-server, MongoDB stand-in, PayOS simulator and ONE session-api process
(LOG_LEVEL=WARNING, so the one-line-per-request log does not dominate), creates sessions
through `POST /api/sessions` (which caches them), and starts `bench.bare` beside it: a bare
aiohttp handler answering `GET /api/webhooks` with a constant body the size of a status read's
answer, served as the services are (uvloop, no access log, same host). Then, `--rounds` times,
each system in turn: the pollers hammer `GET /api/webhooks?uuid=` for those cached sessions
from separate client processes (sharing this machine's cores with the server) for
`--duration` seconds. Prints one table, both systems: reads/s, p50/p99 latency, server CPU
per read from /proc and the ratio "CPU per request vs bare aiohttp", the figure that holds
on any machine; and MongoDB queries per 1,000 reads, from the service's own `/metrics`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import re
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event

import aiohttp

from devstack.servers import free_port
from shared.settings import Settings

from ._common import bare_aiohttp, cpu_seconds, own_system, percentile, table

# How long each server's CPU is read with no load, for its background work.
IDLE_SECONDS = 3.0
DB_QUERIES = re.compile(r"^paypush_status_db_queries_total ([0-9.e+]+)$", re.M)


@dataclass(frozen=True, slots=True)
class ClientResult:
    reads: int
    errors: int
    latencies: list[float]
    elapsed: float  # the client's own polling window, without process start-up


@dataclass
class Target:
    """One system under the same load: its base URL and server process, and what was read."""

    name: str
    base: str
    pid: int
    reads: int = 0
    errors: int = 0
    cpu: float = 0.0  # server CPU seconds over the measured windows
    wall: float = 0.0
    idle: float = 0.0  # server CPU with no load, in seconds per second
    rates: list[float] = field(default_factory=list)  # reads/s of each round
    latencies: list[float] = field(default_factory=list)

    @property
    def cpu_per_read(self) -> float:
        return self.cpu / max(self.reads, 1)

    @property
    def net_cpu_per_read(self) -> float:
        """Without what the server spends with no load at all (its background tasks)."""
        return max(self.cpu - self.idle * self.wall, 0.0) / max(self.reads, 1)


async def _poll(
    base: str, uuids: list[str], pollers: int, duration: float, go: Event | None = None
) -> ClientResult:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=pollers)
    async with aiohttp.ClientSession(base, connector=connector) as http:
        if go is not None:
            # Started and connected-ready: the server's CPU is read from the go on.
            await asyncio.to_thread(go.wait)
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
    base: str,
    uuids: list[str],
    pollers: int,
    duration: float,
    ready: multiprocessing.Queue[object],
    go: Event,
    out: multiprocessing.Queue[object],
) -> None:
    ready.put(True)
    out.put(asyncio.run(_poll(base, uuids, pollers, duration, go)))


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


async def _answer(base: str, uuid: str) -> bytes:
    async with aiohttp.ClientSession(base) as http, http.get(f"/api/webhooks?uuid={uuid}") as r:
        assert r.status == 200, r.status
        return await r.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pollers", type=int, default=64, help="concurrent pollers in all")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds of polling, per system and round"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the systems in turn")
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
    with (
        own_system(base, services=services, own_ports=True) as system,
        bare_aiohttp(system.settings.env()) as bare,
    ):
        targets = [
            Target("session-api", system.api_url, system.session_api.pid),
            Target("bare aiohttp", f"http://127.0.0.1:{bare.port}", bare.pid),
        ]
        run(targets, args)


def _round(target: Target, uuids: list[str], args: argparse.Namespace) -> None:
    """One window of polling `target` from the client processes; its figures added up."""
    ctx = multiprocessing.get_context("spawn")
    ready: multiprocessing.Queue[object] = ctx.Queue()
    out: multiprocessing.Queue[object] = ctx.Queue()
    go = ctx.Event()
    per_client = [args.pollers // args.clients] * args.clients
    per_client[0] += args.pollers - sum(per_client)
    procs = [
        ctx.Process(
            target=_client_process,
            args=(target.base, uuids, n, args.duration, ready, go, out),
        )
        for n in per_client
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get()
    cpu_before, wall_before = cpu_seconds(target.pid), time.monotonic()
    go.set()
    results = [r for r in (out.get() for _ in procs) if isinstance(r, ClientResult)]
    target.cpu += cpu_seconds(target.pid) - cpu_before
    target.wall += time.monotonic() - wall_before
    for p in procs:
        p.join()
    target.reads += sum(r.reads for r in results)
    target.errors += sum(r.errors for r in results)
    target.latencies += [x for r in results for x in r.latencies]
    target.rates.append(sum(r.reads / r.elapsed for r in results))


def run(targets: list[Target], args: argparse.Namespace) -> None:
    service, bare = targets
    uuids = asyncio.run(_create_sessions(service.base, args.sessions))
    sizes = [len(asyncio.run(_answer(t.base, uuids[0]))) for t in targets]
    for t in targets:  # warm-up: connections, first requests, caches
        asyncio.run(_poll(t.base, uuids, 8, 1.0))
    idle_before = [cpu_seconds(t.pid) for t in targets]
    time.sleep(IDLE_SECONDS)
    for t, before in zip(targets, idle_before, strict=True):
        t.idle = (cpu_seconds(t.pid) - before) / IDLE_SECONDS
    # Index creation is in the background; /readyz waited for it via the creates above.
    queries_before = asyncio.run(_db_queries(service.base))
    for _ in range(args.rounds):
        for t in targets:
            _round(t, uuids, args)
    queries = asyncio.run(_db_queries(service.base)) - queries_before

    print(
        f"cached status reads: 1 session-api process (LOG_LEVEL=WARNING) and 1 bare aiohttp "
        f"process, {args.pollers} pollers in {args.clients} client process(es), "
        f"{args.sessions} cached sessions, {args.rounds} round(s) of {args.duration:g} s each "
        f"in turn, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f})"
    )
    rows = [
        [
            t.name,
            f"{t.reads:,}",
            t.errors,
            " / ".join(f"{r:,.0f}" for r in t.rates),
            f"{percentile(t.latencies, 50) * 1000:.2f}",
            f"{percentile(t.latencies, 99) * 1000:.2f}",
            f"{t.cpu / max(t.wall, 1e-9):.0%}",
            f"{t.cpu_per_read * 1e6:.0f}",
            f"{t.cpu_per_read / bare.cpu_per_read:.2f}x",
            f"{t.idle:.1%}",
            f"{t.net_cpu_per_read / bare.net_cpu_per_read:.2f}x",
            size,
        ]
        for t, size in zip(targets, sizes, strict=True)
    ]
    headers = [
        "server",
        "reads",
        "not 200",
        "reads/s (each round)",
        "p50 ms",
        "p99 ms",
        "server CPU",
        "CPU/read µs",
        "CPU per request vs bare aiohttp",
        "idle CPU",
        "net of idle",
        "body bytes",
    ]
    print(table(headers, rows))
    print(
        f"MongoDB queries: {queries:g} ({queries / max(service.reads, 1) * 1000:.3f} per 1,000 "
        "reads); server CPU from /proc over the polling windows only, in % of one core; "
        f"idle CPU: with no load, over {IDLE_SECONDS:g} s (session-api's background tasks); "
        "net of idle: the ratio of CPU per read less that"
    )


if __name__ == "__main__":
    main()
