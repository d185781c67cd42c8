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
    # The child of `status_reads` a cached read counts, bound once: the hot path.
    reads_found: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> SessionMetrics:
        status_reads = Counter(
            "paypush_status_reads",
            "Status reads (`GET /api/webhooks?uuid=`) by result",
            ["result"],
            registry=registry,
        )
        # Every outcome's series exists from the start (at 0); the others are counted by
        # the label of the domain error that ended the read.
        for outcome in ("not_found", "invalid", "store_unavailable"):
            status_reads.labels(outcome)
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
        )
