"""Typed application keys of session-api."""

from aiohttp import web
from payos import AsyncPayOS

from shared.cache import BatchedReads
from shared.status import StatusReader

from .accounts import AccountLinks
from .cancel import Cancellations
from .dispatcher import Dispatcher
from .document import DepositPage
from .event_log import EventLog
from .issues import PaymentIssues
from .limits import Network, RateLimiter
from .metrics import OutboxMetrics, SessionMetrics
from .reconciler import Reconciler
from .sessions import Sessions
from .stats import StatsSnapshot

PAYOS = web.AppKey("payos", AsyncPayOS)
SESSIONS = web.AppKey("sessions", Sessions)
STATUS_READER = web.AppKey("status_reader", StatusReader)
# The pollers' cached reads, batched (`GET /api/webhooks?uuid=`).
CACHED_READS = web.AppKey("cached_reads", BatchedReads)
SESSION_METRICS = web.AppKey("session_metrics", SessionMetrics)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
STATS = web.AppKey("stats", StatsSnapshot)
PAYMENT_ISSUES = web.AppKey("payment_issues", PaymentIssues)
RECONCILER = web.AppKey("reconciler", Reconciler)
TRUSTED_PROXIES: web.AppKey[tuple[Network, ...]] = web.AppKey("trusted_proxies")
EVENT_LOG = web.AppKey("event_log", EventLog)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
OUTBOX_METRICS = web.AppKey("outbox_metrics", OutboxMetrics)
DEPOSIT_PAGE = web.AppKey("deposit_page", DepositPage)
ACCOUNT_LINKS = web.AppKey("account_links", AccountLinks)
CANCELLATIONS = web.AppKey("cancellations", Cancellations)
