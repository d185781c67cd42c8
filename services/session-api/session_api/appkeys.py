"""Typed application keys of session-api."""

from aiohttp import web
from payos import AsyncPayOS

from shared.status import StatusReader

from .metrics import SessionMetrics
from .sessions import Sessions

PAYOS = web.AppKey("payos", AsyncPayOS)
SESSIONS = web.AppKey("sessions", Sessions)
STATUS_READER = web.AppKey("status_reader", StatusReader)
SESSION_METRICS = web.AppKey("session_metrics", SessionMetrics)
