"""The gateway's many-stream machinery: one keep-alive pass, one deadline wheel, batched
opening reads. Behaviour at scale, not speed (figures live in `make bench-peer`).

The gateway runs in this process on a real port (so its state can be inspected); the
streams come from `tests.stream_clients` (raw sockets, a process of their own) or, where a
test needs to read every byte, from raw sockets here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.settings import Settings
from stream_gateway import create_app
from stream_gateway import streams as streams_module
from stream_gateway.appkeys import HUB, OPENING_READS, STREAMS
from stream_gateway.streams import KEEPALIVE_SLICE, KEEPALIVE_TICKS, OpenStreams
from tests.test_gateway_limits import cache_pending, stream_clients

STREAM = "/api/webhooks/stream"


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, *, handler_cancellation: bool = True
) -> AsyncIterator[tuple[web.Application, int]]:
    app = create_app(settings)
    server = TestServer(app, handler_cancellation=handler_cancellation)
    await server.start_server()
    try:
        async with asyncio.timeout(10):
            while not app[HUB].connected:
                await asyncio.sleep(0.02)
        assert server.port is not None
        yield app, server.port
    finally:
        await server.close()


async def raw_stream(port: int, uuid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {STREAM}?uuid={uuid} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    async with asyncio.timeout(10):
        await reader.readuntil(b"data: ")
        await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def task_name(task: asyncio.Task[object]) -> str:
    return str(task.get_coro().__qualname__)  # type: ignore[union-attr]


async def until_no_streams(app: web.Application, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while len(app[STREAMS]) or app[HUB].subscription_count:
            await asyncio.sleep(0.02)


async def test_keepalive_comments_reach_every_stream_at_the_interval_from_one_pass(
    settings: Settings,
) -> None:
    interval, window = 0.5, 3.0
    uuids = await cache_pending(settings, 200)
    async with serving(dataclasses.replace(settings, sse_keepalive_seconds=interval)) as (
        app,
        port,
    ):
        streams = [await raw_stream(port, u) for u in uuids]
        # aiohttp's own per connection (its protocol's loop and the request's handler) aside.
        ours = [t for t in asyncio.all_tasks() if "RequestHandler" not in task_name(t)]
        passes_before = app[STREAMS].passes

        async def arrivals(reader: asyncio.StreamReader) -> list[float]:
            """When comments arrived, those read in one go (already waiting) counted once."""
            times: list[float] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(window):
                    while True:
                        await reader.readuntil(b": ping\r\n\r\n")
                        now = time.monotonic()
                        if not times or now - times[-1] > interval / 4:
                            times.append(now)
            return times

        every = await asyncio.gather(*(arrivals(r) for r, _ in streams))
        passes = app[STREAMS].passes - passes_before
        for _, writer in streams:
            writer.close()
    expected = window / interval
    for times in every:
        assert expected - 2 <= len(times) <= expected + 1, times
    # ... from one pass per interval over all of them, with no task of their own.
    assert passes <= expected + 1
    assert len(ours) < 20, [task_name(t) for t in ours]


async def test_a_stream_whose_keepalive_write_fails_is_cut_at_that_write(
    settings: Settings,
) -> None:
    uuids = await cache_pending(settings, 20)
    interval = 2.0
    async with serving(dataclasses.replace(settings, sse_keepalive_seconds=interval)) as (
        app,
        port,
    ):
        streams = [await raw_stream(port, u) for u in uuids]
        try:
            assert len(app[STREAMS]) == len(uuids)
            ticks = app[STREAMS].ticks
            # The server's side of every connection can no longer send (EPIPE on the next
            # write), while nothing reads or closes anything: only a write can find out.
            for stream in app[STREAMS]:
                transport = stream.transport
                assert transport is not None
                transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.2)
            if app[STREAMS].ticks == ticks:
                assert len(app[STREAMS]) == len(uuids), "cut before any write"
            await until_no_streams(app, timeout=interval * 3)
            assert app[STREAMS].ticks > ticks, "cut by a keep-alive write"
        finally:
            for _, writer in streams:
                writer.close()


async def test_the_cap_ends_every_stream_on_time(settings: Settings) -> None:
    cap = 1.0
    uuids = await cache_pending(settings, 300)
    async with serving(
        dataclasses.replace(settings, sse_max_wait_seconds=cap, sse_keepalive_seconds=5)
    ) as (app, port):

        async def lifetime(uuid: str) -> float:
            reader, writer = await raw_stream(port, uuid)
            opened = time.monotonic()
            # The response's last chunk (the connection itself stays open for the next one).
            await reader.readuntil(b"\r\n0\r\n\r\n")
            writer.close()
            return time.monotonic() - opened

        async with asyncio.timeout(15):
            lifetimes = await asyncio.gather(*(lifetime(u) for u in uuids))
        await until_no_streams(app)
    # Each one at its own cap (they opened over a while, not all at once), give or take
    # the time a busy test machine takes to run the loop.
    assert min(lifetimes) > cap * 0.8
    assert max(lifetimes) < cap + 1.0, sorted(lifetimes)[-5:]


async def test_2000_streams_reconnecting_at_once_all_receive_their_first_event(
    settings: Settings,
) -> None:
    uuids = await cache_pending(settings, 2000)
    async with (
        serving(dataclasses.replace(settings, max_streams=2100)) as (app, port),
        stream_clients(port, uuids) as report,
    ):
        assert report == {"open": 2000, "failures": 0, "statuses": {"200": 2000}}
        assert len(app[STREAMS]) == 2000


async def test_ten_rounds_of_1000_streams_opened_and_closed_leave_nothing_behind(
    settings: Settings,
) -> None:
    uuids = await cache_pending(settings, 1000)
    async with serving(dataclasses.replace(settings, max_streams=1100)) as (app, port):
        objects: list[int] = []
        tasks: list[int] = []
        cyclic: list[int] = []
        for _ in range(10):
            async with stream_clients(port, uuids) as report:
                assert report["open"] == 1000
                assert len(app[STREAMS]) == 1000
            await until_no_streams(app)
            await asyncio.sleep(0.1)
            assert not app[OPENING_READS].pending
            cyclic.append(gc.collect())
            objects.append(len(gc.get_objects()))
            tasks.append(len(asyncio.all_tasks()))
    # The first rounds warm caches (interned strings, pools); after that, no growth.
    assert max(objects[2:]) - objects[2] < 500, objects
    assert max(tasks[2:]) == min(tasks[2:]), tasks
    # A stream's own objects form no cycle once it ended: what a collection still finds per
    # stream is the event loop's (asyncio's socket transport; uvloop's leaves none).
    assert max(cyclic[1:]) < 10 * 1000, cyclic


class PassStream:
    """What a keep-alive pass sees of a stream: writable, and a write that cannot wait."""

    def __init__(self, log: list[PassStream]) -> None:
        self.log = log

    def writable(self) -> bool:
        return True

    async def write(self, data: bytes) -> None:
        self.log.append(self)

    def stop_streaming(self) -> None:
        raise AssertionError("no stream of this pass is to be cut")


def pass_streams(n: int) -> tuple[OpenStreams, list[PassStream], list[PassStream]]:
    """`n` streams kept alive by one `OpenStreams`; the list their writes are logged in."""
    written: list[PassStream] = []
    streams = OpenStreams(keepalive_seconds=15, max_wait_seconds=600)
    every = [PassStream(written) for _ in range(n)]
    for stream in every:
        streams.add(stream)  # type: ignore[arg-type]
    return streams, every, written


async def test_keepalives_are_spread_over_the_interval_each_stream_once() -> None:
    # Opened all at once (a reconnect storm), still spread: no tick writes them all.
    streams, every, written = pass_streams(1_000)
    sizes = []
    for group in range(KEEPALIVE_TICKS):
        before = len(written)
        await streams._keepalive_group(group)
        sizes.append(len(written) - before)
    assert sorted(written, key=id) == sorted(every, key=id)  # each stream once
    assert max(sizes) - min(sizes) <= 1, sizes
    assert streams.passes == 1 and streams.ticks == KEEPALIVE_TICKS


async def test_a_stream_that_ends_is_no_longer_in_any_keepalive_group() -> None:
    streams, every, written = pass_streams(200)
    for stream in every[::2]:
        streams.discard(stream)  # type: ignore[arg-type]
    for group in range(KEEPALIVE_TICKS):
        await streams._keepalive_group(group)
    assert sorted(written, key=id) == sorted(every[1::2], key=id)
    assert len(streams) == 100


async def test_a_keepalive_tick_gives_the_loop_a_turn_between_slices_of_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Events for any stream wait while a tick writes: it must not hold the loop for a whole
    # group, however large (here one group holds every stream).
    monkeypatch.setattr(streams_module, "KEEPALIVE_TICKS", 1)
    streams, every, written = pass_streams(1_000)
    seen: list[int] = []

    async def other_work() -> None:
        while len(written) < len(every):
            seen.append(len(written))
            await asyncio.sleep(0)

    ending = every[600]
    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    tick = asyncio.create_task(streams._keepalive_group(0))
    await asyncio.sleep(0)
    streams.discard(ending)  # type: ignore[arg-type] # ended during the tick: not written to
    await tick
    other.cancel()
    steps = [b - a for a, b in itertools.pairwise([0, *seen, len(written)])]
    assert ending not in written and len(written) == len(every) - 1
    assert 0 < max(steps) <= KEEPALIVE_SLICE, steps


async def test_after_a_stall_the_groups_that_fell_due_are_each_written_once() -> None:
    # 1.28 s interval: a tick every 40 ms. The process stalls for 0.8 s (20 ticks late):
    # those groups are written when it wakes, no stream twice before its interval is over.
    streams, every, written = pass_streams(2 * KEEPALIVE_TICKS)
    streams.keepalive_seconds = 1.28
    running = asyncio.create_task(streams.run())
    try:
        await asyncio.sleep(0)
        time.sleep(0.8)  # noqa: ASYNC251 -- the stall itself: nothing else runs
        await asyncio.sleep(0.03)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    counts = [written.count(s) for s in every]
    assert max(counts) == 1, counts
    assert sum(counts) >= 2 * 20, counts


@pytest.fixture(autouse=True)
def _enough_files() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4500:
        pytest.skip(f"the hard open file limit here ({hard}) is too low for these tests")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
