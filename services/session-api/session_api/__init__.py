"""session-api: payment sessions, the per-account limit, status reads, cleanup, stats."""

from .app import create_app

__all__ = ["create_app"]
