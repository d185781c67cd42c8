"""Typed application keys of the ingest."""

from aiohttp import web

from .ingest import Ingestor
from .metrics import IngestMetrics
from .resync import Resync

INGESTOR = web.AppKey("ingestor", Ingestor)
RESYNC = web.AppKey("resync", Resync)
INGEST_METRICS = web.AppKey("ingest_metrics", IngestMetrics)
