"""`python -m webhook_ingest`: serve on WEBHOOK_INGEST_PORT."""

from shared.runner import serve

from .app import create_app

if __name__ == "__main__":
    serve(create_app, lambda s: s.webhook_ingest_port, service="webhook-ingest")
