"""Every route of session-api, in one place."""

from aiohttp import web

from shared.appkeys import SETTINGS
from shared.openapi import CONSOLE_ROUTE_PREFIX, add_openapi_route
from shared.web import add_ops_routes, mongo_ready, redis_ready

from . import events, openapi, page, views
from .admin import STATIC_DIR as ADMIN_STATIC_DIR
from .admin import views as admin


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/api/sessions", views.create_session)
    app.router.add_post("/api/sessions/{uuid}/cancel", views.cancel_session)
    app.router.add_get("/api/webhooks", views.status_or_list)
    app.router.add_get("/api/webhooks/check-session-limit", views.check_session_limit)
    app.router.add_get("/api/webhooks/cleanup", views.cleanup)
    app.router.add_post("/api/webhooks/cleanup", views.cleanup)
    app.router.add_get("/api/stats", views.stats)
    # The payment ledger, for operators (ADMIN_TOKEN).
    app.router.add_get("/api/admin/payment-issues", views.payment_issues)
    app.router.add_post("/api/admin/payment-issues/{id}/resolve", views.resolve_payment_issue)
    # The shop's events (issue 17): pull, and the admins' replay.
    app.router.add_get("/api/events", events.list_events)
    app.router.add_post("/api/events/replay", events.replay)
    # The deposit page, its assets, and the QR image of a session.
    app.router.add_get("/", page.index)
    app.router.add_get("/api/sessions/{uuid}/qr.svg", page.qr_svg)
    app.router.add_static("/static/", page.STATIC_DIR)
    # The operator console (issue 13): HTML for operators, signed in with ADMIN_TOKEN. Named
    # `console.…`: pages for people, left out of the OpenAPI document (shared.openapi).
    console = [
        ("GET", "/admin", admin.overview, "overview"),
        ("GET", "/admin/signin", admin.sign_in_form, "signin"),
        ("POST", "/admin/signin", admin.sign_in, "signin"),
        ("POST", "/admin/signout", admin.sign_out, "signout"),
        ("GET", "/admin/sessions", admin.sessions, "sessions"),
        ("GET", "/admin/issues", admin.issues, "issues"),
        ("POST", "/admin/issues/{id}/resolve", admin.resolve, "resolve"),
        ("GET", "/admin/api/counters", admin.counters, "counters"),
        ("GET", "/admin/chart.svg", admin.chart_svg, "chart"),
    ]
    for method, path, handler, name in console:
        # A second method on a path joins the resource just added (same path, same name).
        app.router.add_resource(path, name=CONSOLE_ROUTE_PREFIX + name).add_route(method, handler)
    app.router.add_static("/admin/static/", ADMIN_STATIC_DIR)
    # Ready = MongoDB and its indexes; Redis is watched only (issue 15).
    add_ops_routes(app, required={"mongodb": mongo_ready}, watched={"redis": redis_ready})
    add_openapi_route(app, openapi.document(app[SETTINGS]))
