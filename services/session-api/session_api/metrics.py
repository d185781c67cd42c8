"""session-api's Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass(frozen=True, slots=True)
class SessionMetrics:
    sessions: Counter
    status_reads: Counter
    status_db_queries: Counter
    cleanup_expired: Counter
    cleanup_deleted: Counter
    # Children of `status_reads`, bound once: the status read is the hot path.
    reads_found: Counter
    reads_not_found: Counter
    reads_invalid: Counter
    reads_store_unavailable: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> SessionMetrics:
        status_reads = Counter(
            "paypush_status_reads",
            "Status reads (`GET /api/webhooks?uuid=`) by result",
            ["result"],
            registry=registry,
        )
        return cls(
            sessions=Counter(
                "paypush_session_requests",
                "Session create requests by outcome",
                ["outcome"],
                registry=registry,
            ),
            status_reads=status_reads,
            status_db_queries=Counter(
                "paypush_status_db_queries",
                "MongoDB queries made by status reads (cache misses, single-flight)",
                registry=registry,
            ),
            cleanup_expired=Counter(
                "paypush_cleanup_expired_sessions",
                "Pending sessions the cleanup moved to expired",
                registry=registry,
            ),
            cleanup_deleted=Counter(
                "paypush_cleanup_deleted_records",
                "Expired records the cleanup deleted",
                ["collection"],
                registry=registry,
            ),
            reads_found=status_reads.labels("found"),
            reads_not_found=status_reads.labels("not_found"),
            reads_invalid=status_reads.labels("invalid"),
            reads_store_unavailable=status_reads.labels("store_unavailable"),
        )
