"""`python -m session_api`: serve on SESSION_API_PORT."""

from shared.runner import serve

from .app import create_app

if __name__ == "__main__":
    serve(create_app, lambda s: s.session_api_port, service="session-api")
