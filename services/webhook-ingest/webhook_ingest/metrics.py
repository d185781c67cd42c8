"""The ingest's Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=registry,
            ),
            resync_backlog=Gauge(
                "paypush_resync_backlog",
                "Sessions whose status still waits to reach Redis",
                registry=registry,
            ),
        )
