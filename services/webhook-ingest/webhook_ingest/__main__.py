"""`python -m webhook_ingest`: serve on WEBHOOK_INGEST_PORT."""

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
        port=settings.webhook_ingest_port,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
