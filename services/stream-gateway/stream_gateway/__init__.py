"""stream-gateway: each session's status pushed to waiting browsers over SSE."""

from .app import create_app

__all__ = ["create_app"]
