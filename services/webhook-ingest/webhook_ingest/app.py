"""The ingest's app factory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from shared.appkeys import CACHE, SETTINGS, STORE, SUPERVISOR
from shared.clients import mongo_ctx, redis_ctx, supervisor_ctx
from shared.settings import Settings
from shared.web import error_middleware, new_registry, request_context_middleware

from .appkeys import INGEST_METRICS, INGESTOR, RESYNC
from .ingest import Ingestor
from .metrics import IngestMetrics
from .resync import Resync
from .routes import setup_routes


async def _ingest_ctx(app: web.Application) -> AsyncIterator[None]:
    resync = Resync(app[STORE], app[CACHE])
    app[RESYNC] = resync
    app[INGESTOR] = Ingestor(app[STORE], app[CACHE], resync)
    app[INGEST_METRICS].resync_backlog.set_function(lambda: resync.backlog)
    resync.start(app[SUPERVISOR])
    yield
    await resync.stop()


def create_app(settings: Settings) -> web.Application:
    """webhook-ingest: `POST /api/webhooks` plus the ops routes."""
    app = web.Application(
        middlewares=[request_context_middleware, error_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[INGEST_METRICS] = IngestMetrics.create(new_registry(app))
    app.cleanup_ctx.extend([supervisor_ctx, redis_ctx, mongo_ctx, _ingest_ctx])
    setup_routes(app)
    return app
