"""Garbage collection for a process holding 10,000 long-lived streams.

Each open stream is a few dozen objects the cyclic collector tracks (aiohttp's request,
protocol, response, the handler's task and frames, the listener). CPython collects its
oldest generation whenever it has grown by a quarter, walking every one of them: with
10,000 streams, tens to hundreds of milliseconds during which no stream of the process gets
an event. So here the young generations are collected as usual (short: they hold only what
was created since), the automatic full collection is held back, and one full collection
runs on a schedule (`Settings.gc_full_collection_seconds`) to reclaim the cycles that died
old. A stream's own objects do not wait for it: they form no cycle once the stream ends
(the listener drops its sender), so reference counting frees them at once.

`shared.runner.freeze_heap` has already moved what was built before serving out of sight.
"""

from __future__ import annotations

import asyncio
import gc

import structlog

log = structlog.get_logger(__name__)

# Generation 2 is collected after this many generation-1 collections only (and, as always,
# only once it grew by a quarter): never, in practice; the schedule below does it instead.
HELD_BACK = 1_000_000


def hold_back_full_collections() -> tuple[int, int, int]:
    """Keep the young generations' thresholds, hold back the old one; the previous ones."""
    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], HELD_BACK)
    return before


def restore_thresholds(thresholds: tuple[int, int, int]) -> None:
    gc.set_threshold(*thresholds)


async def collect_on_schedule(seconds: float) -> None:
    """A full collection every `seconds` (supervised; until cancelled)."""
    while True:
        await asyncio.sleep(seconds)
        collected = gc.collect()
        log.info("gc_full_collection", collected=collected, tracked=len(gc.get_objects()))
