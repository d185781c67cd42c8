"""webhook-ingest: PayOS webhooks verified, stored, and pushed to the status cache and feed."""

from .app import create_app

__all__ = ["create_app"]
