"""Fixtures of the fault suite: the whole system per test, a payment driver, a ledger.

Tests marked `faults_long` run only when the marker expression names them
(`make faults`: `pytest tests/faults -m "faults or faults_long"`); `make test` skips them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devstack.servers import LocalRedisCluster
from devstack.system import Backends, System
from shared.mongo import Store
from shared.settings import Settings
from tests.faults.harness import Driver, Report, http_client, running_system
from tests.helpers import paused as paused  # the fault tests pause processes too

LEDGER: list[tuple[str, Report]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "faults_long" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long fault test: run `make faults`")
    for item in items:
        if item.get_closest_marker("faults_long") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures of the closing note: faults injected, payments made, payments lost."""
    if not LEDGER:
        return
    tr = terminalreporter
    tr.section("fault suite")
    for name, report in LEDGER:
        bug = f" [known bug, xfail: {report.known_bug}]" if report.known_bug else ""
        tr.write_line(f"{name}: {report.summary()}{bug}")
    counted = [r for _, r in LEDGER if not r.known_bug]
    tr.write_line(
        f"TOTAL (known bugs excluded): faults injected {sum(len(r.faults) for r in counted)}, "
        f"payments made {sum(r.payments for r in counted)}, "
        f"payments lost {sum(r.lost for r in counted)}, "
        f"paid but not told {sum(r.unnotified for r in counted)}, "
        f"browsers {sum(r.watchers for r in counted)}, "
        f"failed delivery attempts {sum(r.failed_attempts for r in counted)}"
    )


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Iterator[Report]:
    """This test's report, printed in the fault-suite summary at the end of the run."""
    report = Report()
    yield report
    LEDGER.append((request.node.name, report))


# Every simulated browser comes from 127.0.0.1: no per-address limit on session creation
# (set through the environment, so this holds whichever settings exist), quick reconnects.
FAULT_ENV = {
    "SESSION_RATE_LIMIT_PER_MINUTE": "0",
    "SSE_RETRY_MS": "300",
    "SSE_KEEPALIVE_SECONDS": "2",
}


@pytest.fixture
def fault_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The test's Redis and database, quick reconnect hints (the system puts every service
    on a free port).

    A test marked `fault_env(NAME="value", ...)` sets those variables on top of FAULT_ENV;
    one marked `redis_cluster` runs on a local Redis Cluster of its own (`redis_cluster`).
    """
    marker = request.node.get_closest_marker("fault_env")
    env = {**settings.env(), **FAULT_ENV, **(marker.kwargs if marker is not None else {})}
    redis_url = settings.redis_url
    if request.node.get_closest_marker("redis_cluster") is not None:
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        env["REDIS_CLUSTER"] = "true"
        redis_url = cluster.url
    return Settings.from_env({**env, "REDIS_URL": redis_url})


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    """A local 3-primary Redis Cluster (no replicas, nothing persisted) for one test."""
    cluster = LocalRedisCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def system(
    fault_settings: Settings, servers: Backends, store: Store, tmp_path: Path
) -> AsyncIterator[System]:
    async with running_system(fault_settings, tmp_path) as running:
        yield running
    # Whatever a test stopped or paused is back for the next one.
    for proc in (servers.redis, servers.mongo):
        if proc is not None and proc.running:
            os.kill(proc.pid, signal.SIGCONT)
    servers.ensure_running()


@pytest.fixture
async def driver(system: System) -> AsyncIterator[Driver]:
    async with http_client() as http:
        d = Driver(system, http)
        yield d
        await d.close()
