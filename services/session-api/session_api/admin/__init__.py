"""The operator console at `/admin` (issue 13): sign-in with ADMIN_TOKEN, the sessions with
filters, the payment ledger with resolve, live counters and a chart of payments.

Server-rendered HTML under the deposit page's CSP: no inline script or style, no other
origin; one small script (static/admin.js) refreshes the counters and the chart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from shared import keys
from shared.appkeys import REDIS, SETTINGS, STORE
from shared.settings import Settings

from ..appkeys import STATS
from ..limits import RateLimiter
from .appkeys import ADMIN_AUTH, ADMIN_CONSOLE, ADMIN_OVERVIEW, ADMIN_SIGNIN_LIMITER
from .auth import AdminAuth
from .gateway import GatewayScraper
from .overview import OverviewSnapshot
from .render import STATIC_DIR, Console

__all__ = ["STATIC_DIR", "admin_ctx", "setup_console"]

# Sign-in attempts per client address a minute: plenty for a person, nothing for a guesser.
SIGNIN_ATTEMPTS_PER_MINUTE = 10


def setup_console(app: web.Application, settings: Settings) -> None:
    """What the console needs before the first request (a catalogue lacking a key stops the
    start here, as the deposit page's does)."""
    app[ADMIN_CONSOLE] = Console.load()
    app[ADMIN_AUTH] = AdminAuth(
        settings.admin_token,
        max_age=settings.admin_session_seconds,
        secure=settings.is_production,
        site_url=settings.site_public_url,
    )


async def admin_ctx(app: web.Application) -> AsyncIterator[None]:
    """The overview's sources: the gateways' metrics (an HTTP client of its own), MongoDB and
    the stats snapshot. After the sessions' context, which makes the snapshot."""
    async with aiohttp.ClientSession() as http:
        scraper = GatewayScraper(http, app[SETTINGS].gateway_metrics_urls)
        app[ADMIN_OVERVIEW] = OverviewSnapshot(app[STORE], app[STATS], scraper)
        app[ADMIN_SIGNIN_LIMITER] = RateLimiter(
            app[REDIS], SIGNIN_ATTEMPTS_PER_MINUTE, key=keys.admin_signin_rate_key
        )
        yield
