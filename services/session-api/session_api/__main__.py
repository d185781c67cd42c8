"""`python -m session_api`: serve on SESSION_API_PORT."""

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
        port=settings.session_api_port,
        shutdown_timeout=settings.shutdown_timeout_seconds,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
