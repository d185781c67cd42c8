"""Every route of the gateway, in one place."""

from aiohttp import web

from shared.appkeys import SETTINGS
from shared.openapi import add_openapi_route
from shared.web import add_ops_routes, mongo_ready, redis_ready

from . import openapi, views
from .appkeys import HUB


async def pubsub_ready(app: web.Application) -> None:
    if not app[HUB].connected:
        raise ConnectionError("pub/sub connection down")


async def accepting(app: web.Application) -> None:
    """Able to accept streams: not shutting down. Redis, MongoDB and the pub/sub link are
    watched, not required: without Redis a stream's first event comes from MongoDB, without
    MongoDB from the cache, and after the pub/sub link comes back every open stream is read
    again, so no `done` is missed. A Redis outage is an alert and a resync, not every gateway
    leaving its Service at once (issue 15). A full process answers 503 + Retry-After itself
    (MAX_STREAMS), per request, rather than flapping its readiness."""
    if app[HUB].closing:
        raise ConnectionError("shutting down")


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/webhooks/stream", views.stream_status)
    app.router.add_get("/api/stats", views.stats)
    add_ops_routes(
        app,
        required={"accepting": accepting},
        watched={"redis": redis_ready, "mongodb": mongo_ready, "pubsub": pubsub_ready},
    )
    add_openapi_route(app, openapi.document(app[SETTINGS]))
