"""Background tasks cannot die silently: the supervisor restarts them, `/healthz` tells.

Also the pub/sub link's refusal of commands once closed, on a real Redis: redis-py's `PubSub`
would otherwise open a new subscribed connection that nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from structlog.testing import capture_logs

from session_api import create_app as create_api_app
from session_api.event_log import EventLog
from session_api.issues import PaymentIssues
from shared import tasks
from shared.appkeys import SUPERVISOR
from shared.settings import Settings
from shared.tasks import Supervisor
from stream_gateway.links import LinkClosedError, PubSubLink
from webhook_ingest import create_app as create_ingest_app
from webhook_ingest.resync import Resync

Client = TestClient[Any, Any]


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "RESTART_MIN_SECONDS", 0.01)
    monkeypatch.setattr(tasks, "RESTART_MAX_SECONDS", 0.04)


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_task_that_raises_is_restarted_and_counted() -> None:
    registry = CollectorRegistry()
    supervisor = Supervisor(registry)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("nobody foresaw this")
        await asyncio.Event().wait()

    task = supervisor.spawn("flaky", flaky)
    await until(lambda: runs == 3)
    await asyncio.sleep(0)
    assert supervisor.states() == {"flaky": "running"}
    assert supervisor.healthy
    assert task.restarts == 2
    assert registry.get_sample_value("paypush_task_restarts_total", {"task": "flaky"}) == 2
    await supervisor.stop()


async def test_a_task_cancelled_by_someone_else_comes_back() -> None:
    supervisor = Supervisor()
    started = asyncio.Event()

    async def loop_forever() -> None:
        started.set()
        await asyncio.Event().wait()

    supervised = supervisor.spawn("loop", loop_forever)
    await started.wait()
    first = supervised.task
    assert first is not None
    started.clear()
    first.cancel()
    await started.wait()
    assert supervised.task is not first and supervised.restarts == 1
    await supervisor.stop()


async def test_a_loop_that_returns_is_restarted_but_a_one_shot_is_finished() -> None:
    supervisor = Supervisor()
    loops = 0

    async def loop() -> None:
        nonlocal loops
        loops += 1

    async def one_shot() -> None:
        return None

    supervisor.spawn("loop", loop)
    supervisor.spawn("once", one_shot, forever=False)
    await until(lambda: loops >= 2)
    await until(lambda: supervisor.states()["once"] == "finished")
    await supervisor.stop()


async def test_a_task_that_keeps_dying_makes_the_supervisor_unhealthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "RESTART_MAX_SECONDS", 10.0)
    supervisor = Supervisor()

    async def doomed() -> None:
        raise RuntimeError("broken for good")

    supervised = supervisor.spawn("doomed", doomed)
    # The backoff grows, so the task spends ever longer down: /healthz fails meanwhile.
    await until(lambda: supervised.restarts >= 4 and not supervisor.healthy)
    assert supervisor.states() == {"doomed": "restarting"}
    await supervisor.stop()
    assert supervisor.states() == {}


async def test_stop_gives_up_on_a_task_that_swallows_its_cancellation_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "STOP_TIMEOUT_SECONDS", 0.1)
    supervisor = Supervisor()
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await release.wait()

    supervisor.spawn("stubborn", stubborn)
    await asyncio.sleep(0.01)
    with capture_logs() as logs:
        async with asyncio.timeout(1):
            await supervisor.stop()
    release.set()
    assert [e for e in logs if e["event"] == "background_task_stop_timeout"] == [
        {
            "event": "background_task_stop_timeout",
            "task": "stubborn",
            "seconds": 0.1,
            "log_level": "error",
        }
    ]
    await asyncio.sleep(0.01)


async def test_healthz_is_500_while_a_background_task_is_down(
    aiohttp_client: Callable[..., Awaitable[Client]],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tasks, "RESTART_MIN_SECONDS", 60.0)
    app = create_ingest_app(settings)
    client = await aiohttp_client(app)
    await until(lambda: app[SUPERVISOR].states().get("mongo-indexes") == "finished")
    healthy = await client.get("/healthz")
    assert healthy.status == 200
    assert (await healthy.json())["tasks"] == {
        "mongo-indexes": "finished",
        "ingest-resync": "running",
    }
    [resync] = [t for t in asyncio.all_tasks() if t.get_name() == "ingest-resync"]
    resync.cancel()
    await until(lambda: not app[SUPERVISOR].healthy)
    sick = await client.get("/healthz")
    assert sick.status == 500
    assert await sick.json() == {
        "status": "unhealthy",
        "tasks": {"mongo-indexes": "finished", "ingest-resync": "restarting"},
    }


async def test_a_closed_link_refuses_commands_and_opens_no_connection(
    settings: Settings,
) -> None:
    redis = Redis.from_url(settings.redis_url, client_name="closed-link-test")
    admin = Redis.from_url(settings.redis_url)
    try:
        link = PubSubLink(redis)
        await link.open()
        await link.close()
        for command in (link.subscribe(["a"]), link.unsubscribe(["a"])):
            with pytest.raises(LinkClosedError):
                await command
        with pytest.raises(LinkClosedError):
            await link.read(idle=0.1)
        clients = await admin.client_list()
        assert [c for c in clients if c["name"] == "closed-link-test"] == []
    finally:
        await redis.aclose()
        await admin.aclose()


async def test_checkpoint_raises_in_a_task_whose_cancellation_was_swallowed() -> None:
    entered = asyncio.Event()

    async def swallowing_then_checkpoint() -> str:
        try:
            entered.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # what PyMongo's cursor sometimes does with a cancellation
        tasks.checkpoint()
        return "ran on"

    task = asyncio.create_task(swallowing_then_checkpoint())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_checkpoint_lets_a_task_nobody_cancelled_run_on() -> None:
    async def plain() -> str:
        tasks.checkpoint()
        return "ran on"

    assert await asyncio.create_task(plain()) == "ran on"


def _swallowing(entered: asyncio.Event, result: Any) -> Callable[..., Awaitable[Any]]:
    """A step that waits until cancelled and then returns normally, as PyMongo's async cursor
    sometimes does when a cancellation lands in an iteration (rare, so made certain here);
    only the first time."""

    swallowed = False

    async def step(*_args: Any, **_kwargs: Any) -> Any:
        nonlocal swallowed
        entered.set()
        if swallowed:  # once: a later cancellation is not lost
            await asyncio.Event().wait()
        swallowed = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return result

    return step


@pytest.mark.parametrize(
    ("service", "task_name", "target", "result"),
    [
        ("session-api", "outbox-dispatcher", (EventLog, "relay"), 0),
        ("session-api", "payment-issues-gauge", (PaymentIssues, "refresh_gauge"), None),
        ("webhook-ingest", "ingest-resync", (Resync, "_sweep"), None),
    ],
    ids=["outbox-dispatcher", "payment-issues-gauge", "ingest-resync"],
)
async def test_a_loop_whose_cancellation_a_driver_swallowed_still_ends_with_its_app(
    aiohttp_client: Callable[..., Awaitable[Client]],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    service: str,
    task_name: str,
    target: tuple[type, str],
    result: Any,
) -> None:
    entered = asyncio.Event()
    monkeypatch.setattr(*target, _swallowing(entered, result))
    app = (create_api_app if service == "session-api" else create_ingest_app)(settings)
    client = await aiohttp_client(app)
    async with asyncio.timeout(10):
        await entered.wait()
    [loop] = [t for t in asyncio.all_tasks() if t.get_name() == task_name]
    await client.close()
    # Ended with its app, not left running on closed clients past the stop's bound.
    assert loop.done()
