"""The whole system as processes, and headless Chromium driven by Playwright (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from playwright.async_api import Browser, async_playwright

from devstack.servers import Process, local_settings, service_processes
from shared.settings import Settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a sandboxed machine, and with no network: no sandbox, no background traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class System:
    settings: Settings
    processes: list[Process]

    @property
    def page_url(self) -> str:
        return self.settings.site_public_url + "/"

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)


@contextlib.contextmanager
def running_system(
    redis_url: str, mongo_base_url: str, log_dir: Path, base: Settings | None = None
) -> Iterator[System]:
    """Simulator, ingest, gateway and session-api on free ports, sharing one Redis and DB."""
    settings = local_settings(
        base or Settings.from_env({}, log_level="WARNING"),
        redis_url=redis_url,
        mongodb_url=f"{mongo_base_url}/page_{secrets.token_hex(4)}",
    )
    processes = service_processes(settings, log_dir)
    started: list[Process] = []
    try:
        for proc in processes:
            proc.start()
            started.append(proc)
        yield System(settings, processes)
    finally:
        for proc in reversed(started):
            proc.stop()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()
