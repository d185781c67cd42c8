"""The ingest's Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.web import LATENCY_BUCKETS


@dataclass(frozen=True, slots=True)
class IngestMetrics:
    webhooks: Counter
    latency: Histogram
    resync_backlog: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> IngestMetrics:
        return cls(
            webhooks=Counter(
                "paypush_webhooks",
                "Webhook deliveries by outcome",
                ["outcome"],
                registry=registry,
            ),
            latency=Histogram(
                "paypush_webhook_seconds",
                "Time from request to acknowledgement",
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
            resync_backlog=Gauge(
                "paypush_resync_backlog",
                "Sessions whose status still waits to reach Redis",
                registry=registry,
            ),
        )
