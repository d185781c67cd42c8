"""What the benchmarks share: their own backends and system, sessions and payments, /proc
readings, percentiles, and a printed table."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from devstack.payos_simulator.state import Transaction, vn_now
from devstack.payos_simulator.webhooks import webhook_body
from devstack.servers import Process, free_port, http_ok
from devstack.system import Backends, System, plan, running, running_backends
from shared.cache import StatusCache
from shared.model import StatusEvent, StreamStatus
from shared.settings import Settings

CHECKSUM_KEY = "bench-checksum-key"
AMOUNT = 50_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# Connections of a benchmark's own Redis client (the most commands it has in flight).
BENCH_REDIS_CONNECTIONS = 1_024


@contextlib.contextmanager
def backends() -> Iterator[Backends]:
    """A redis-server and a MongoDB stand-in of the benchmark's own, on free ports, in a
    temporary folder (its default database: `bench`)."""
    with (
        tempfile.TemporaryDirectory(prefix="paypush-bench-") as tmp,
        running_backends(Path(tmp), database="bench") as env,
    ):
        yield env


@contextlib.contextmanager
def own_system(base: Settings, **kwargs: Any) -> Iterator[System]:
    """`devstack.system.plan(base, …, **kwargs)` on backends of the benchmark's own, running."""
    with backends() as env, running(plan(base, env, owns_backends=False, **kwargs)) as started:
        yield started


@contextlib.contextmanager
def bare_aiohttp(env: dict[str, str] | None = None) -> Iterator[Process]:
    """`python -m bench.bare` (a bare aiohttp handler returning a constant, served as the
    services are) on a free port, running; `env` as a service's (its host, its log level)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="paypush-bare-") as tmp:
        process = Process(
            "bare-aiohttp",
            [sys.executable, "-m", "bench.bare", "--port", str(port)],
            port=port,
            log_dir=Path(tmp),
            env=env,
            ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
        )
        process.start()
        try:
            yield process
        finally:
            process.stop()


def redis_for(url: str) -> Redis:
    """A benchmark's own Redis client: redis-py 8 caps a pool at 100 connections and refuses
    the 101st command in flight (MaxConnectionsError), and benchmarks send hundreds at once."""
    return Redis.from_url(url, max_connections=BENCH_REDIS_CONNECTIONS)


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(values: Sequence[float]) -> str:
    """p50/p99/max of durations in seconds, printed in milliseconds."""
    if not values:
        return "n/a"
    return (
        f"p50 {percentile(values, 50) * 1000:.2f} ms  p99 {percentile(values, 99) * 1000:.2f} ms"
        f"  max {max(values) * 1000:.2f} ms  mean {statistics.fmean(values) * 1000:.2f} ms"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- processes, from /proc -------------------------------------------------------------


def rss_kib(pid: int, missing: int | None = None) -> int:
    """A process's resident memory (VmRSS) in KiB; `missing` (or an error) when it has none."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    if missing is None:
        raise RuntimeError("no VmRSS")
    return missing


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the line (1-based), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- sessions and payments -------------------------------------------------------------


def signed_body(order_code: int) -> bytes:
    """A signed webhook body paying a session of AMOUNT in full, as PayOS sends it."""
    tx = Transaction("FT" + secrets.token_hex(6), AMOUNT, "NAPTIEN", vn_now())
    body = webhook_body(
        order_code=order_code,
        link_id=secrets.token_hex(16),
        description="NAPTIEN",
        tx=tx,
        checksum_key=CHECKSUM_KEY,
    )
    return json.dumps(body).encode()


async def post_webhook(http: aiohttp.ClientSession, url: str, body: bytes) -> bool:
    """POST one webhook body; whether it was acknowledged (200)."""
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status == 200


async def pay_directly(cache: StatusCache, doc: dict[str, Any]) -> bool:
    """What the ingest does last for a full payment: the `done` status into the cache and feed."""
    event = StatusEvent(
        uuid=doc["uuid"],
        order_code=doc["orderCode"],
        status=StreamStatus.DONE,
        amount=AMOUNT,
        amount_paid=AMOUNT,
        updated_at=datetime.now(UTC),
        version=3,
    )
    return await cache.put(event)


@dataclass
class Paid:
    uuid: str
    sent: float
    acked: float


async def paced(
    items: list[dict[str, Any]], rate: float, in_flight: int, act: Any
) -> tuple[list[Paid], float]:
    """Run `act(doc)` for each item at `rate` per second (at most `in_flight` at once)."""
    paid: list[Paid] = []
    gate = asyncio.Semaphore(in_flight)
    start = time.monotonic()

    async def one(i: int, doc: dict[str, Any]) -> None:
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            sent = time.monotonic()
            if await act(doc):
                paid.append(Paid(doc["uuid"], sent, time.monotonic()))

    await asyncio.gather(*(one(i, d) for i, d in enumerate(items)))
    return paid, time.monotonic() - start


# -- client processes ------------------------------------------------------------------


def spawn_client(argv: Sequence[str], uuids: list[str]) -> subprocess.Popen[str]:
    """`python -m *argv`, given the uuids as one JSON line on its stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(uuids) + "\n")
    proc.stdin.flush()
    return proc


async def stop_clients(clients: Sequence[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Tell every client process the payments are made; each one's final JSON report."""
    for p in clients:
        assert p.stdin is not None
        p.stdin.write("stop\n")
        p.stdin.flush()
    reports = []
    for p in clients:
        assert p.stdout is not None
        reports.append(json.loads(await asyncio.to_thread(p.stdout.readline)))
    return reports


def reap(clients: Sequence[subprocess.Popen[str]]) -> None:
    for p in clients:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait()
