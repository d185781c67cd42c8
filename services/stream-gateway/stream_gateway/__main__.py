"""`python -m stream_gateway`: serve on STREAM_GATEWAY_PORT."""

from shared.runner import serve

from .app import create_app

if __name__ == "__main__":
    # A browser that goes away ends its handler at once, releasing its subscription.
    serve(
        create_app,
        lambda s: s.stream_gateway_port,
        service="stream-gateway",
        handler_cancellation=True,
    )
