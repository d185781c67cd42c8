"""Typed application keys of session-api."""

from aiohttp import web
from payos import AsyncPayOS

from shared.status import StatusReader

from .accounts import AccountLinks
from .document import DepositPage
from .limits import Network, RateLimiter
from .metrics import SessionMetrics
from .sessions import Sessions
from .stats import StatsSnapshot

PAYOS = web.AppKey("payos", AsyncPayOS)
SESSIONS = web.AppKey("sessions", Sessions)
STATUS_READER = web.AppKey("status_reader", StatusReader)
SESSION_METRICS = web.AppKey("session_metrics", SessionMetrics)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
STATS = web.AppKey("stats", StatsSnapshot)
TRUSTED_PROXIES: web.AppKey[tuple[Network, ...]] = web.AppKey("trusted_proxies")
DEPOSIT_PAGE = web.AppKey("deposit_page", DepositPage)
ACCOUNT_LINKS = web.AppKey("account_links", AccountLinks)
