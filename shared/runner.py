"""Running a service's app as a process: settings from the environment, logging, serving."""

from __future__ import annotations

import gc
import resource
from collections.abc import Callable
from pathlib import Path

import structlog
import uvloop
from aiohttp import web

from .logs import configure_logging
from .settings import SERVICE_OPTIONAL_SECRETS, SERVICE_SECRETS, Settings

log = structlog.get_logger(__name__)

# Where the hard limit is "unlimited", the soft one can still go no higher than the kernel's
# per-process maximum (fs.nr_open, 1,048,576 by default).
NR_OPEN = Path("/proc/sys/fs/nr_open")
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def raise_open_file_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (soft before, soft now, hard).

    Container runtimes start processes with a soft limit of 1,024 (and a hard one far above):
    without this a gateway holds about 1,000 streams and then fails every accept with EMFILE.
    """
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = int(_read(NR_OPEN) or 1 << 20)
    if before != resource.RLIM_INFINITY and before < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open_file_limit_not_raised", soft=before, hard=hard, error=str(exc))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return before, soft, hard


def log_process_limits(settings: Settings, limits: tuple[int, int, int]) -> None:
    """The file limits and what the node gives the listen backlog and outgoing connections."""
    before, soft, hard = limits
    somaxconn = _read(SOMAXCONN)
    log.info(
        "process_limits",
        nofile_soft_at_start=before,
        nofile_soft=soft,
        nofile_hard=hard,
        listen_backlog=settings.listen_backlog,
        somaxconn=somaxconn,
        ip_local_port_range=_read(PORT_RANGE),
    )
    if somaxconn is not None and somaxconn.isdigit() and int(somaxconn) < settings.listen_backlog:
        # The kernel silently caps the backlog: a reconnect burst overflows the accept queue.
        log.warning(
            "listen_backlog_capped",
            listen_backlog=settings.listen_backlog,
            somaxconn=int(somaxconn),
        )


def serve(
    create_app: Callable[[Settings], web.Application],
    port: Callable[[Settings], int],
    *,
    service: str | None = None,
    handler_cancellation: bool = False,
) -> None:
    """Build settings from the environment (with only the secrets `service` uses; None, as
    for the PayOS simulator: all of them), configure logging, raise the open file limit,
    serve until SIGTERM/SIGINT."""
    secrets = None
    if service is not None:
        secrets = SERVICE_SECRETS[service] + SERVICE_OPTIONAL_SECRETS.get(service, ())
    settings = Settings.from_env(secrets=secrets)
    configure_logging(settings)
    log_process_limits(settings, raise_open_file_limit())
    app = create_app(settings)
    freeze_heap()
    web.run_app(
        app,
        host=settings.host,
        port=port(settings),
        shutdown_timeout=settings.shutdown_timeout_seconds,
        handler_cancellation=handler_cancellation,
        backlog=settings.listen_backlog,
        access_log=None,
        print=None,
        # libuv's loop: aiohttp's and redis-py's I/O (and every timer) cost less on it.
        loop=uvloop.new_event_loop(),
    )


def freeze_heap() -> None:
    """What the process built before serving (modules, the app) lives as long as it does:
    moved out of the collector's sight, so no collection walks it again.

    A full collection walks every tracked object: without this, each one re-walks the
    hundreds of thousands of objects of the imported modules, and stalls every request or
    stream of the process meanwhile.
    """
    gc.collect()
    gc.freeze()
