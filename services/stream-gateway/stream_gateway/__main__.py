"""`python -m stream_gateway`: serve on STREAM_GATEWAY_PORT."""

from aiohttp import web

from shared.logs import configure_logging
from shared.settings import Settings

from .app import create_app


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.stream_gateway_port,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        # A browser that goes away ends its handler at once, releasing its subscription.
        handler_cancellation=True,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
