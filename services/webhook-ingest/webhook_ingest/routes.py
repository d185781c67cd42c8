"""Every route of the ingest, in one place."""

from aiohttp import web

from shared.appkeys import SETTINGS
from shared.openapi import add_openapi_route
from shared.web import add_ops_routes, mongo_ready, redis_ready

from . import openapi, views


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/api/webhooks", views.receive_webhook)
    # Ready = MongoDB and its indexes; Redis is watched only (issue 15).
    add_ops_routes(app, required={"mongodb": mongo_ready}, watched={"redis": redis_ready})
    add_openapi_route(app, openapi.document(app[SETTINGS]))
