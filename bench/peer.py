"""The gateway side by side with a C push server: nginx + nchan, same client, same run.

    python -m bench.peer [--streams 10000] [--clients 4] [--idle 30] [--events 5000]
                         [--rate 500] [--keepalive 15] [--only gateway|nchan|bare]

Three servers, one after the other: nginx + nchan, a bare aiohttp-sse server (`bench.bare`:
the floor of aiohttp doing this job) and the gateway. nchan and the gateway get their own
redis-server on a free port; all serve EventSource streams of one channel each and are driven
by the same client processes (`--clients`, raw asyncio sockets):

1. open: every stream at once (each client at most `--connect-concurrency` connecting at a
   time), until each has its first event, the current status: the gateway reads it from its
   status cache, nchan replays the one message stored per channel (published beforehand),
   the bare server writes a constant;
2. idle for `--idle` seconds with a keep-alive every `--keepalive` seconds on every stream;
3. `--events` events at `--rate` per second to random streams: the gateway's through the
   status cache's cache-and-publish script (what the ingest does), nchan's POSTed to its
   publisher location, the bare server's to its own; each event's publish → receive
   latency is taken at the client.

Server RSS and CPU come from /proc (nginx: master + worker), Redis's CPU too, and the
gateway's longest garbage collection from its `paypush_gc_longest_pause_seconds` metric.
Prints one table, the gateway beside nchan and beside the bare server with both ratios, then
what is not the same work.
Two cores are shared with the client processes, so read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from devstack.seed import store_pending_sessions
from devstack.servers import Process, free_port, mongo_standin, redis_server
from devstack.system import service_process
from session_api.admin.gateway import parse_metrics
from shared.cache import StatusCache
from shared.model import StatusEvent, StreamStatus
from shared.mongo import Store, mongo_client
from shared.settings import Settings

from ._common import (
    AMOUNT,
    bare_aiohttp,
    cpu_seconds,
    percentile,
    raise_nofile,
    reap,
    redis_for,
    rss_kib,
    table,
)

NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
STREAM_PATH = "/api/webhooks/stream?uuid="
NCHAN_SUB_PATH = "/sub?id="
BARE_SUB_PATH = "/sse?id="
BROWSER_HEADERS = (
    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36\r\n"
    "Accept-Language: en-US,en;q=0.9\r\n"
)
VERSION = re.compile(rb'"version":(\d+)')
# Publishes in flight at once (and the publisher's connections).
PUBLISHERS = 32


# -- the client processes (the same code for both systems) --------------------------------


class _Stream(asyncio.Protocol):
    """One EventSource connection: counts keep-alives, stamps every event's arrival."""

    def __init__(self, client: _Client, index: int, request: bytes) -> None:
        self.client = client
        self.index = index
        self.request = request
        self.buf = b""
        self.head = True
        self.first = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buf += data
        if self.head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.buf[: self.buf.find(b"\r\n")]
            if b" 200 " not in status and not self.first.done():
                self.first.set_exception(RuntimeError(status.decode(errors="replace")))
            self.buf, self.head = self.buf[end + 4 :], False
        *lines, self.buf = self.buf.split(b"\n")
        # Chunk-size lines and blank lines pass through: only comments and data count.
        for line in lines:
            if line.startswith(b":") or line.startswith(b"event: ping"):
                self.client.pings += 1
            elif line.startswith(b"data: "):
                match = VERSION.search(line)
                if match is None:
                    continue
                if not self.first.done():
                    self.first.set_result(now)
                else:
                    self.client.events.append((self.index, int(match.group(1)), now))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.closed += 1
        if not self.first.done():
            self.first.set_exception(ConnectionError("closed before the first event"))


@dataclasses.dataclass
class _Client:
    pings: int = 0
    closed: int = 0
    events: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)


async def client_main(port: int, path: str, concurrency: int) -> None:
    """Read the stream keys on stdin, open a stream each; answer `mark` with the keep-alive
    count; on `stop`, report every event received and exit."""
    keys: list[str] = json.loads(sys.stdin.readline())
    client = _Client()
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    transports: list[asyncio.Transport] = []
    failures: list[str] = []
    failed: list[int] = []

    async def one(index: int, key: str) -> None:
        request = (
            f"GET {path}{key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{BROWSER_HEADERS}\r\n"
        ).encode()
        async with gate:
            try:
                transport, proto = await loop.create_connection(
                    lambda: _Stream(client, index, request), "127.0.0.1", port
                )
                transports.append(transport)
                await proto.first
            except (OSError, RuntimeError) as exc:
                failures.append(str(exc))
                failed.append(index)

    started = time.time()
    await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
    # From here the client only stamps arrivals: a collection of its own heap (thousands of
    # streams) would delay a stamp and be counted as the server's latency.
    gc.collect()
    gc.disable()
    print(
        json.dumps(
            {
                "started": started,
                "opened": time.time(),
                "failures": failures[:5],
                "failed": failed,
            }
        ),
        flush=True,
    )
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() == "mark":
            print(json.dumps({"pings": client.pings, "closed": client.closed}), flush=True)
        else:
            break
    print(json.dumps({"events": client.events, "closed": client.closed}), flush=True)
    for t in transports:
        t.abort()


def _spawn(port: int, path: str, keys: list[str], concurrency: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.peer", "--client", str(port), path, str(concurrency)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(keys) + "\n")
    proc.stdin.flush()
    return proc


async def _ask(clients: list[subprocess.Popen[str]], command: str) -> list[dict[str, Any]]:
    for p in clients:
        assert p.stdin is not None
        p.stdin.write(command + "\n")
        p.stdin.flush()
    return [await _reply(p) for p in clients]


async def _reply(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdout is not None
    line = await asyncio.to_thread(p.stdout.readline)
    if not line:
        raise RuntimeError("a client process ended early")
    result: dict[str, Any] = json.loads(line)
    return result


# -- the two systems ----------------------------------------------------------------------


@dataclasses.dataclass
class System:
    """One server under test: its processes, how to reach streams, how to publish."""

    name: str
    port: int
    path: str
    pids: Callable[[], list[int]]
    redis_pid: int | None  # the server's Redis, where it has one
    redis_port: int | None
    publish: Callable[[str, StatusEvent], Awaitable[None]]
    gc_longest: Callable[[], Awaitable[float | None]]
    # The server's own delivery histogram (upper bound -> events), where it has one.
    delivered: Callable[[], Awaitable[dict[float, float]]] | None = None
    # The gateway's sessions live in MongoDB and its status cache (nchan stores its own).
    store: Store | None = None
    cache: StatusCache | None = None


async def _redis_commands(port: int | None) -> int:
    """Commands the Redis server on `port` has run so far (INFO commandstats)."""
    if port is None:
        return 0
    client = Redis(port=port)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def _redis_cpu(system: System) -> float:
    return 0.0 if system.redis_pid is None else cpu_seconds(system.redis_pid)


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def _rss(pids: list[int]) -> int:
    return sum(rss_kib(p, 0) for p in pids)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def nchan_conf(tmp: Path, port: int, redis_port: int, keepalive: float, streams: int) -> str:
    """One worker, nchan over Redis, EventSource subscribers with a comment ping."""
    files = max(1024, streams * 2 + 200)
    return f"""
load_module {NCHAN_MODULE};
worker_processes 1;
worker_rlimit_nofile {files};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
daemon off;
events {{ worker_connections {files}; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  nchan_redis_url "redis://127.0.0.1:{redis_port}";
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /sub {{
      nchan_subscriber eventsource;
      nchan_channel_id $arg_id;
      nchan_use_redis on;
      nchan_eventsource_ping_interval {int(keepalive)};
      nchan_eventsource_ping_comment "ping";
      nchan_eventsource_ping_event "";
    }}
    location = /pub {{
      nchan_publisher http;
      nchan_channel_id $arg_id;
      nchan_use_redis on;
      nchan_message_buffer_length 1;
      nchan_message_timeout 15m;
    }}
  }}
}}
"""


def _nginx() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists() or not NCHAN_MODULE.exists():
        raise SystemExit("nginx with nchan is missing: run `make setup` (libnginx-mod-nchan)")
    return binary


def _posting(
    http: aiohttp.ClientSession, port: int, who: str
) -> Callable[[str, StatusEvent], Awaitable[None]]:
    """Publishing as nchan and the bare server take it: a POST to `/pub?id=` (201 delivered,
    202 stored or nobody listening)."""

    async def publish(key: str, event: StatusEvent) -> None:
        url = f"http://127.0.0.1:{port}/pub?id={key}"
        async with http.post(url, data=event.to_json()) as resp:
            await resp.read()
            if resp.status not in (201, 202):
                raise RuntimeError(f"{who}'s publish answered {resp.status}")

    return publish


async def _no_gc() -> float | None:
    """No garbage collector to probe (nginx; the bare server has no probe)."""
    return None


@contextlib.asynccontextmanager
async def nchan_system(tmp: Path, args: argparse.Namespace) -> Any:
    redis = redis_server(free_port(), tmp, name="nchan-redis")
    redis.start()
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nchan_conf(tmp, port, redis.port, args.keepalive, args.streams))
    nginx = Process(
        "nginx",
        [_nginx(), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")],
        port=port,
        log_dir=tmp,
    )
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    try:
        nginx.start()

        yield System(
            "nginx + nchan",
            port,
            NCHAN_SUB_PATH,
            lambda: [nginx.pid, *_children(nginx.pid)],
            redis.pid,
            redis.port,
            _posting(http, port, "nchan"),
            _no_gc,
        )
    finally:
        await http.close()
        nginx.stop()
        redis.stop()


@contextlib.asynccontextmanager
async def bare_system(tmp: Path, args: argparse.Namespace) -> Any:
    """`bench.bare`'s aiohttp-sse stream: the floor of an aiohttp server doing this job."""
    settings = Settings.from_env({}, log_level="WARNING", sse_keepalive_seconds=args.keepalive)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    try:
        with bare_aiohttp(settings.env()) as bare:
            yield System(
                "bare aiohttp-sse",
                bare.port,
                BARE_SUB_PATH,
                lambda: [bare.pid],
                None,
                None,
                _posting(http, bare.port, "the bare server"),
                _no_gc,
            )
    finally:
        await http.close()


@contextlib.asynccontextmanager
async def gateway_system(tmp: Path, args: argparse.Namespace) -> Any:
    redis = redis_server(free_port(), tmp, name="gateway-redis")
    mongo = mongo_standin(free_port(), tmp / "mongo", tmp)
    redis.start()
    mongo.start()
    settings = Settings.from_env(
        {},
        redis_url=f"redis://127.0.0.1:{redis.port}/0",
        mongodb_url=f"mongodb://127.0.0.1:{mongo.port}/peer",
        log_level="WARNING",
        app_env="development",
        sse_keepalive_seconds=args.keepalive,
        max_streams=args.streams + 100,
    )
    gateway = service_process(settings, "stream-gateway", tmp)
    port = gateway.port
    client = redis_for(settings.redis_url)
    cache = StatusCache(client)
    http = aiohttp.ClientSession()
    try:
        gateway.start()

        async def publish(key: str, event: StatusEvent) -> None:
            if not await cache.put(event):
                raise RuntimeError("the status cache refused a newer event")

        async def scrape() -> str:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                return await resp.text()

        async def gc_longest() -> float | None:
            text = await scrape()
            longest, cpu, total = None, 0.0, 0.0
            for line in text.splitlines():
                if line.startswith("paypush_gc_longest_pause_seconds "):
                    longest = float(line.split()[1])
                if line.startswith("paypush_gc_longest_pause_cpu_seconds "):
                    cpu = float(line.split()[1])
                if line.startswith("paypush_gc_pause_seconds_sum"):
                    total += float(line.split()[1])
            print(
                f"  gateway: {total:.2f} s in garbage collection in all; the longest "
                f"collection's own CPU time {cpu * 1000:.1f} ms"
            )
            return longest

        async def delivered() -> dict[float, float]:
            """The gateway's own change -> written histogram, cumulative per bucket (read as
            the operator console reads it)."""
            return dict(parse_metrics(await scrape()).buckets)

        yield System(
            "stream-gateway",
            port,
            STREAM_PATH,
            lambda: [gateway.pid],
            redis.pid,
            redis.port,
            publish,
            gc_longest,
            delivered,
            Store(mongo_client(settings)),
            cache,
        )
    finally:
        await http.close()
        await client.aclose()
        gateway.stop()
        mongo.stop()
        redis.stop()


# -- one measured run ---------------------------------------------------------------------


@dataclasses.dataclass
class Figures:
    rss_per_stream_kib: float = 0.0
    cpu_per_open_us: float = 0.0
    opens_per_s: float = 0.0
    redis_commands_per_open: float = 0.0
    redis_cpu_per_open_us: float = 0.0
    failed_opens: int = 0
    idle_cpu_pct: float = 0.0
    cpu_per_keepalive_us: float = 0.0
    keepalives: int = 0
    cpu_per_event_us: float = 0.0
    redis_cpu_per_event_us: float = 0.0
    latency_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    lost: int = 0
    gc_longest_ms: float | None = None
    # The server's own change -> written time for the events phase: the bucket bounds (ms)
    # holding 99 % and all of them (None: no such histogram).
    written_ms: tuple[float, float] | None = None


def _written_within(before: dict[float, float], after: dict[float, float]) -> tuple[float, float]:
    """Upper bounds (ms) of the buckets holding 99 % and 100 % of the events in between."""
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    bounds = []
    for share in (0.99, 1.0):
        bound = next((le for le, n in counts.items() if total and n >= share * total), math.inf)
        bounds.append(bound * 1000)
    return bounds[0], bounds[1]


def _pending(uuid: str, order_code: int) -> StatusEvent:
    """A pending session's first status, as nchan and the bare server are handed it."""
    return StatusEvent(
        uuid=uuid,
        order_code=order_code,
        status=StreamStatus.PENDING,
        amount=AMOUNT,
        amount_paid=0,
        updated_at=datetime.now(UTC),
        version=1,
    )


async def _prepare(system: System, n: int) -> list[StatusEvent]:
    """N sessions whose current status each system can hand a new stream first."""
    store, cache = system.store, system.cache
    if store is not None and cache is not None:
        await store.ensure_indexes()
        docs = await store_pending_sessions(store, n, amount=AMOUNT)
        events = [StatusEvent.from_session(d) for d in docs]
        for i in range(0, n, 500):
            await cache.put_many(events[i : i + 500])
        return events
    events = [_pending(os.urandom(16).hex(), i + 1) for i in range(n)]
    sem = asyncio.Semaphore(48)

    async def one(e: StatusEvent) -> None:
        async with sem:
            await system.publish(e.uuid, e)

    await asyncio.gather(*(one(e) for e in events))
    return events


async def measure(system: System, args: argparse.Namespace) -> Figures:
    n = args.streams
    fig = Figures()
    current = await _prepare(system, n)
    keys = [e.uuid for e in current]
    await asyncio.sleep(1.0)
    pids = system.pids()
    commands0 = await _redis_commands(system.redis_port)
    rss0, cpu0, redis_cpu0 = _rss(pids), _cpu(pids), _redis_cpu(system)

    shares = [list(range(i, n, args.clients)) for i in range(args.clients)]
    clients = [
        _spawn(system.port, system.path, [keys[j] for j in share], args.connect_concurrency)
        for share in shares
    ]
    try:
        opened = [await _reply(p) for p in clients]
        cpu1, redis_cpu1 = _cpu(system.pids()), _redis_cpu(system)
        fig.failed_opens = sum(len(o["failed"]) for o in opened)
        # Events go to the streams that opened only.
        dead = {share[j] for share, o in zip(shares, opened, strict=True) for j in o["failed"]}
        live = [i for i in range(n) if i not in dead]
        for o in opened:
            if o["failures"]:
                print(f"  {system.name}: open failures, e.g. {o['failures'][:2]}")
        window = max(o["opened"] for o in opened) - min(o["started"] for o in opened)
        good = n - fig.failed_opens
        fig.opens_per_s = good / window if window > 0 else 0.0
        fig.cpu_per_open_us = (cpu1 - cpu0) / max(1, good) * 1e6
        commands = await _redis_commands(system.redis_port) - commands0
        fig.redis_commands_per_open = commands / max(1, good)
        fig.redis_cpu_per_open_us = (redis_cpu1 - redis_cpu0) / max(1, good) * 1e6
        await asyncio.sleep(1.0)
        pids = system.pids()
        fig.rss_per_stream_kib = (_rss(pids) - rss0) / max(1, good)

        # Idle: keep-alives only.
        marks = await _ask(clients, "mark")
        cpu_a, t_a = _cpu(pids), time.monotonic()
        await asyncio.sleep(args.idle)
        cpu_b, t_b = _cpu(pids), time.monotonic()
        marks2 = await _ask(clients, "mark")
        fig.keepalives = sum(m["pings"] for m in marks2) - sum(m["pings"] for m in marks)
        fig.idle_cpu_pct = (cpu_b - cpu_a) / (t_b - t_a) * 100
        fig.cpu_per_keepalive_us = (cpu_b - cpu_a) / max(1, fig.keepalives) * 1e6

        # Events, paced, to random streams.
        rng = random.Random(12)
        sent: dict[tuple[int, int], float] = {}
        version = [e.version for e in current]
        in_flight = asyncio.Semaphore(PUBLISHERS)
        # The publisher's connections are opened before the clock starts: the first events
        # must not wait for a connect (a pool filling up during the phase put ~80 ms on the
        # first events, counted as the server's latency).
        await asyncio.gather(
            *(
                system.publish(f"warm-up-{j}", _pending(f"warm-up-{j}", j + 1))
                for j in range(PUBLISHERS)
            )
        )
        written0 = await system.delivered() if system.delivered else None
        # Nor may the publisher pause between stamping an event and sending it.
        gc.collect()
        gc.disable()
        redis0, cpu_c = _redis_cpu(system), _cpu(pids)

        async def one() -> None:
            i = live[rng.randrange(len(live))]
            version[i] += 1
            event = dataclasses.replace(
                current[i], version=version[i], updated_at=datetime.now(UTC)
            )
            async with in_flight:
                sent[(i, version[i])] = time.time()
                await system.publish(keys[i], event)

        try:
            # Each event's task is made when it is due, not all of them up front (5,000 task
            # steps in one go held the publisher's loop ~75 ms at the start of the phase).
            start = time.monotonic()
            tasks = []
            for k in range(args.events):
                delay = start + k / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)
            await asyncio.sleep(1.0)
        finally:
            gc.enable()
        cpu_d, redis1 = _cpu(pids), _redis_cpu(system)
        if system.delivered is not None and written0 is not None:
            fig.written_ms = _written_within(written0, await system.delivered())
        # Before the streams close: closing 10,000 at once is not a phase measured here.
        longest = await system.gc_longest()
        fig.gc_longest_ms = None if longest is None else longest * 1000
        reports = await _ask(clients, "stop")
        received: dict[tuple[int, int], float] = {}
        for share, report in zip(shares, reports, strict=True):
            for local, ver, at in report["events"]:
                received[(share[local], ver)] = at
        latencies = [received[k] - t for k, t in sent.items() if k in received]
        fig.lost = len(sent) - len(latencies)
        fig.cpu_per_event_us = (cpu_d - cpu_c) / max(1, len(latencies)) * 1e6
        fig.redis_cpu_per_event_us = (redis1 - redis0) / max(1, len(latencies)) * 1e6
        fig.latency_ms = (
            percentile(latencies, 50) * 1000,
            percentile(latencies, 99) * 1000,
            max(latencies, default=float("nan")) * 1000,
        )
    finally:
        reap(clients)
    return fig


# -- the table --------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(results: dict[str, Figures], args: argparse.Namespace) -> str:
    """The table: the gateway, nchan and the gateway/nchan ratio, then the bare aiohttp-sse
    server and the gateway/bare ratio (what the gateway costs beyond aiohttp itself)."""
    gw = results.get("gateway")
    rows: list[list[object]] = []

    def row(label: str, get: Callable[[Figures], float], fmt: str) -> None:
        a = get(gw) if gw else None
        cells: list[object] = [label, "-" if a is None else format(a, fmt)]
        for peer in ("nchan", "bare"):
            f = results.get(peer)
            b = get(f) if f else None
            cells.append("-" if b is None else format(b, fmt))
            cells.append(_ratio(a, b) if a is not None and b is not None else "-")
        rows.append(cells)

    row("RSS per idle stream (KiB)", lambda f: f.rss_per_stream_kib, ".1f")
    row("server CPU per stream opened (us)", lambda f: f.cpu_per_open_us, ".0f")
    row("streams opened per second", lambda f: f.opens_per_s, ",.0f")
    row("Redis commands per stream opened", lambda f: f.redis_commands_per_open, ".2f")
    row("Redis CPU per stream opened (us)", lambda f: f.redis_cpu_per_open_us, ".0f")
    row(f"idle CPU, {args.streams:,} streams (% of a core)", lambda f: f.idle_cpu_pct, ".2f")
    row("CPU per keep-alive written (us)", lambda f: f.cpu_per_keepalive_us, ".1f")
    row("server CPU per event delivered (us)", lambda f: f.cpu_per_event_us, ".0f")
    row("Redis CPU per event delivered (us)", lambda f: f.redis_cpu_per_event_us, ".0f")
    row("publish -> received p50 (ms)", lambda f: f.latency_ms[0], ".2f")
    row("publish -> received p99 (ms)", lambda f: f.latency_ms[1], ".2f")
    row("publish -> received max (ms)", lambda f: f.latency_ms[2], ".2f")
    row("events lost", lambda f: f.lost, "d")
    row("failed opens", lambda f: f.failed_opens, "d")
    row("keep-alives received in the idle window", lambda f: f.keepalives, ",d")
    headers = ["figure", "stream-gateway", "nginx + nchan", "ratio", "bare aiohttp-sse", "ratio"]
    out = table(headers, rows)
    if gw is not None:
        gc = "n/a" if gw.gc_longest_ms is None else f"{gw.gc_longest_ms:.1f} ms"
        out += (
            "\ngateway's longest garbage collection until the streams closed "
            f"(gc.callbacks probe, wall clock): {gc}"
        )
    if gw is not None and gw.written_ms is not None:
        p99, most = gw.written_ms
        out += (
            "\ngateway's own change -> written time (its delivery histogram, events phase): "
            f"99 % within {p99:g} ms, all within {most:g} ms"
        )
    return out


NOT_THE_SAME = """\
Not the same work:
- the gateway reads each session's status on open (from its status cache, batched MGETs)
  after Redis confirmed the SUBSCRIBE; nchan replays the message it stored for the channel,
  asking Redis itself (its Redis commands and CPU per open above: work nginx's CPU omits);
- the gateway's events are published by Redis itself (the cache-and-publish script, Redis
  CPU above); nchan's arrive as HTTP POSTs to nginx, so nginx's CPU per event includes
  parsing a publish request and storing the message in Redis;
- the gateway checks each event (JSON decoded, versions compared) before writing it;
  nchan forwards bytes;
- both keep-alives are an SSE comment line (the gateway's `: ping`, nchan's its ping comment);
- the gateway runs its middlewares on every open (request id, CORS, structured logging);
- the bare aiohttp-sse server is aiohttp-sse as its README writes a stream (a ping task per
  stream) with no Redis, no status read, no validation and no middleware: the same HTTP
  and SSE work as the gateway, so gateway/bare is what the gateway's own code costs;
- figures are from one 2-core machine shared with the client processes: compare ratios."""


@contextlib.contextmanager
def _workdir(keep: str | None, which: str) -> Iterator[str]:
    """A temporary folder for configs and logs, or `--log-dir`/<system> to keep them."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix=f"paypush-peer-{which}-") as tmp:
            yield tmp
        return
    path = Path(keep) / which
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    yield str(path)


async def main_async(args: argparse.Namespace) -> None:
    raise_nofile()
    results: dict[str, Figures] = {}
    factories = {"nchan": nchan_system, "bare": bare_system, "gateway": gateway_system}
    for which, factory in factories.items():
        if args.only not in (None, which):
            continue
        with _workdir(args.log_dir, which) as tmp:
            async with factory(Path(tmp), args) as system:
                print(f"{system.name}: {args.streams:,} streams ...", flush=True)
                results[which] = await measure(system, args)
    print()
    print(
        f"{args.streams:,} streams over {args.clients} client processes; idle {args.idle:g} s "
        f"with a {args.keepalive:g} s keep-alive; {args.events:,} events at {args.rate:g}/s"
    )
    print(report(results, args))
    print()
    print(NOT_THE_SAME)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        raise_nofile()
        asyncio.run(client_main(int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--connect-concurrency", type=int, default=250)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--keepalive", type=float, default=15.0)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--only", choices=("gateway", "nchan", "bare"))
    parser.add_argument("--log-dir", help="keep configs and server logs here")
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
