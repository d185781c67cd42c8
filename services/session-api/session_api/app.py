"""session-api's app factory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from shared.appkeys import CACHE, REDIS, SETTINGS, STORE, SUPERVISOR
from shared.cache import BatchedReads
from shared.clients import mongo_ctx, redis_ctx, supervisor_ctx
from shared.ledger import Ledger
from shared.payments import Payments
from shared.payos_client import payos_client
from shared.settings import Settings
from shared.status import StatusReader
from shared.web import (
    cors_middleware,
    error_middleware,
    new_registry,
    request_context_middleware,
)

from .accounts import AccountLinks
from .admin import admin_ctx, setup_console
from .appkeys import (
    ACCOUNT_LINKS,
    CACHED_READS,
    CANCELLATIONS,
    DEPOSIT_PAGE,
    DISPATCHER,
    EVENT_LOG,
    OUTBOX_METRICS,
    PAYMENT_ISSUES,
    PAYOS,
    RATE_LIMITER,
    RECONCILER,
    SESSION_METRICS,
    SESSIONS,
    STATS,
    STATUS_READER,
    TRUSTED_PROXIES,
)
from .cancel import Cancellations
from .dispatcher import Dispatcher
from .document import DepositPage
from .event_log import EventLog
from .issues import PaymentIssues
from .limits import RateLimiter, body_limit_middleware, parse_networks
from .metrics import OutboxMetrics, SessionMetrics
from .page import security_headers
from .reconciler import Reconciler
from .routes import setup_routes
from .sessions import LinkUrls, Sessions
from .stats import StatsSnapshot


async def _payos_ctx(app: web.Application) -> AsyncIterator[None]:
    client = payos_client(app[SETTINGS])
    app[PAYOS] = client
    yield
    await client.aclose()


async def _sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    site = settings.site_public_url.rstrip("/")
    app[SESSIONS] = Sessions(
        app[STORE],
        app[CACHE],
        app[PAYOS],
        max_pending=settings.max_pending_per_account,
        urls=LinkUrls(return_url=f"{site}/?paid=1", cancel_url=f"{site}/?cancelled=1"),
        payos_timeout=settings.payos_timeout_seconds,
    )
    app[RATE_LIMITER] = RateLimiter(app[REDIS], settings.session_rate_limit_per_minute)
    app[CACHED_READS] = BatchedReads(app[CACHE])
    app[STATUS_READER] = StatusReader(
        app[CACHE], app[STORE], on_db_query=app[SESSION_METRICS].status_db_queries.inc
    )
    app[STATS] = StatsSnapshot(app[REDIS], app[CACHE], app[STORE], cluster=settings.redis_cluster)
    yield
    # Before the PayOS and MongoDB clients close (contexts end in reverse order): a creation
    # cancelled by shutdown may still be rolling back.
    await app[SESSIONS].aclose()


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """The payment ledger's admin side, the reconciler with PayOS (issue 11) and cancels
    (issue 13), which count through the same core."""
    settings, metrics = app[SETTINGS], app[SESSION_METRICS]
    ledger = Ledger(app[STORE], on_new=lambda item: metrics.issues_open.labels(item["kind"]).inc())
    issues = PaymentIssues(ledger, metrics)
    payments = Payments(app[STORE], ledger, grace_seconds=settings.late_payment_grace_seconds)
    cancellations = Cancellations(
        app[STORE],
        app[CACHE],
        app[PAYOS],
        payments,
        payos_timeout=settings.payos_timeout_seconds,
    )
    reconciler = Reconciler(
        store=app[STORE],
        cache=app[CACHE],
        redis=app[REDIS],
        payos=app[PAYOS],
        payments=payments,
        cancellations=cancellations,
        metrics=metrics,
        after_seconds=settings.reconcile_after_seconds,
        max_per_second=settings.reconcile_max_per_second,
        interval_seconds=settings.reconcile_interval_seconds,
        lease_seconds=settings.reconcile_lease_seconds,
        payos_timeout=settings.payos_timeout_seconds,
    )
    app[PAYMENT_ISSUES], app[RECONCILER] = issues, reconciler
    app[CANCELLATIONS] = cancellations
    issues.start(app[SUPERVISOR])
    reconciler.start(app[SUPERVISOR])
    yield
    # Before the Redis, MongoDB and PayOS clients close: the lease is handed over at once.
    await reconciler.stop()
    await cancellations.aclose()
    await issues.stop()


async def _outbox_ctx(app: web.Application) -> AsyncIterator[None]:
    """The shop's event log and its dispatcher, which runs (in every replica) under the
    supervisor and works only while it holds the lease."""
    settings = app[SETTINGS]
    event_log = EventLog(
        app[STORE],
        urls=settings.shop_webhook_url,
        retention_seconds=settings.outbox_retention_seconds,
    )
    app[EVENT_LOG] = event_log
    dispatcher = Dispatcher(settings, app[STORE], app[REDIS], event_log, app[OUTBOX_METRICS])
    app[DISPATCHER] = dispatcher
    task = app[SUPERVISOR].spawn("outbox-dispatcher", dispatcher.run)
    yield
    # Before Redis and MongoDB close: the lease is given back for a successor to take now.
    await task.stop()


def create_app(settings: Settings) -> web.Application:
    """session-api: sessions, status reads, listing, cleanup, stats, plus the ops routes."""
    app = web.Application(
        middlewares=[
            request_context_middleware,
            cors_middleware(settings.cors_origins),
            error_middleware,
            body_limit_middleware(settings.session_max_body_bytes),
        ],
        client_max_size=settings.session_max_body_bytes,
    )
    app[SETTINGS] = settings
    app[TRUSTED_PROXIES] = parse_networks(settings.trusted_proxies)
    registry = new_registry(app)
    app[SESSION_METRICS] = SessionMetrics.create(registry)
    app[OUTBOX_METRICS] = OutboxMetrics.create(registry)
    # Loaded here, not on first request: a catalogue that lacks a key stops the start.
    app[DEPOSIT_PAGE] = DepositPage.load(settings)
    app[ACCOUNT_LINKS] = AccountLinks(settings.account_link_key)
    setup_console(app, settings)
    app.cleanup_ctx.extend(
        [
            supervisor_ctx,
            redis_ctx,
            mongo_ctx,
            _payos_ctx,
            _sessions_ctx,
            _ledger_ctx,
            admin_ctx,
            _outbox_ctx,
        ]
    )
    app.on_response_prepare.append(security_headers)
    setup_routes(app)
    return app
