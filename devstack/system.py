"""One builder of a whole system on this machine, for `make run`, `make replicas`, the tests
and the benchmarks.

- `plan_backends()`: Redis (our own redis-server, a local Redis Cluster, or a REDIS_URL given)
  and MongoDB (the nx-27017 stand-in, or a MONGODB_URL given), not started yet.
- `plan()`: the services on top (all of them or some, as many replicas of each as asked,
  nginx in front if asked) on free local ports (or on the settings' own ports), every one
  pointing at the others; a `System` to start and stop.
- `service_process()`: one more process of a service, for those that add them one by one;
- `wait_ready()`, `start_ready()`: until a service's `/readyz` says it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from shared.settings import Settings

from .balancer import nginx_process
from .servers import LocalRedisCluster, Process, free_port, mongo_standin, python_service
from .servers import redis_server as redis_server_process

# (name, module, settings field of its port, nginx upstream), in start order.
SERVICES: tuple[tuple[str, str, str, str | None], ...] = (
    ("payos-simulator", "devstack.payos_simulator", "payos_simulator_port", None),
    ("webhook-ingest", "webhook_ingest", "webhook_ingest_port", "webhook_ingest"),
    ("stream-gateway", "stream_gateway", "stream_gateway_port", "stream_gateway"),
    ("session-api", "session_api", "session_api_port", "session_api"),
)
ALL = tuple(name for name, *_ in SERVICES)
# How long nginx takes to replace its workers on a reload (SIGHUP), generously.
RELOAD_SECONDS = 0.5


# -- backends ---------------------------------------------------------------------------------


@dataclass
class Backends:
    """Redis and MongoDB for a system: processes of our own, or URLs of servers elsewhere."""

    dir: Path  # our processes' files: logs in dir/logs, the stand-in's data in dir/mongo
    redis_url: str
    mongo_base_url: str  # without the database
    default_mongodb_url: str  # what `mongodb_url()` gives without a database
    redis_server: Process | None = None  # our own redis-server
    cluster: LocalRedisCluster | None = None  # our own Redis Cluster
    mongo: Process | None = None  # our own MongoDB stand-in

    @property
    def redis(self) -> Process:
        """Our own redis-server (what a fault test stops, kills or pauses)."""
        if self.redis_server is None:
            raise RuntimeError("no redis-server of our own (a cluster or a REDIS_URL)")
        return self.redis_server

    def mongodb_url(self, database: str | None = None) -> str:
        return f"{self.mongo_base_url}/{database}" if database else self.default_mongodb_url

    @property
    def processes(self) -> list[Process]:
        """Our own single processes (not the cluster's nodes), in start order."""
        return [p for p in (self.redis_server, self.mongo) if p is not None]

    def start(self) -> None:
        try:
            if self.cluster is not None:
                self.cluster.start()
            for proc in self.processes:
                proc.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if self.cluster is not None:
            self.cluster.stop()

    def ensure_running(self) -> None:
        """Bring back whatever a fault test stopped."""
        for proc in self.processes:
            if not proc.running:
                proc.start()


def plan_backends(
    dir: Path,
    *,
    redis: Literal["server", "cluster"] = "server",
    redis_url: str | None = None,
    mongodb_url: str | None = None,
    redis_port: int | None = None,
    mongo_port: int | None = None,
    database: str = "paypush",
) -> Backends:
    """Backends with their files under `dir` (not started): a `redis_url` or `mongodb_url`
    given is used as it is (no process of ours); otherwise our own, on `redis_port` /
    `mongo_port` or free ports."""
    dir = dir.resolve()
    logs = dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    own_redis: Process | None = None
    cluster: LocalRedisCluster | None = None
    if redis_url is None and redis == "cluster":
        cluster = LocalRedisCluster(dir / "cluster")
        redis_url = cluster.url
    elif redis_url is None:
        own_redis = redis_server_process(redis_port or free_port(), logs)
        redis_url = f"redis://127.0.0.1:{own_redis.port}/0"
    mongo: Process | None = None
    if mongodb_url is None:
        mongo = mongo_standin(mongo_port or free_port(), dir / "mongo", logs)
        base = f"mongodb://127.0.0.1:{mongo.port}"
        mongodb_url = f"{base}/{database}"
    else:
        # mongodb://host:port/db → mongodb://host:port, for other databases on that server.
        base = mongodb_url.rsplit("/", 1)[0] if mongodb_url.count("/") > 2 else mongodb_url
    return Backends(dir, redis_url, base, mongodb_url, own_redis, cluster, mongo)


@contextlib.contextmanager
def running_backends(dir: Path, **kwargs: Any) -> Iterator[Backends]:
    """`plan_backends(dir, **kwargs)`, started for the block."""
    backends = plan_backends(dir, **kwargs)
    backends.start()
    try:
        yield backends
    finally:
        backends.stop()


# -- the services -----------------------------------------------------------------------------


def local_settings(settings: Settings, *, redis_url: str, mongodb_url: str) -> Settings:
    """`settings` for a whole system on free local ports, each service pointing at the others."""
    sim, ingest, gateway, site = (free_port() for _ in range(4))
    site_url = f"http://127.0.0.1:{site}"
    return dataclasses.replace(
        settings,
        redis_url=redis_url,
        mongodb_url=mongodb_url,
        payos_simulator_port=sim,
        webhook_ingest_port=ingest,
        stream_gateway_port=gateway,
        session_api_port=site,
        payos_base_url=f"http://127.0.0.1:{sim}",
        payos_webhook_url=f"http://127.0.0.1:{ingest}/api/webhooks",
        stream_public_url=f"http://127.0.0.1:{gateway}",
        gateway_metrics_urls=(f"http://127.0.0.1:{gateway}/metrics",),
        site_public_url=site_url,
        cors_origins=(site_url,),
        # Tests and load tools create many sessions from this one address.
        session_rate_limit_per_minute=0,
    )


@dataclass
class System:
    """A whole system's processes and the settings they share."""

    settings: Settings
    backends: Backends
    replicas: dict[str, list[Process]]  # service name → its processes, in start order
    nginx: Process | None = None  # in front of the replicas, when asked for
    owns_backends: bool = True  # False: the backends are someone else's to start and stop

    @property
    def url(self) -> str:
        """Where browsers go: nginx when there is one, session-api otherwise."""
        return self.settings.site_public_url

    @property
    def page_url(self) -> str:
        return self.url + "/"

    @property
    def sim_url(self) -> str:
        return self.settings.payos_base_url

    @property
    def ingest(self) -> Process:
        return self.replicas["webhook-ingest"][0]

    @property
    def gateways(self) -> list[Process]:
        return self.replicas["stream-gateway"]

    @property
    def session_api(self) -> Process:
        return self.replicas["session-api"][0]

    @property
    def simulator(self) -> Process | None:
        """None when the simulator runs elsewhere (in the test's process, or a real PayOS)."""
        group = self.replicas.get("payos-simulator")
        return group[0] if group else None

    @property
    def api_url(self) -> str:
        return self.replica_url(self.session_api)

    @property
    def gateway_urls(self) -> list[str]:
        return [self.replica_url(g) for g in self.gateways]

    def replica_url(self, process: Process) -> str:
        return f"http://127.0.0.1:{process.port}"

    @property
    def services(self) -> list[Process]:
        return [p for group in self.replicas.values() for p in group]

    @property
    def processes(self) -> list[Process]:
        """Every process this system starts (the cluster's nodes aside), in start order."""
        own = self.backends.processes if self.owns_backends else []
        return [*own, *self.services, *([self.nginx] if self.nginx else [])]

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def start(self, on_start: Callable[[Process], None] = lambda _: None) -> None:
        """Start everything (the services in parallel, each until its /healthz answers);
        on failure, stop what started. `on_start` hears of each process as it starts."""
        try:
            if self.owns_backends:
                if self.backends.cluster is not None:
                    self.backends.cluster.start()
                for proc in self.backends.processes:
                    on_start(proc)
                    proc.start()
            for proc in self.services:
                on_start(proc)
            _each_in_parallel(self.services, Process.start)
            if self.nginx is not None:
                on_start(self.nginx)
                self.nginx.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop whatever runs (a no-op for a process that is not running), front to back."""
        if self.nginx is not None:
            self.nginx.stop()
        _each_in_parallel(self.services, Process.stop)
        if self.owns_backends:
            self.backends.stop()

    def dead(self) -> list[Process]:
        """The processes that were started and have exited."""
        return [p for p in self.processes if p.proc is not None and not p.running]

    def revive(self) -> list[Process]:
        """Start again whatever died (a test killed it); returns those restarted.

        nginx takes an upstream that failed out of rotation for `fail_timeout` (10 s): after a
        restart it reloads (SIGHUP: new workers with fresh upstream state), so traffic spreads
        over every replica again at once.
        """
        dead = self.dead()
        for proc in dead:
            proc.start()
        if dead and self.nginx is not None and self.nginx.proc is not None and self.nginx.running:
            self.nginx.proc.send_signal(signal.SIGHUP)
            time.sleep(RELOAD_SECONDS)
        return dead


def _each_in_parallel(processes: Sequence[Process], act: Callable[[Process], None]) -> None:
    if not processes:
        return
    with ThreadPoolExecutor(len(processes)) as pool:
        for future in [pool.submit(act, p) for p in processes]:
            future.result()


def plan(
    base: Settings,
    backends: Backends,
    *,
    services: Sequence[str] = ALL,
    replicas: int | Mapping[str, int] = 1,
    nginx: bool = False,
    own_ports: bool = False,
    database: str | None = None,
    owns_backends: bool = True,
    log_dir: Path | None = None,
) -> System:
    """`services` on `backends` (not started), sharing `base`'s settings.

    On free local ports, each service pointing at the others, unless `own_ports` (the ports
    and URLs `base` names, as `make run` uses them). `replicas` of each service (or per name);
    one process is named after its service, several are numbered from 0, the first on the
    settings' port. `nginx` puts the deploy configuration's nginx in front: the public URLs
    and the simulator's webhook URL are then nginx's.
    """
    settings = dataclasses.replace(
        base,
        redis_url=backends.redis_url,
        mongodb_url=backends.mongodb_url(database),
        redis_cluster=base.redis_cluster or backends.cluster is not None,
    )
    if not own_ports:
        settings = local_settings(
            settings, redis_url=settings.redis_url, mongodb_url=settings.mongodb_url
        )
    nginx_port = free_port() if nginx else 0
    if nginx:
        url = f"http://127.0.0.1:{nginx_port}"
        settings = dataclasses.replace(
            settings,
            payos_webhook_url=f"{url}/api/webhooks",
            stream_public_url=url,
            site_public_url=url,
            cors_origins=(url,),
        )
    logs = log_dir or backends.dir / "logs"
    env = settings.env()
    group: dict[str, list[Process]] = {}
    upstreams: dict[str, list[int]] = {}
    for name, module, port_field, upstream in SERVICES:
        if name not in services or importlib.util.find_spec(f"{module}.__main__") is None:
            continue
        count = replicas if isinstance(replicas, int) else replicas.get(name, 1)
        group[name] = []
        for i in range(count):
            port = getattr(settings, port_field) if i == 0 else free_port()
            group[name].append(
                python_service(
                    name if count == 1 else f"{name}-{i}",
                    module,
                    port,
                    {**env, port_field.upper(): str(port)},
                    logs,
                )
            )
        if name == "stream-gateway" and not settings.ops_port:
            # The console's counters scrape every gateway replica (each on its own port).
            env["GATEWAY_METRICS_URLS"] = ",".join(
                f"http://127.0.0.1:{p.port}/metrics" for p in group[name]
            )
        if upstream is not None:
            upstreams[upstream] = [p.port for p in group[name]]
    front = nginx_process(upstreams, nginx_port, backends.dir / "nginx") if nginx else None
    return System(settings, backends, group, front, owns_backends)


def service_process(
    settings: Settings,
    name: str,
    log_dir: Path,
    *,
    label: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Process:
    """One more process of service `name` (see `SERVICES`) over `settings`' backends, on a
    free port, not started: for a test or benchmark that starts, kills and adds processes
    one by one. `env` overrides the settings' environment; `label` names its log."""
    found = next(((m, f) for n, m, f, _ in SERVICES if n == name), None)
    if found is None:
        raise ValueError(f"no service named {name!r} (one of {', '.join(ALL)})")
    module, port_field = found
    port = free_port()
    variables = {**settings.env(), **(env or {}), port_field.upper(): str(port)}
    return python_service(label or name, module, port, variables, log_dir)


async def start_ready(process: Process, within: float = 20.0) -> Process:
    """Start `process` (a service) and wait until its /readyz answers 200: alive is not
    ready (the MongoDB indexes, on which deduplication rests, come first)."""
    await asyncio.to_thread(process.start)
    await wait_ready(f"http://127.0.0.1:{process.port}", within)
    return process


@contextlib.contextmanager
def running(system: System) -> Iterator[System]:
    """`system` started for the block, stopped after it."""
    system.start()
    try:
        yield system
    finally:
        system.stop()


async def wait_ready(
    base_url: str,
    within: float = 20.0,
    *,
    ready: Callable[[int, dict[str, Any]], bool] = lambda status, _body: status == 200,
) -> dict[str, Any]:
    """Until `GET {base_url}/readyz` is `ready(status, body)` (by default: answers 200);
    its last body. A TimeoutError names the last answer."""
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        deadline = time.monotonic() + within
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with http.get(f"{base_url.rstrip('/')}/readyz") as resp:
                    body = await resp.json(content_type=None)
                    if ready(resp.status, body):
                        return dict(body)
                    last = f"{resp.status} {body}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url} not ready within {within:g} s: {last}")
            await asyncio.sleep(0.02)
