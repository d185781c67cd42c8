"""Typed application keys for what every service keeps on its app."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from .cache import StatusCache
from .mongo import Store
from .settings import Settings
from .tasks import Supervisor

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", Redis)
STORE = web.AppKey("store", Store)
CACHE = web.AppKey("cache", StatusCache)
METRICS = web.AppKey("metrics", CollectorRegistry)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
