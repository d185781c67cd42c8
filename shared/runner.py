"""Running a service's app as a process: settings from the environment, logging, serving."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from .logs import configure_logging
from .settings import Settings


def serve(
    create_app: Callable[[Settings], web.Application],
    port: Callable[[Settings], int],
    *,
    handler_cancellation: bool = False,
) -> None:
    """Build settings from the environment, configure logging, serve until SIGTERM/SIGINT."""
    settings = Settings.from_env()
    configure_logging(settings)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=port(settings),
        shutdown_timeout=settings.shutdown_timeout_seconds,
        handler_cancellation=handler_cancellation,
        access_log=None,
        print=None,
    )
