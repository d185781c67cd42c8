"""A local PayOS: payment links, signed responses, signed webhooks, redelivery, faults."""

from .app import create_app

__all__ = ["create_app"]
