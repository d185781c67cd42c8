"""Single flight: concurrent callers asking for the same thing share one run of the work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """One task per key, shared by every caller that arrives while it runs.

    Each caller awaits the task through `asyncio.shield`: a caller that is cancelled (its
    client left) leaves alone, and the others still get the result or the error. When every
    caller has left, the task still runs to its end rather than being cancelled: its query is
    already at the server (cancelling saves it no work, and pymongo and redis-py drop the
    pooled connection of a cancelled operation), the work is bounded by the clients'
    timeouts, and its result refills the cache for the caller that comes back.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: dict[K, asyncio.Task[V]] = {}

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """The result of `work()`, or of the run already in flight for `key`."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.create_task(work(), name=f"{self._name}:{key}")
            # The dict also keeps the task alive: the loop holds tasks by weak reference.
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        del self._tasks[key]
        if not task.cancelled():
            # Retrieved here, as the callers who left never will: otherwise the loop reports
            # "Task exception was never retrieved" for a failure nobody waited for.
            task.exception()
