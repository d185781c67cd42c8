"""session-api's Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True, slots=True)
class SessionMetrics:
    sessions: Counter
    cancels: Counter
    status_reads: Counter
    status_db_queries: Counter
    cleanup_expired: Counter
    cleanup_deleted: Counter
    # The child of `status_reads` a cached read counts, bound once: the hot path.
    reads_found: Counter
    # Issue 11: reconciliation with PayOS, and the payment ledger.
    reconcile_checked: Counter
    reconcile_recovered: Counter
    reconcile_payos_errors: Counter
    reconcile_leader: Gauge
    issues_open: Gauge

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
            cancels=Counter(
                "paypush_session_cancels",
                "Cancel requests (`POST /api/sessions/{uuid}/cancel`) by outcome",
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
            reconcile_checked=Counter(
                "paypush_reconcile_sessions_checked",
                "Sessions the reconciler asked PayOS about",
                registry=registry,
            ),
            reconcile_recovered=Counter(
                "paypush_reconcile_transactions_recovered",
                "Transactions PayOS reported that no webhook had brought (counted or recorded)",
                registry=registry,
            ),
            reconcile_payos_errors=Counter(
                "paypush_reconcile_payos_errors",
                "PayOS calls of the reconciler that failed (retried later)",
                registry=registry,
            ),
            reconcile_leader=Gauge(
                "paypush_reconcile_lease_held",
                "1 while this process holds the reconciler's lease",
                registry=registry,
            ),
            issues_open=Gauge(
                "paypush_payment_issues_open",
                "Open items of the payment ledger, by kind",
                ["kind"],
                registry=registry,
            ),
        )


@dataclass(frozen=True, slots=True)
class OutboxMetrics:
    """The shop's events (issue 17): counters of this process's deliveries, and the queue's
    gauges as the dispatcher's lease holder last read them (0 on the other replicas)."""

    leader: Gauge
    pending: Gauge
    unrelayed: Gauge
    oldest_age: Gauge
    delivered: Counter
    retried: Counter
    failed: Counter
    replayed: Counter
    lag: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> OutboxMetrics:
        return cls(
            leader=Gauge(
                "paypush_outbox_leader",
                "1 while this process holds the dispatcher's lease",
                registry=registry,
            ),
            pending=Gauge(
                "paypush_outbox_pending",
                "Deliveries of shop events not yet delivered nor given up (all URLs)",
                registry=registry,
            ),
            unrelayed=Gauge(
                "paypush_outbox_unrelayed_documents",
                "Documents whose outbox holds events not yet in the event log",
                registry=registry,
            ),
            oldest_age=Gauge(
                "paypush_outbox_oldest_undelivered_age_seconds",
                "Age of the oldest pending delivery (0: none)",
                registry=registry,
            ),
            delivered=Counter(
                "paypush_outbox_delivered",
                "Shop events delivered (a 2xx from the receiver)",
                registry=registry,
            ),
            retried=Counter(
                "paypush_outbox_retried",
                "Delivery attempts that failed and were scheduled again",
                registry=registry,
            ),
            failed=Counter(
                "paypush_outbox_failed",
                "Deliveries given up after the retry period (3 days)",
                registry=registry,
            ),
            replayed=Counter(
                "paypush_outbox_replayed",
                "Events put back in the delivery queue by the replay endpoint",
                registry=registry,
            ),
            lag=Histogram(
                "paypush_outbox_delivery_lag_seconds",
                "From the change (the event's timestamp) to its delivery",
                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
                registry=registry,
            ),
        )

    def reset_gauges(self) -> None:
        """No longer the leader: the queue is someone else's to report."""
        for gauge in (self.pending, self.unrelayed, self.oldest_age):
            gauge.set(0)
