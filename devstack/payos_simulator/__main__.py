"""`python -m devstack.payos_simulator`: serve on PAYOS_SIMULATOR_PORT."""

from shared.runner import serve

from .app import create_app

if __name__ == "__main__":
    serve(create_app, lambda s: s.payos_simulator_port)
