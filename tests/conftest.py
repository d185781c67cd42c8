"""Real servers for the suite: one redis-server and one MongoDB (stand-in) per session.

Each test gets clean state: Redis is flushed and each test has a database of its own.
Set MONGODB_URL to run the same suite against a real MongoDB instead of the stand-in.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect

from devstack.servers import Process, free_port, mongo_standin, redis_server
from shared.mongo import Store, mongo_client
from shared.settings import Settings
from tests.helpers import TEST_CHECKSUM_KEY


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-scale",
        type=int,
        default=1,
        help="multiply the fuzz tests' example counts (`make fuzz` runs them long)",
    )
    parser.addoption(
        "--hub-machine-runs",
        type=int,
        default=200,
        help="runs of the hub's state machine in tests/test_hub_machine.py (`make mutate` "
        "runs fewer per mutant)",
    )
    parser.addoption(
        "--update-screenshots",
        action="store_true",
        help="write the deposit page's screenshots into docs/ (the README shows them)",
    )


@pytest.fixture(scope="session")
def fuzz_scale(request: pytest.FixtureRequest) -> int:
    """How many times the bounded fuzz budget to spend (1 in `make test`)."""
    scale = int(request.config.getoption("--fuzz-scale"))
    if scale < 1:
        raise pytest.UsageError("--fuzz-scale must be at least 1")
    return scale


@dataclass
class Servers:
    redis: Process
    mongo: Process | None  # None when MONGODB_URL points at a real server
    mongo_base_url: str
    tmp: Path

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def ensure_running(self) -> None:
        """Bring back whatever a fault test stopped."""
        if not self.redis.running:
            self.redis.start()
        if self.mongo is not None and not self.mongo.running:
            self.mongo.start()


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("servers")
    redis_proc = redis_server(free_port(), tmp)
    redis_proc.start()
    external = os.environ.get("MONGODB_URL")
    mongo_proc: Process | None = None
    if external:
        base = external.rsplit("/", 1)[0] if external.count("/") > 2 else external
    else:
        port = free_port()
        mongo_proc = mongo_standin(port, tmp / "mongo", tmp)
        mongo_proc.start()
        base = f"mongodb://127.0.0.1:{port}"
    try:
        yield Servers(redis_proc, mongo_proc, base, tmp)
    finally:
        redis_proc.stop()
        if mongo_proc is not None:
            mongo_proc.stop()


@pytest.fixture
def settings(servers: Servers) -> Iterator[Settings]:
    servers.ensure_running()
    redis.Redis.from_url(servers.redis_url).flushall()
    db = f"t_{secrets.token_hex(6)}"
    yield Settings.from_env(
        {},
        redis_url=servers.redis_url,
        mongodb_url=f"{servers.mongo_base_url}/{db}",
        mongodb_timeout_ms=1000,
        payos_checksum_key=TEST_CHECKSUM_KEY,
        log_level="WARNING",
    )


@pytest.fixture
async def store(settings: Settings, servers: Servers) -> AsyncIterator[Store]:
    """Direct access to the test's database, as the services see it."""
    client: AsyncMongoClient[dict[str, Any]] = mongo_client(settings)
    s = Store(client)
    await s.ensure_indexes()
    yield s
    servers.ensure_running()
    # A test that restarted MongoDB leaves pooled connections that fail once.
    for attempt in range(3):
        try:
            await client.drop_database(s.db.name)
            break
        except AutoReconnect:
            if attempt == 2:
                raise
    await client.close()
