"""The gateway's Prometheus metrics."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.web import LATENCY_BUCKETS

log = structlog.get_logger(__name__)

# A collection this long stalls every stream past the latency the gateway aims for: logged.
LONG_GC_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class GatewayMetrics:
    open_streams: Gauge
    subscriptions: Gauge
    pubsub_connected: Gauge
    pubsub_connects: Counter
    events: Counter
    latency: Histogram
    resync_reads: Counter
    db_queries: Counter
    rejected: Counter
    stream_limit: Gauge
    gc_longest: Gauge
    gc_longest_cpu: Gauge
    gc_pauses: Histogram
    # When the running collection started (wall clock, CPU clock), and the longest so far
    # (wall, CPU); mutable, the class is frozen.
    _gc: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])

    def gc_probe(self, phase: str, info: dict[str, Any]) -> None:
        """A `gc.callbacks` hook: every collection pauses every stream of the process, so
        its length is a latency floor worth watching."""
        if phase == "start":
            self._gc[0], self._gc[1] = time.perf_counter(), time.thread_time()
            return
        pause = time.perf_counter() - self._gc[0]
        # The collector's own work; on a crowded machine the wall-clock pause also holds
        # the time the process waited for a core.
        cpu = time.thread_time() - self._gc[1]
        if cpu > self._gc[3]:
            self._gc[3] = cpu
            self.gc_longest_cpu.set(cpu)
        self.gc_pauses.labels(str(info.get("generation", "?"))).observe(pause)
        if pause > LONG_GC_SECONDS:
            log.warning(
                "gc_pause_long",
                ms=round(pause * 1000, 1),
                cpu_ms=round(cpu * 1000, 1),
                generation=info.get("generation"),
                collected=info.get("collected"),
                tracked=len(gc.get_objects(info.get("generation", 2))),
            )
        if pause > self._gc[2]:
            self._gc[2] = pause
            self.gc_longest.set(pause)

    def watch_gc(self) -> None:
        gc.callbacks.append(self.gc_probe)

    def unwatch_gc(self) -> None:
        if self.gc_probe in gc.callbacks:
            gc.callbacks.remove(self.gc_probe)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        return cls(
            open_streams=Gauge(
                "paypush_stream_open", "SSE streams open in this process", registry=registry
            ),
            subscriptions=Gauge(
                "paypush_stream_subscriptions",
                "Sessions subscribed on this process's pub/sub connection",
                registry=registry,
            ),
            pubsub_connected=Gauge(
                "paypush_stream_pubsub_connected",
                "1 while the pub/sub connection to Redis is up",
                registry=registry,
            ),
            pubsub_connects=Counter(
                "paypush_stream_pubsub_connects",
                "Pub/sub connections made (more than one: reconnects)",
                registry=registry,
            ),
            events=Counter(
                "paypush_stream_events_delivered",
                "Events written to streams, by origin",
                ["origin"],
                registry=registry,
            ),
            latency=Histogram(
                "paypush_stream_delivery_seconds",
                "From the status change (the event's updatedAt) to its write on a stream",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            resync_reads=Counter(
                "paypush_stream_resync_reads",
                "Statuses read again after a pub/sub (re)connect",
                registry=registry,
            ),
            db_queries=Counter(
                "paypush_stream_db_queries",
                "Status reads that went to MongoDB",
                registry=registry,
            ),
            rejected=Counter(
                "paypush_stream_rejected",
                "Streams refused with 503 before they started: `full` (MAX_STREAMS or the "
                "open file limit reached), `closing` (shutting down)",
                ["reason"],
                registry=registry,
            ),
            stream_limit=Gauge(
                "paypush_stream_limit",
                "Streams this process admits at most (MAX_STREAMS, kept below the file limit)",
                registry=registry,
            ),
            gc_longest=Gauge(
                "paypush_gc_longest_pause_seconds",
                "The longest garbage collection of this process so far",
                registry=registry,
            ),
            gc_longest_cpu=Gauge(
                "paypush_gc_longest_pause_cpu_seconds",
                "The CPU time of the longest garbage collection so far (the wall-clock pause "
                "less the time the process waited for a core)",
                registry=registry,
            ),
            gc_pauses=Histogram(
                "paypush_gc_pause_seconds",
                "Garbage collections of this process, by generation",
                ["generation"],
                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
                registry=registry,
            ),
        )
