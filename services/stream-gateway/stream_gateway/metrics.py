"""The gateway's Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.web import LATENCY_BUCKETS


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
        )
