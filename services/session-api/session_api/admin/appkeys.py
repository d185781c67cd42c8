"""Typed application keys of the operator console."""

from aiohttp import web

from ..limits import RateLimiter
from .auth import AdminAuth
from .overview import OverviewSnapshot
from .render import Console

ADMIN_AUTH = web.AppKey("admin_auth", AdminAuth)
ADMIN_CONSOLE = web.AppKey("admin_console", Console)
ADMIN_OVERVIEW = web.AppKey("admin_overview", OverviewSnapshot)
ADMIN_SIGNIN_LIMITER = web.AppKey("admin_signin_limiter", RateLimiter)
