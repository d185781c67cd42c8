"""Every route of the ingest, in one place."""

from aiohttp import web

from shared.web import add_ops_routes

from . import views


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/api/webhooks", views.receive_webhook)
    add_ops_routes(app)
