"""Background tasks that cannot die silently.

Every long-lived coroutine of a service (the gateway's pub/sub reader, flusher and re-reader,
the ingest's resync sweep, the index creation) runs under the app's `Supervisor`: when one
ends unexpectedly — an exception nobody foresaw, a cancellation that did not come from
shutdown, a loop that returned — it is logged with its traceback, counted, and started again
with exponential backoff. `/healthz` reports every task and fails while any of them is down,
so a task that keeps dying turns into a restarted pod rather than a silent outage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

log = structlog.get_logger(__name__)

# Backoff between restarts; it starts over once a task has stayed up for STABLE_SECONDS.
RESTART_MIN_SECONDS = 0.1
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 2.0


def checkpoint() -> None:
    """Raise `CancelledError` if the current task was asked to stop and something swallowed
    the request. PyMongo's async cursor can end an iteration normally when the cancellation
    lands in it (about 1 cancel in 70 on a `find` iteration, measured): the task's
    `cancelling()` count stays set, but no `CancelledError` ever reaches the loop, which then
    runs on past its app's shutdown and opens connections on closed clients. Every supervised
    loop that only a cancellation ends calls this once per round, outside any cleanup that
    runs while cancelling (the reconciler's loop also ends on its own stop event)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


T = TypeVar("T")
TaskState = Literal["running", "restarting", "finished"]
Run = Callable[[], Coroutine[Any, Any, None]]


class Supervised:
    """One supervised task: its current run, restarted until `stop`."""

    def __init__(self, supervisor: Supervisor, name: str, run: Run, *, forever: bool) -> None:
        self.name = name
        self.state: TaskState = "running"
        self.restarts = 0
        self._supervisor = supervisor
        self._run = run
        self._forever = forever
        self._child: asyncio.Task[None] | None = None
        self._stopping = False
        self._watcher = asyncio.create_task(self._watch(), name=f"supervise-{name}")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The run in progress (None between a death and its restart)."""
        return self._child

    async def stop(self) -> None:
        """Cancel the task for good; bounded, as a cancellation may be caught by a client."""
        if self._stopping:
            return
        self._stopping = True
        tasks = [t for t in (self._watcher, self._child) if t is not None]
        for task in tasks:
            task.cancel()
        self._supervisor.forget(self)
        _, running = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_SECONDS)
        if running:
            # Said out loud: a task left running past its app's shutdown uses clients that
            # are about to close.
            log.error("background_task_stop_timeout", task=self.name, seconds=STOP_TIMEOUT_SECONDS)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_MIN_SECONDS
        while True:
            started = loop.time()
            self.state = "running"
            child = self._child = asyncio.create_task(self._run(), name=self.name)
            try:
                # `wait`, not `await`: the child's own end must not end the watcher.
                await asyncio.wait([child])
            except asyncio.CancelledError:
                child.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await child
                raise
            if child.cancelled():
                reason = "cancelled"
            elif (exc := child.exception()) is not None:
                reason = f"{type(exc).__name__}: {exc}"
                log.error("background_task_died", task=self.name, exc_info=exc)
            elif not self._forever:
                self.state = "finished"
                self._child = None
                return
            else:
                reason = "returned"
            self._child = None
            self.state = "restarting"
            self.restarts += 1
            self._supervisor.died(self.name)
            if loop.time() - started > STABLE_SECONDS:
                delay = RESTART_MIN_SECONDS
            log.warning("background_task_restarting", task=self.name, reason=reason, delay=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_SECONDS)


class Supervisor:
    """The background tasks of one process, their health and their restarts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._tasks: dict[str, Supervised] = {}
        self._restarts: Counter | None = None
        if registry is not None:
            self._restarts = Counter(
                "paypush_task_restarts",
                "Background tasks restarted after ending unexpectedly",
                ["task"],
                registry=registry,
            )
            Gauge(
                "paypush_tasks_down",
                "Background tasks not running (between a death and its restart)",
                registry=registry,
            ).set_function(lambda: sum(t.state == "restarting" for t in self._tasks.values()))

    def spawn(self, name: str, run: Run, *, forever: bool = True) -> Supervised:
        """Run `run()` now and again whenever it dies; `forever=False`: done once it returns."""
        if name in self._tasks and self._tasks[name].state != "finished":
            raise ValueError(f"a task named {name!r} is supervised already")
        supervised = Supervised(self, name, run, forever=forever)
        self._tasks[name] = supervised
        return supervised

    def forget(self, supervised: Supervised) -> None:
        if self._tasks.get(supervised.name) is supervised:
            del self._tasks[supervised.name]

    def died(self, name: str) -> None:
        if self._restarts is not None:
            self._restarts.labels(name).inc()

    def states(self) -> dict[str, TaskState]:
        return {name: t.state for name, t in self._tasks.items()}

    @property
    def healthy(self) -> bool:
        """True while no task is between a death and its restart."""
        return all(t.state != "restarting" for t in self._tasks.values())

    async def stop(self) -> None:
        """Stop every task (what a component did not stop itself)."""
        await asyncio.gather(*(t.stop() for t in list(self._tasks.values())))


class BackgroundTasks:
    """Short pieces of work that must outlive their caller's cancellation (a rollback, a
    cancel's close): each runs in a task of its own, kept until it ends, and `aclose` waits
    for those still running (at shutdown, before the clients they use close). Await a
    spawned task through `asyncio.shield` to let a cancelled caller leave it running."""

    def __init__(self) -> None:
        # Strong references: the loop keeps only weak ones.
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        while running := [task for task in self._tasks if not task.done()]:
            await asyncio.gather(*running, return_exceptions=True)
