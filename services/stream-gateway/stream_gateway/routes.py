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


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/webhooks/stream", views.stream_status)
    app.router.add_get("/api/stats", views.stats)
    add_ops_routes(app, {"redis": redis_ready, "mongodb": mongo_ready, "pubsub": pubsub_ready})
    add_openapi_route(app, openapi.document(app[SETTINGS]))
