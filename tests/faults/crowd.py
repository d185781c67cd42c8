"""Thousands of waiting browsers in a process of their own, for reconnect storms.

`python -m tests.faults.crowd` reads one JSON line on stdin (`gateways`: base URLs, `uuids`:
one browser each, `in_flight`: how many may be opening at once) and runs one `Browser` per
uuid: the lightweight EventSource of `devstack.sse` (raw sockets, so 2,000 fit in one process
on a shared core) in front of a load balancer. Then it answers one line per command:

- `status`: counts so far (`first`: browsers that got their first event, `connected`: on
  a stream now and still waiting, `final`, `refused`, `broken`, `connects`, and `opened_s`:
  from the start until every browser had its first event, or null);
- `stop`: stops every browser and prints each one's record (`statuses`, `connects`,
  `attempts`, `refused`, `broken`, `outcome`), then exits.

A `Browser` behaves as EventSource behind the deployment's nginx: a stream the server ends
is reconnected after the `retry:` hint with `Last-Event-ID`; a refused or broken connection
goes to the next gateway (nginx's `proxy_next_upstream error`); a 429/5xx answer (a gateway
shutting down says 503) is counted as `refused` and retried on the next gateway, as the
harness's `Watcher` does (the deposit page would poll instead; either way it must learn the
status); a final status (`done`, `expired`), a 204 or another 4xx ends it.

`Crowd` is the test's side: it starts the process, asks, and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from devstack.sse import EventSourceClient, StreamEnded

STREAM = "/api/webhooks/stream"
RETRYABLE = ("http 429", "http 5")


@dataclass
class Browser(EventSourceClient):
    """One browser's EventSource on one session, behind a load balancer of `gateways`."""

    uuid: str = ""
    gateways: Sequence[str] = ()
    gateway: int = 0
    refused: int = 0  # 429/5xx answers
    broken: int = 0  # connections refused, reset or timed out
    first_at: float | None = None

    def _aim(self) -> None:
        self.url = f"{self.gateways[self.gateway]}{STREAM}?uuid={self.uuid}"

    def _next_gateway(self) -> None:
        self.gateway = (self.gateway + 1) % len(self.gateways)
        self._aim()

    async def run(self) -> str:
        self._aim()
        while True:
            self.connected.clear()
            try:
                outcome = await self._connect_once()
            except StreamEnded:
                pass  # the server ended the stream: reconnect
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                self.broken += 1
                self._next_gateway()
            else:
                if not outcome.startswith(RETRYABLE):
                    self.outcome = outcome
                    return outcome
                self.refused += 1
                self._next_gateway()
            await asyncio.sleep(self.retry_ms / 1000)

    def _dispatch(self, block: dict[str, str]) -> bool:
        if "data" in block and self.first_at is None:
            self.first_at = time.monotonic()
        return super()._dispatch(block)

    def record(self) -> dict[str, Any]:
        return {
            "statuses": self.statuses,
            "connects": self.connects,
            "attempts": self.attempts,
            "refused": self.refused,
            "broken": self.broken,
            "outcome": self.outcome,
            "gateway": self.gateway,
        }


def counts(browsers: Sequence[Browser], started: float) -> dict[str, Any]:
    firsts = [b.first_at for b in browsers]
    opened = None if None in firsts else max(t for t in firsts if t is not None) - started
    return {
        "first": sum(t is not None for t in firsts),
        "connected": sum(b.connected.is_set() and not b.outcome for b in browsers),
        "final": sum(b.outcome == "final" for b in browsers),
        "refused": sum(b.refused for b in browsers),
        "broken": sum(b.broken for b in browsers),
        "connects": sum(b.connects for b in browsers),
        "opened_s": opened,
    }


async def main() -> None:
    config = json.loads(await asyncio.to_thread(sys.stdin.readline))
    gateways: list[str] = config["gateways"]
    browsers = [
        Browser(url="", uuid=u, gateways=gateways, retry_ms=config.get("retry_ms", 300))
        for u in config["uuids"]
    ]
    gate = asyncio.Semaphore(config.get("in_flight", 200))
    started = time.monotonic()

    async def one(browser: Browser) -> None:
        # At most `in_flight` browsers opening at once; each keeps its slot until its first
        # event (or its end).
        async with gate:
            run = asyncio.create_task(browser.run())
            first = asyncio.create_task(browser.first_event.wait())
            await asyncio.wait([run, first], return_when=asyncio.FIRST_COMPLETED)
            first.cancel()
        await run

    tasks = [asyncio.create_task(one(b)) for b in browsers]
    while True:
        command = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if command == "status":
            print(json.dumps(counts(browsers, started)), flush=True)
        elif command in ("stop", ""):
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({b.uuid: b.record() for b in browsers}), flush=True)


# -- the test's side ---------------------------------------------------------------------------


@dataclass
class Crowd:
    """The crowd's process: `status()` while it runs, `stop()` for every browser's record."""

    proc: subprocess.Popen[str]
    uuids: list[str]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        gateways: Sequence[str],
        uuids: list[str],
        *,
        in_flight: int = 200,
        retry_ms: int = 300,
    ) -> Crowd:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.crowd"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        config = {
            "gateways": list(gateways),
            "uuids": uuids,
            "in_flight": in_flight,
            "retry_ms": retry_ms,
        }
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config) + "\n")
        proc.stdin.flush()
        return cls(proc, uuids)

    async def _ask(self, command: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            raise RuntimeError(f"the crowd process exited ({self.proc.poll()})")
        return json.loads(line)

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._ask("status")
        return result

    async def until(
        self, done: Callable[[dict[str, Any]], bool], timeout: float, every: float = 0.1
    ) -> dict[str, Any]:
        """Ask until `done(status)`; the last status (a TimeoutError names it)."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status()
            if done(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"crowd after {timeout} s: {status}")
            await asyncio.sleep(every)

    async def stop(self) -> dict[str, dict[str, Any]]:
        if not self.records:
            self.records = await self._ask("stop")
            await asyncio.to_thread(self.proc.wait, 10)
        return self.records

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


if __name__ == "__main__":
    asyncio.run(main())
