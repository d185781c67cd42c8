"""Typed application keys of the simulator."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from shared.settings import Settings

from .state import World

SETTINGS = web.AppKey("sim_settings", Settings)
WORLD = web.AppKey("sim_world", World)
HTTP = web.AppKey("sim_http", aiohttp.ClientSession)
RETRY_DELAYS = web.AppKey("sim_retry_delays", tuple[float, ...])
TASKS = web.AppKey("sim_tasks", set[asyncio.Task[None]])
