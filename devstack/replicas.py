"""`python -m devstack.replicas` (`make replicas`): every service twice, behind nginx.

Our own redis-server (or a local Redis Cluster with `--cluster`) and MongoDB stand-in, the
PayOS simulator, `--replicas` (2) processes each of webhook-ingest, stream-gateway and
session-api on free ports, and Debian's nginx with the deploy configuration
(`devstack.balancer`) in front of them. The simulator delivers webhooks through nginx, and
the public URLs (the page, its stream) are nginx's. Ctrl-C stops everything. Used as well
by tests/test_replicas.py, tests/test_redis_cluster.py and bench.replicas.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from shared.settings import Settings

from .servers import serve_until_stopped, stop_on_sigterm
from .system import System, plan_backends
from .system import plan as plan_system
from .system import running as running_system

RUN_DIR = Path(".run") / "replicas"
# The replicated services (the simulator runs once).
REPLICATED = ("webhook-ingest", "stream-gateway", "session-api")


def plan(
    base: Settings,
    run_dir: Path,
    *,
    replicas: int = 2,
    gateways: int | None = None,
    cluster: bool = False,
) -> System:
    """A replicated system on free ports, its files under `run_dir` (not started yet).

    `replicas` of each service, except the gateway's count when `gateways` is given.
    """
    counts = {name: replicas for name in REPLICATED}
    if gateways is not None:
        counts["stream-gateway"] = gateways
    backends = plan_backends(run_dir, redis="cluster" if cluster else "server")
    return plan_system(base, backends, replicas=counts, nginx=True)


@contextlib.contextmanager
def running(
    base: Settings,
    run_dir: Path,
    *,
    replicas: int = 2,
    gateways: int | None = None,
    cluster: bool = False,
) -> Iterator[System]:
    plan_ = plan(base, run_dir, replicas=replicas, gateways=gateways, cluster=cluster)
    with running_system(plan_) as system:
        yield system


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.replicas", description=__doc__)
    parser.add_argument("--replicas", type=int, default=2, help="replicas of each service")
    parser.add_argument("--cluster", action="store_true", help="a 3-primary Redis Cluster")
    args = parser.parse_args(argv)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    stop = stop_on_sigterm()
    system = plan(Settings.from_env(), RUN_DIR, replicas=args.replicas, cluster=args.cluster)
    print(
        f"starting {args.replicas} replicas of each service behind nginx (logs: {RUN_DIR})",
        flush=True,
    )

    def all_up() -> list[str]:
        lines = [f"  nginx (deposit page, API, streams)  {system.url}/"]
        for name in REPLICATED:
            group = system.replicas[name]
            ports = ", ".join(str(p.port) for p in group)
            lines.append(f"  {name:<36} ports {ports}")
        lines.append(f"  PayOS simulator                     {system.settings.payos_base_url}")
        redis = "Redis Cluster" if args.cluster else "Redis"
        lines.append(f"  {redis:<36}{system.settings.redis_url}")
        return lines

    return serve_until_stopped(stop, system.start, all_up, system.dead, system.stop)


if __name__ == "__main__":
    sys.exit(main())
