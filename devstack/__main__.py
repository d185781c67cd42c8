"""`python -m devstack` (`make run`): the whole system on one machine, stopped by Ctrl-C.

Starts Redis (our own redis-server) unless REDIS_URL is set, the MongoDB stand-in unless
MONGODB_URL is set, the PayOS simulator unless PAYOS_BASE_URL is set, then every service,
each on the port its settings name.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from session_api.accounts import MAX_LINK_SECONDS, sign_account_link
from shared.settings import Settings, is_set

from .servers import Process, port_open, serve_until_stopped, stop_on_sigterm
from .system import ALL, System, plan, plan_backends

RUN_DIR = Path(".run")
# Our own Redis stays off 6379, where a machine-wide Redis often runs.
DEV_REDIS_PORT = 6390
DEV_MONGO_PORT = 27017


def plan_dev(settings: Settings) -> System:
    """The system `make run` starts, on the ports the settings name."""
    backends = plan_backends(
        RUN_DIR,
        redis_url=settings.redis_url if is_set("REDIS_URL") else None,
        mongodb_url=settings.mongodb_url if is_set("MONGODB_URL") else None,
        redis_port=DEV_REDIS_PORT,
        mongo_port=DEV_MONGO_PORT,
    )
    services = [s for s in ALL if not (s == "payos-simulator" and is_set("PAYOS_BASE_URL"))]
    return plan(settings, backends, services=services, own_ports=True)


def main() -> int:
    system = plan_dev(Settings.from_env())
    settings = system.settings
    busy = [p for p in system.processes if port_open(p.port)]
    if busy:
        names = ", ".join(f"{p.name} (port {p.port})" for p in busy)
        print(f"already in use: {names}. Is another `make run` running? Stop it first.")
        return 1
    stop = stop_on_sigterm()

    def starting(proc: Process) -> None:
        print(f"starting {proc.name} on port {proc.port} (log: {proc.log_path})", flush=True)

    def all_up() -> list[str]:
        page = f"http://127.0.0.1:{settings.session_api_port}/"
        if settings.account_link_key:
            # What the shop's backend would link its signed-in user "demo" to (valid 1 h).
            expires = int(time.time()) + MAX_LINK_SECONDS
            token = sign_account_link(settings.account_link_key, "demo", expires)
            page += "?" + urlencode({"account": "demo", "token": token})
        return [
            f"  deposit page    {page}",
            f"  webhooks        http://127.0.0.1:{settings.webhook_ingest_port}/api/webhooks",
            f"  streams         http://127.0.0.1:{settings.stream_gateway_port}/api/webhooks/stream?uuid=",
            f"  PayOS simulator {settings.payos_base_url}",
        ]

    return serve_until_stopped(
        stop, lambda: system.start(starting), all_up, system.dead, system.stop
    )


if __name__ == "__main__":
    sys.exit(main())
