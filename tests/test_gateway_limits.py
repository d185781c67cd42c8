"""The gateway's capacity as a container runs it (issue 15): a soft open file limit of 1,024
(what container runtimes give a process) raised at start-up, and MAX_STREAMS.

The 5,000-stream test runs the gateway as a process (`python -m stream_gateway` under
`ulimit -Sn 1024`) and its clients in another (`tests.stream_clients`): about 10 s here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import resource
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from devstack.servers import Process, free_port, http_ok
from shared.cache import StatusCache
from shared.model import StatusEvent, StreamStatus
from shared.settings import Settings

STREAMS = 5_000
CONTAINER_SOFT_NOFILE = 1024
ROOT = Path(__file__).resolve().parent.parent


def pending(uuid: str, order_code: int) -> StatusEvent:
    return StatusEvent(
        uuid=uuid,
        order_code=order_code,
        status=StreamStatus.PENDING,
        amount=10_000,
        amount_paid=0,
        updated_at=datetime.now(UTC),
        version=1,
    )


async def cache_pending(settings: Settings, count: int) -> list[str]:
    """`count` waiting sessions, in the cache (where the gateway reads a first event)."""
    uuids = [str(uuidlib.uuid4()) for _ in range(count)]
    redis = Redis.from_url(settings.redis_url)
    try:
        await StatusCache(redis).put_many(pending(u, 900_000 + i) for i, u in enumerate(uuids))
    finally:
        await redis.aclose()
    return uuids


def gateway_process(settings: Settings, log_dir: Path, soft_nofile: int) -> Process:
    port = free_port()
    env = {**settings.env(), "STREAM_GATEWAY_PORT": str(port), "LOG_LEVEL": "INFO"}
    # As a container runtime starts it: soft limit 1,024, hard limit as high as the node's.
    command = f"ulimit -Sn {soft_nofile} && exec {sys.executable} -m stream_gateway"
    return Process(
        "stream-gateway",
        ["sh", "-c", command],
        port=port,
        env=env,
        log_dir=log_dir,
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
    )


@contextlib.contextmanager
def started(process: Process) -> Iterator[Process]:
    process.start()
    try:
        yield process
    finally:
        process.stop()


@contextlib.asynccontextmanager
async def stream_clients(port: int, uuids: list[str]) -> AsyncIterator[dict[str, object]]:
    """The raw-socket clients' process, holding a stream for each uuid; yields its report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.stream_clients",
        str(port),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(uuids).encode() + b"\n")
        await proc.stdin.drain()
        async with asyncio.timeout(120):
            report: dict[str, object] = json.loads(await proc.stdout.readline())
        yield report
        proc.stdin.write(b"stop\n")
        await proc.stdin.drain()
        async with asyncio.timeout(30):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def nofile_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert match is not None, name
    return float(match.group(1))


async def test_gateway_started_with_a_soft_limit_of_1024_holds_5000_streams(
    settings: Settings, tmp_path: Path
) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < STREAMS + 512:
        pytest.skip(f"the hard open file limit here ({hard}) is below {STREAMS} streams")
    uuids = await cache_pending(settings, STREAMS)
    with started(gateway_process(settings, tmp_path, CONTAINER_SOFT_NOFILE)) as gateway:
        soft_now, hard_now = nofile_limits(gateway.pid)
        assert soft_now == hard_now == hard, "the soft limit was raised to the hard one"
        base = f"http://127.0.0.1:{gateway.port}"
        began = time.monotonic()
        async with stream_clients(gateway.port, uuids) as report:
            opened_in = time.monotonic() - began
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                stats = (await http.get("/api/stats")).json()
                metrics = (await http.get("/metrics")).text
        assert report["open"] == STREAMS, report
        assert stats["connectionCount"] == STREAMS
        assert stats["activeSubscriptions"] == STREAMS
        assert metric(metrics, "paypush_stream_open") == STREAMS
        assert metric(metrics, "paypush_stream_limit") == Settings().max_streams
    # Both limits are logged at start-up.
    [line] = [
        json.loads(raw)
        for raw in gateway.log_path.read_text().splitlines()
        if '"process_limits"' in raw
    ]
    assert line["nofile_soft_at_start"] == CONTAINER_SOFT_NOFILE
    assert line["nofile_soft"] == line["nofile_hard"] == hard
    print(f"\n{STREAMS} streams open in {opened_in:.1f} s under `ulimit -Sn 1024`")


async def test_max_streams_refuses_with_503_and_retry_after_before_any_stream(
    settings: Settings, tmp_path: Path
) -> None:
    """Over MAX_STREAMS: 503 JSON with Retry-After, no stream, counted; a freed place is
    taken again."""
    limited = dataclasses.replace(settings, max_streams=3)
    uuids = await cache_pending(limited, 4)
    with started(gateway_process(limited, tmp_path, CONTAINER_SOFT_NOFILE)) as gateway:
        base = f"http://127.0.0.1:{gateway.port}"
        async with (
            stream_clients(gateway.port, uuids) as report,
            httpx.AsyncClient(base_url=base, timeout=10) as http,
        ):
            refused = await http.get("/api/webhooks/stream", params={"uuid": uuids[0]})
            metrics = (await http.get("/metrics")).text
            stats = (await http.get("/api/stats")).json()
        assert report["statuses"] == {"200": 3, "503": 1}, report
        assert refused.status_code == 503
        assert refused.headers["Content-Type"].startswith("application/json")
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["success"] is False and refused.json()["retryable"] is True
        assert stats["connectionCount"] == 3
        assert metric(metrics, 'paypush_stream_rejected_total{reason="full"}') == 2
        assert metric(metrics, "paypush_stream_limit") == 3
        # The streams closed: places are free again.
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            async with asyncio.timeout(10):
                while (await http.get("/api/stats")).json()["connectionCount"]:
                    await asyncio.sleep(0.05)
            async with http.stream(
                "GET", "/api/webhooks/stream", params={"uuid": uuids[3]}
            ) as resp:
                assert resp.status_code == 200
