"""Typed application keys of the gateway."""

from aiohttp import web

from shared.status import StatusReader

from .admission import Admission
from .hub import Hub
from .metrics import GatewayMetrics
from .openings import OpeningReads
from .streams import OpenStreams

HUB = web.AppKey("hub", Hub)
ADMISSION = web.AppKey("admission", Admission)
STATUS_READER = web.AppKey("status_reader", StatusReader)
# The first status read of each opening stream, batched (one MGET per loop turn).
OPENING_READS = web.AppKey("opening_reads", OpeningReads)
GATEWAY_METRICS = web.AppKey("gateway_metrics", GatewayMetrics)
# Every open stream: kept alive and capped in one pass, closed on shutdown.
STREAMS = web.AppKey("streams", OpenStreams)
