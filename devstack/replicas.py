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
import dataclasses
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings

from .balancer import nginx_process
from .servers import (
    LocalRedisCluster,
    Process,
    free_port,
    local_settings,
    mongo_standin,
    python_service,
    redis_server,
    serve_until_stopped,
    stop_on_sigterm,
)

RUN_DIR = Path(".run") / "replicas"
# How long nginx takes to replace its workers on a reload (SIGHUP), generously.
RELOAD_SECONDS = 0.5

# (name, module, settings field of its port, nginx upstream) of each replicated service.
REPLICATED = (
    ("webhook-ingest", "webhook_ingest", "webhook_ingest_port", "webhook_ingest"),
    ("stream-gateway", "stream_gateway", "stream_gateway_port", "stream_gateway"),
    ("session-api", "session_api", "session_api_port", "session_api"),
)


@dataclass
class ReplicaSystem:
    """The processes of a replicated system and the settings they share."""

    settings: Settings
    url: str  # nginx: the one address browsers and PayOS use
    backing: list[Process]  # redis (or cluster nodes), mongo, the simulator
    replicas: dict[str, list[Process]]  # service name → its replicas
    nginx: Process
    cluster: LocalRedisCluster | None = None

    @property
    def gateways(self) -> list[Process]:
        return self.replicas["stream-gateway"]

    def replica_url(self, process: Process) -> str:
        return f"http://127.0.0.1:{process.port}"

    @property
    def processes(self) -> list[Process]:
        """Every process but the cluster's nodes, in start order."""
        return [*self.backing, *(p for g in self.replicas.values() for p in g), self.nginx]

    def start(self) -> None:
        """Start everything (the replicas in parallel); on failure, stop what started."""
        try:
            if self.cluster is not None:
                self.cluster.start()
            for proc in self.backing:
                proc.start()
            everything = [p for group in self.replicas.values() for p in group]
            with ThreadPoolExecutor(len(everything)) as pool:
                for future in [pool.submit(p.start) for p in everything]:
                    future.result()
            self.nginx.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop whatever runs (each stop is a no-op for a process that is not running)."""
        for proc in reversed(self.processes):
            proc.stop()
        if self.cluster is not None:
            self.cluster.stop()

    def revive(self) -> list[Process]:
        """Start again whatever died (a test killed it); returns those restarted.

        nginx takes an upstream that failed out of rotation for `fail_timeout` (10 s): after a
        restart it reloads (SIGHUP: new workers with fresh upstream state), so traffic spreads
        over every replica again at once.
        """
        dead = [p for p in self.processes if p.proc is not None and not p.running]
        for proc in dead:
            proc.start()
        if dead and self.nginx.running:
            self.nginx.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            time.sleep(RELOAD_SECONDS)
        return dead

    def dead(self) -> list[Process]:
        return [p for p in self.processes if p.proc is not None and not p.running]


def plan(
    base: Settings,
    run_dir: Path,
    *,
    replicas: int = 2,
    gateways: int | None = None,
    cluster: bool = False,
) -> ReplicaSystem:
    """A replicated system on free ports, its files under `run_dir` (not started yet).

    `replicas` of each service, except the gateway's count when `gateways` is given.
    """
    run_dir = run_dir.resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    backing: list[Process] = []
    redis_cluster: LocalRedisCluster | None = None
    if cluster:
        redis_cluster = LocalRedisCluster(run_dir / "cluster")
        (run_dir / "cluster").mkdir(parents=True, exist_ok=True)
        redis_url = redis_cluster.url
    else:
        redis = redis_server(free_port(), run_dir)
        backing.append(redis)
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
    mongo = mongo_standin(free_port(), run_dir / "mongo", logs)
    backing.append(mongo)
    settings = local_settings(
        base, redis_url=redis_url, mongodb_url=f"mongodb://127.0.0.1:{mongo.port}/paypush"
    )
    url = f"http://127.0.0.1:{free_port()}"
    settings = dataclasses.replace(
        settings,
        redis_cluster=cluster,
        payos_webhook_url=f"{url}/api/webhooks",
        stream_public_url=url,
        site_public_url=url,
        cors_origins=(url,),
    )
    env = settings.env()
    backing.append(
        python_service(
            "payos-simulator",
            "devstack.payos_simulator",
            settings.payos_simulator_port,
            env,
            logs,
        )
    )
    counts = {name: replicas for name, *_ in REPLICATED}
    if gateways is not None:
        counts["stream-gateway"] = gateways
    group: dict[str, list[Process]] = {}
    upstreams: dict[str, list[int]] = {}
    for name, module, port_field, upstream in REPLICATED:
        group[name] = []
        for i in range(counts[name]):
            port = free_port()
            replica_env = {**env, port_field.upper(): str(port)}
            group[name].append(python_service(f"{name}-{i + 1}", module, port, replica_env, logs))
        upstreams[upstream] = [p.port for p in group[name]]
    nginx = nginx_process(upstreams, int(url.rsplit(":", 1)[1]), run_dir / "nginx")
    return ReplicaSystem(settings, url, backing, group, nginx, redis_cluster)


@contextlib.contextmanager
def running(
    base: Settings,
    run_dir: Path,
    *,
    replicas: int = 2,
    gateways: int | None = None,
    cluster: bool = False,
) -> Iterator[ReplicaSystem]:
    system = plan(base, run_dir, replicas=replicas, gateways=gateways, cluster=cluster)
    system.start()
    try:
        yield system
    finally:
        system.stop()


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
        for name, group in system.replicas.items():
            ports = ", ".join(str(p.port) for p in group)
            lines.append(f"  {name:<36} ports {ports}")
        lines.append(f"  PayOS simulator                     {system.settings.payos_base_url}")
        redis = "Redis Cluster" if args.cluster else "Redis"
        lines.append(f"  {redis:<36}{system.settings.redis_url}")
        return lines

    return serve_until_stopped(stop, system.start, all_up, system.dead, system.stop)


if __name__ == "__main__":
    sys.exit(main())
