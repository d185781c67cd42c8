"""Real servers for the suite: one redis-server and one MongoDB (stand-in) per session.

Each test gets clean state: Redis is flushed and each test has a database of its own.
Set MONGODB_URL to run the same suite against a real MongoDB instead of the stand-in.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from hypothesis import Phase
from hypothesis import settings as hypothesis_settings
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect

from devstack.system import Backends, running_backends
from shared.mongo import Store, mongo_client
from shared.settings import Settings
from tests.helpers import TEST_CHECKSUM_KEY

# `make mutate` (`--hypothesis-profile=mutate`): a failure found is enough to kill a mutant;
# shrinking it (minutes for a state machine on a real database) tells the run nothing more.
hypothesis_settings.register_profile("mutate", phases=[Phase.explicit, Phase.reuse, Phase.generate])


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
        "--payment-machine-runs",
        type=int,
        default=40,
        help="runs of the counting core's state machine in tests/test_payment_machine.py "
        "(`make faults` runs many more)",
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


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """Our own redis-server, and the MongoDB stand-in unless MONGODB_URL names a real one."""
    with running_backends(
        tmp_path_factory.mktemp("servers"), mongodb_url=os.environ.get("MONGODB_URL")
    ) as backends:
        yield backends


@pytest.fixture
def settings(servers: Backends) -> Iterator[Settings]:
    servers.ensure_running()
    redis.Redis.from_url(servers.redis_url).flushall()
    db = f"t_{secrets.token_hex(6)}"
    yield Settings.from_env(
        {},
        redis_url=servers.redis_url,
        mongodb_url=servers.mongodb_url(db),
        mongodb_timeout_ms=1000,
        payos_checksum_key=TEST_CHECKSUM_KEY,
        log_level="WARNING",
    )


@pytest.fixture
async def store(settings: Settings, servers: Backends) -> AsyncIterator[Store]:
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
