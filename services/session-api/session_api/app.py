"""session-api's app factory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from shared.appkeys import CACHE, REDIS, SETTINGS, STORE
from shared.clients import mongo_ctx, redis_ctx, supervisor_ctx
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
from .appkeys import (
    ACCOUNT_LINKS,
    DEPOSIT_PAGE,
    PAYOS,
    RATE_LIMITER,
    SESSION_METRICS,
    SESSIONS,
    STATS,
    STATUS_READER,
    TRUSTED_PROXIES,
)
from .document import DepositPage
from .limits import RateLimiter, body_limit_middleware, parse_networks
from .metrics import SessionMetrics
from .page import security_headers
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
    app[STATUS_READER] = StatusReader(
        app[CACHE], app[STORE], on_db_query=app[SESSION_METRICS].status_db_queries.inc
    )
    app[STATS] = StatsSnapshot(app[REDIS], app[CACHE], app[STORE], cluster=settings.redis_cluster)
    yield
    # Before the PayOS and MongoDB clients close (contexts end in reverse order): a creation
    # cancelled by shutdown may still be rolling back.
    await app[SESSIONS].aclose()


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
    app[SESSION_METRICS] = SessionMetrics.create(new_registry(app))
    # Loaded here, not on first request: a catalogue that lacks a key stops the start.
    app[DEPOSIT_PAGE] = DepositPage.load(settings)
    app[ACCOUNT_LINKS] = AccountLinks(settings.account_link_key)
    app.cleanup_ctx.extend([supervisor_ctx, redis_ctx, mongo_ctx, _payos_ctx, _sessions_ctx])
    app.on_response_prepare.append(security_headers)
    setup_routes(app)
    return app
