"""Typed application keys of the gateway."""

from weakref import WeakSet

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from shared.status import StatusReader

from .admission import Admission
from .hub import Hub
from .metrics import GatewayMetrics

HUB = web.AppKey("hub", Hub)
ADMISSION = web.AppKey("admission", Admission)
STATUS_READER = web.AppKey("status_reader", StatusReader)
GATEWAY_METRICS = web.AppKey("gateway_metrics", GatewayMetrics)
# Every open stream, so shutdown can close them (aiohttp-sse's graceful_shutdown pattern).
STREAMS: web.AppKey[WeakSet[EventSourceResponse]] = web.AppKey("streams")
