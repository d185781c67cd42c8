"""`python -m devstack` (`make run`): the whole system on one machine, stopped by Ctrl-C.

Starts Redis (our own redis-server) unless REDIS_URL is set, the MongoDB stand-in unless
MONGODB_URL is set, the PayOS simulator unless PAYOS_BASE_URL is set, then every service.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from session_api.accounts import MAX_LINK_SECONDS, sign_account_link
from shared.settings import Settings, is_set

from .servers import (
    Process,
    mongo_standin,
    port_open,
    redis_server,
    serve_until_stopped,
    service_processes,
    stop_on_sigterm,
)

RUN_DIR = Path(".run")
# Our own Redis stays off 6379, where a machine-wide Redis often runs.
DEV_REDIS_PORT = 6390
DEV_MONGO_PORT = 27017


def plan(settings: Settings) -> tuple[Settings, list[Process]]:
    """The processes to start, and the settings they all share."""
    logs = RUN_DIR / "logs"
    processes: list[Process] = []
    if not is_set("REDIS_URL"):
        processes.append(redis_server(DEV_REDIS_PORT, RUN_DIR))
        settings = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{DEV_REDIS_PORT}/0")
    if not is_set("MONGODB_URL"):
        processes.append(mongo_standin(DEV_MONGO_PORT, RUN_DIR / "mongo", logs))
        settings = dataclasses.replace(
            settings, mongodb_url=f"mongodb://127.0.0.1:{DEV_MONGO_PORT}/paypush"
        )
    skip = ["payos-simulator"] if is_set("PAYOS_BASE_URL") else []
    processes += service_processes(settings, logs, skip=skip)
    return settings, processes


def main() -> int:
    settings, processes = plan(Settings.from_env())
    busy = [p for p in processes if port_open(p.port)]
    if busy:
        names = ", ".join(f"{p.name} (port {p.port})" for p in busy)
        print(f"already in use: {names}. Is another `make run` running? Stop it first.")
        return 1
    stop = stop_on_sigterm()
    started: list[Process] = []

    def start() -> None:
        for proc in processes:
            print(f"starting {proc.name} on port {proc.port} (log: {proc.log_path})", flush=True)
            proc.start()
            started.append(proc)

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

    def stop_started() -> None:
        for proc in reversed(started):
            proc.stop()

    return serve_until_stopped(
        stop, start, all_up, lambda: [p for p in started if not p.running], stop_started
    )


if __name__ == "__main__":
    sys.exit(main())
