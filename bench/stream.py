"""Stream benchmark: N browsers waiting on ONE gateway process, paid at a steady rate.

    python -m bench.stream [--streams 10000] [--rate 500] [--ingest-payments 500]
                           [--ingest-rate 50] [--direct-payments 5000] [--cold-cache]

Starts its own redis-server, MongoDB stand-in, one webhook-ingest and one stream-gateway
process, stores N pending sessions, opens N concurrent SSE streams from 2 client processes
(raw asyncio sockets), then pays sessions at a steady rate: first `--ingest-payments` of them
through webhook-ingest (signed webhooks, at `--ingest-rate`), then `--direct-payments` straight
into the status cache and feed (what the ingest does last) at `--rate`, so the gateway sees
500 events/s even though the ingest over the SQLite-backed MongoDB stand-in cannot go that
fast. New sessions' statuses are cached first, as session-api does on create. Prints streams
held, gateway RSS per stream, the gateway's Redis connections, event latency p50/p99/max, and
the polling baseline (`GET /api/webhooks?uuid=` every 3 s and 5 s) against push, same N users.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp

from devstack.seed import store_pending_sessions
from devstack.servers import Process, free_port
from devstack.system import Backends, plan
from shared.cache import StatusCache
from shared.model import StatusEvent
from shared.mongo import Store, mongo_client
from shared.settings import Settings

from ._common import (
    AMOUNT,
    CHECKSUM_KEY,
    Paid,
    backends,
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
# What a browser's EventSource sends (Chromium, trimmed of cookies): counted as wire bytes.
BROWSER_HEADERS = (
    "Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36\r\n"
    "Origin: http://127.0.0.1:8083\r\nAccept-Encoding: gzip, deflate, br\r\n"
    "Accept-Language: en-US,en;q=0.9\r\n"
)
POLL_HEADERS = BROWSER_HEADERS.replace("text/event-stream", "*/*").replace(
    "Cache-Control: no-cache\r\n", ""
)
# How long the original deposit dialog waits (and so how long one stream lives at most).
WAIT_MINUTES = 10


# -- the client processes ----------------------------------------------------------------


def request_bytes(path: str, port: int, headers: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode()


async def client_main(port: int, deadline: float, connect_concurrency: int) -> None:
    """A client process: read uuids on stdin, open a stream each, report when each is paid."""
    uuids: list[str] = json.loads(sys.stdin.readline())
    done_at: dict[str, float] = {}
    opening: dict[str, int] = {}
    failures = 0
    gate = asyncio.Semaphore(connect_concurrency)
    opened = 0
    all_open = asyncio.Event()

    async def one(uuid: str) -> None:
        nonlocal opened, failures
        try:
            async with gate:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                req = request_bytes(f"{STREAM_PATH}?uuid={uuid}", port, BROWSER_HEADERS)
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
                first = await reader.readuntil(b"\r\n\r\n\r\n")  # chunk size, event, chunk end
                opening[uuid] = len(req) + len(head) + len(first)
        except (OSError, RuntimeError, asyncio.IncompleteReadError):
            failures += 1
            return
        finally:
            opened += 1
            if opened == len(uuids):
                all_open.set()
        try:
            while line := await reader.readline():
                if line.startswith(b"data: ") and b'"status":"done"' in line:
                    done_at[uuid] = time.monotonic()
                    break
        except OSError:
            pass
        writer.close()

    async def report_open() -> None:
        await all_open.wait()
        print(json.dumps({"open": len(opening), "failures": failures}), flush=True)

    reporter = asyncio.create_task(report_open())
    tasks = [asyncio.create_task(one(u)) for u in uuids]
    # The parent writes a line once every payment is made: the stragglers get a grace period.
    stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
    remaining = deadline - time.time()
    await asyncio.wait([stop], timeout=max(1.0, remaining))
    await asyncio.wait(tasks, timeout=2.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, reporter, return_exceptions=True)
    print(json.dumps({"done_at": done_at, "opening_bytes": opening}), flush=True)


# -- the parent: servers, sessions, payments, figures -------------------------------------


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url) as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith(name + "_created"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def raw_exchange(port: int, path: str, headers: str) -> tuple[int, int, int]:
    """(request bytes, response bytes, status) of one real request, as on the wire."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = request_bytes(path, port, headers + "Connection: close\r\n")
    writer.write(req)
    resp = await reader.read()
    writer.close()
    return len(req), len(resp), int(resp.split(b" ", 2)[1])


async def polling_sample(
    port: int, uuids: list[str], requests: int, concurrency: int, metrics_url: str
) -> dict[str, float]:
    """A short real polling run against session-api: capacity, latency, MongoDB queries."""
    conn = aiohttp.TCPConnector(limit=concurrency)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=conn) as http:
        q0 = await metric(http, metrics_url, "paypush_status_db_queries")
        it = iter(range(requests))

        async def worker() -> None:
            for i in it:
                t0 = time.perf_counter()
                url = f"http://127.0.0.1:{port}/api/webhooks?uuid={uuids[i % len(uuids)]}"
                async with http.get(url) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        q1 = await metric(http, metrics_url, "paypush_status_db_queries")
    return {
        "rps": requests / elapsed,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "db_per_request": (q1 - q0) / requests,
    }


def ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {percentile(values, 50) * 1000:.1f} ms  p99 {percentile(values, 99) * 1000:.1f} ms"
        f"  max {max(values) * 1000:.1f} ms  (n={len(values)})"
    )


def human(n: float) -> str:
    for unit in ("", "Ki", "Mi", "Gi"):
        if abs(n) < 1024:
            return f"{n:,.1f} {unit}B"
        n /= 1024
    return f"{n:,.1f} TiB"


async def run(args: argparse.Namespace, env: Backends) -> None:
    n = args.streams
    base = Settings.from_env(
        {},
        payos_checksum_key=CHECKSUM_KEY,
        log_level="WARNING",
        app_env="development",
        stream_gateway_port=free_port(),
        webhook_ingest_port=free_port(),
        session_api_port=free_port(),
    )
    services = ("webhook-ingest", "stream-gateway", "session-api")
    system = plan(base, env, services=services, own_ports=True, owns_backends=False)
    settings = system.settings
    gateway, ingest = system.gateways[0], system.ingest
    apis = system.replicas.get("session-api", [])
    api: Process | None = apis[0] if apis else None
    gw_port, ingest_port, api_port = gateway.port, ingest.port, settings.session_api_port
    clients: list[subprocess.Popen[str]] = []
    store = Store(mongo_client(settings))
    redis = redis_for(env.redis_url)
    try:
        await asyncio.to_thread(system.start)
        await store.ensure_indexes()
        t0 = time.monotonic()
        docs = await store_pending_sessions(store, n, amount=AMOUNT)
        print(f"{n:,} pending sessions stored in {time.monotonic() - t0:.1f} s")
        if not args.cold_cache:
            # What session-api does when it creates a session: cache its status.
            warm = StatusCache(redis)
            for d in docs:
                await warm.put(StatusEvent.from_session(d))

        gw_metrics = f"http://127.0.0.1:{gw_port}/metrics"
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(0.5)
            rss_before = rss_kib(gateway.pid)
            db_before = await metric(http, gw_metrics, "paypush_stream_db_queries")

            # Open every stream, from CLIENT_PROCESSES processes.
            deadline = time.time() + args.max_seconds
            shares = [
                [d["uuid"] for d in docs[i::CLIENT_PROCESSES]] for i in range(CLIENT_PROCESSES)
            ]
            t0 = time.monotonic()
            for share in shares:
                argv = ["bench.stream", "--client", str(gw_port), "--deadline", str(deadline)]
                clients.append(await asyncio.to_thread(spawn_client, argv, share))
            opened = failures = 0
            for p in clients:
                assert p.stdout is not None
                line = await asyncio.to_thread(p.stdout.readline)
                report = json.loads(line)
                opened += report["open"]
                failures += report["failures"]
            open_s = time.monotonic() - t0
            await asyncio.sleep(1.0)
            rss_after = rss_kib(gateway.pid)
            async with http.get(f"http://127.0.0.1:{gw_port}/api/stats") as resp:
                stats = await resp.json()
            db_after = await metric(http, gw_metrics, "paypush_stream_db_queries")
            named = f"stream-gateway-{gateway.pid}-"
            conns = [c for c in await redis.client_list() if c["name"].startswith(named)]
            print(
                f"opened {opened:,} streams in {open_s:.1f} s ({failures} failed); "
                f"gateway reports {stats['connectionCount']:,} streams, "
                f"{stats['activeSubscriptions']:,} subscriptions"
            )

            # Pay: first through the ingest, then straight into the cache and feed.
            ingest_docs = docs[: args.ingest_payments]
            direct_docs = docs[args.ingest_payments : args.ingest_payments + args.direct_payments]
            url = f"http://127.0.0.1:{ingest_port}/api/webhooks"
            bodies = {d["uuid"]: signed_body(d["orderCode"]) for d in ingest_docs}

            async def via_ingest(doc: dict[str, Any]) -> bool:
                return await post_webhook(http, url, bodies[doc["uuid"]])

            cache = StatusCache(redis)

            async def direct(doc: dict[str, Any]) -> bool:
                return await pay_directly(cache, doc)

            paid_ingest, ingest_s = await paced(ingest_docs, args.ingest_rate, 256, via_ingest)
            paid_direct, direct_s = await paced(direct_docs, args.rate, 256, direct)

            results: dict[str, float] = {}
            opening_bytes: list[int] = []
            for report in await stop_clients(clients):
                results.update(report["done_at"])
                opening_bytes.extend(report["opening_bytes"].values())
            api_ok = api is not None and api.running
            poll = None
            exchange = None
            if api_ok:
                sample = [d["uuid"] for d in docs[:1000]]
                exchange = await raw_exchange(
                    api_port, f"/api/webhooks?uuid={sample[0]}", POLL_HEADERS
                )
                poll = await polling_sample(
                    api_port,
                    sample,
                    args.poll_requests,
                    50,
                    f"http://127.0.0.1:{api_port}/metrics",
                )
    finally:
        reap(clients)
        await redis.aclose()
        await store.client.close()
        await asyncio.to_thread(system.stop)

    # -- figures ----------------------------------------------------------------------
    def latencies(paid: list[Paid], frm: str) -> list[float]:
        out = []
        for p in paid:
            t = results.get(p.uuid)
            if t is not None:
                out.append(max(0.0, t - (p.acked if frm == "ack" else p.sent)))
        return out

    def delivered(paid: list[Paid]) -> int:
        return sum(1 for p in paid if p.uuid in results)

    per_stream = (rss_after - rss_before) * 1024 / max(opened, 1)
    roles = ", ".join(sorted(c["name"].rsplit("-", 1)[1] for c in conns))
    print()
    print(
        table(
            ["figure", "value", "target"],
            [
                ["streams held by one gateway process", f"{stats['connectionCount']:,}", "10,000"],
                ["gateway RSS before / after opening", f"{rss_before:,} / {rss_after:,} KiB", ""],
                ["gateway RSS per stream", human(per_stream), "<= 20 KiB"],
                [
                    "gateway Redis connections",
                    f"{len(conns)} ({roles})",
                    "<= 2",
                ],
                ["MongoDB queries to open the streams", f"{db_after - db_before:,.0f}", ""],
            ],
        )
    )
    print()
    rows = [
        [
            "through webhook-ingest",
            f"{len(paid_ingest):,}",
            f"{len(paid_ingest) / max(ingest_s, 1e-9):,.0f}/s",
            f"{delivered(paid_ingest):,}",
            ms(latencies(paid_ingest, "ack")),
            ms(latencies(paid_ingest, "sent")),
        ],
        [
            "straight to cache + feed",
            f"{len(paid_direct):,}",
            f"{len(paid_direct) / max(direct_s, 1e-9):,.0f}/s",
            f"{delivered(paid_direct):,}",
            "-",
            ms(latencies(paid_direct, "sent")),
        ],
    ]
    print(
        f"payments while {stats['connectionCount']:,} streams open: through the ingest at "
        f"{args.ingest_rate:g}/s, then straight to the cache + feed at {args.rate:g}/s"
    )
    print(
        table(
            [
                "paid",
                "count",
                "rate",
                "events read",
                "latency: webhook acked -> event read",
                "latency: sent -> event read",
            ],
            rows,
        )
    )

    # -- push vs polling, for the same N waiting users ----------------------------------
    open_bytes = sum(opening_bytes) / max(len(opening_bytes), 1)
    # A keep-alive is `: ping\r\n\r\n` in one chunk ("a\r\n" ... "\r\n"); the final event is
    # about the size of the first one.
    event_bytes = open_bytes - len(request_bytes("x", gw_port, BROWSER_HEADERS))
    ping_bytes = 15
    keepalive = settings.sse_keepalive_seconds
    push_req_min = n / WAIT_MINUTES
    push_bytes_min = n * (60 / keepalive) * ping_bytes + push_req_min * (open_bytes + event_bytes)
    push_db_min = push_req_min * (db_after - db_before) / max(opened, 1)
    if exchange is not None:
        poll_bytes = exchange[0] + exchange[1]
        poll_source = f"measured: {exchange[0]} B request + {exchange[1]} B response"
    else:
        poll_bytes = len(request_bytes("/api/webhooks?uuid=" + "0" * 36, api_port, POLL_HEADERS))
        poll_bytes += 400
        poll_source = "estimated (session-api not available): request + ~400 B response"
    db_per_poll = poll["db_per_request"] if poll else 0.0
    print()
    print(f"push vs polling for {n:,} waiting users ({WAIT_MINUTES}-minute wait)")
    print(f"  polling request+response: {poll_bytes} B on the wire ({poll_source})")
    print(
        f"  SSE stream: opening {open_bytes:,.0f} B (request, headers, first event), "
        f"{ping_bytes} B keep-alive every {keepalive:g} s"
    )
    rows = [
        [
            "push (SSE)",
            f"{push_req_min:,.0f}",
            human(push_bytes_min),
            f"{push_db_min:,.0f}",
            "1",
            "1",
        ]
    ]
    for every in (3, 5):
        req_min = n * 60 / every
        rows.append(
            [
                f"polling every {every} s",
                f"{req_min:,.0f}",
                human(req_min * poll_bytes),
                f"{req_min * db_per_poll:,.1f}",
                f"{req_min / push_req_min:,.0f}x",
                f"{req_min * poll_bytes / push_bytes_min:,.1f}x",
            ]
        )
    print(
        table(
            [
                "approach",
                "requests/min",
                "bytes/min",
                "MongoDB queries/min",
                "requests vs push",
                "bytes vs push",
            ],
            rows,
        )
    )
    if poll is not None:
        print(
            f"  real polling sample ({args.poll_requests:,} requests, 50 concurrent, one "
            f"session-api process): {poll['rps']:,.0f} req/s, p50 {poll['p50'] * 1000:.1f} ms, "
            f"p99 {poll['p99'] * 1000:.1f} ms, {db_per_poll:.3f} MongoDB queries per request; "
            f"polling {n:,} users every 3 s needs {n / 3:,.0f} req/s "
            f"= {n / 3 / poll['rps']:.1f} such processes"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=500, help="payments per second")
    parser.add_argument("--ingest-payments", type=int, default=500)
    parser.add_argument(
        "--ingest-rate",
        type=float,
        default=50,
        help="payments/s through the ingest (bounded by the MongoDB stand-in)",
    )
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="do not cache the new sessions' status first (every stream opens from MongoDB)",
    )
    parser.add_argument("--direct-payments", type=int, default=5_000)
    parser.add_argument("--poll-requests", type=int, default=3_000)
    parser.add_argument("--max-seconds", type=float, default=180, help="bound on the run")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile()
    if args.client is not None:
        asyncio.run(client_main(args.client, args.deadline, 128))
        return
    with backends() as env:
        asyncio.run(run(args, env))


if __name__ == "__main__":
    main()
