"""A gateway rollout under waiting deposit pages, in a real headless Chromium (issue 15).

PAGES deposit pages wait on their streams, in one browser, each page in a context of its own:
in one context Chromium allows 6 HTTP/1.1 connections per host, so a 7th page's EventSource
would wait for a free socket (real users each have a browser of their own), and the pages
would share one localStorage (and so resume one another's session). the gateway is restarted
(SIGTERM: it closes every stream, then a new process starts). Every page must come back on a
stream (EventSource's own reconnect with Last-Event-ID, not the 5 s polling fallback) and
receive `done` on it; the polling requests made during the restart are counted and printed.
The issue asks for 200 pages; PAGE_ROLLOUT_PAGES sets the count (default below: what this
2-core machine, shared, runs in reasonable time).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Request

from devstack.browser import chromium
from devstack.system import Backends, System
from tests.helpers import PHONE, system_over

PAGES = int(os.environ.get("PAGE_ROLLOUT_PAGES", "50"))
OPEN_CONCURRENCY = 10


@pytest.fixture(scope="module")
def system(servers: Backends) -> Iterator[System]:
    # Every page comes from 127.0.0.1: no per-address creation limit here.
    with system_over(servers, "rollout", session_rate_limit_per_minute=0) as started:
        yield started


@pytest.fixture
async def browser(system: System) -> AsyncIterator[Browser]:
    async with chromium() as running:
        yield running


async def open_deposit(
    browser: Browser, system: System, on_request: Callable[[Request], None]
) -> tuple[Page, str]:
    context = await browser.new_context(viewport=PHONE)
    context.on("request", on_request)
    page = await context.new_page()
    await page.goto(system.page_url)
    # By id: the page speaks the browser's language.
    await page.locator("#account").fill(
        "8" + secrets.token_hex(8)[:9].translate(str.maketrans("abcdef", "123456"))
    )
    await page.locator("#amount").fill("20000")
    await page.locator("#create").click()
    await page.wait_for_selector("body[data-state=waiting][data-transport=stream]")
    return page, await page.inner_text("#pay-order")


async def transport(page: Page) -> str | None:
    return await page.get_attribute("body", "data-transport")


async def every(pages: list[Page], check: str, timeout: float) -> None:
    """Until `check` (a selector) matches on every page."""
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(p.wait_for_selector(check, timeout=timeout * 1000) for p in pages))


@pytest.mark.timeout(900)
async def test_gateway_restart_every_page_back_on_a_stream_and_gets_done(
    browser: Browser, system: System
) -> None:
    polls: list[float] = []
    stream_connects: list[float] = []

    def on_request(request: Request) -> None:
        if "/api/webhooks?uuid=" in request.url:
            polls.append(time.monotonic())
        elif "/api/webhooks/stream" in request.url:
            stream_connects.append(time.monotonic())

    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> tuple[Page, str]:
        async with gate:
            return await open_deposit(browser, system, on_request)

    began = time.monotonic()
    opened = await asyncio.gather(*(one() for _ in range(PAGES)))
    pages = [p for p, _ in opened]
    open_seconds = time.monotonic() - began
    assert len(stream_connects) == PAGES and not polls

    gateway = system.process("stream-gateway")
    restart_began = time.monotonic()
    await asyncio.to_thread(gateway.restart)
    restarted = time.monotonic()
    # Every page reconnects on its own (EventSource, Last-Event-ID) to the new process.
    async with asyncio.timeout(60):
        while True:
            opens = await asyncio.gather(*(p.evaluate("window.paypushStreamOpens") for p in pages))
            if all(o >= 2 for o in opens):
                break
            # Not more often: asking 50 pages takes CPU the reconnecting pages need.
            await asyncio.sleep(1.0)
    back = time.monotonic()
    transports = await asyncio.gather(*(transport(p) for p in pages))
    assert transports == ["stream"] * PAGES, {t: transports.count(t) for t in set(transports)}
    polls_during_restart = len(polls)
    reconnects = [t for t in stream_connects if t >= restart_began]
    # Each came back with EventSource's own reconnect, saying which event it had (the pending
    # one, version 1): the new gateway had nothing new to send any of them (no event "read").
    async with aiohttp.ClientSession() as http:
        gateway_url = f"http://127.0.0.1:{gateway.port}"
        async with http.get(f"{gateway_url}/metrics") as resp:
            metrics = await resp.text()
    assert f"paypush_stream_open {float(PAGES)}" in metrics
    assert 'paypush_stream_events_delivered_total{origin="read"}' not in metrics

    # Every session is paid: each page learns it on its stream.
    async with aiohttp.ClientSession() as http:

        async def pay(order_code: str) -> None:
            url = f"{system.settings.payos_base_url}/sim/pay/{order_code}"
            async with http.post(url, json={}) as resp:
                assert resp.status == 200, await resp.text()

        await asyncio.gather(*(pay(code) for _, code in opened))
    await every(pages, "body[data-state=paid]", timeout=30)
    transports = await asyncio.gather(*(transport(p) for p in pages))
    assert transports == ["stream"] * PAGES
    window_polls = await asyncio.gather(*(p.evaluate("window.paypushPolls") for p in pages))

    print(
        f"\n{PAGES} pages (one Chromium, a context each) opened in {open_seconds:.1f} s; "
        f"gateway restart took {restarted - restart_began:.1f} s; every page back on a stream "
        f"{back - restarted:.1f} s after the new gateway was up "
        f"({len(reconnects)} stream requests since the restart, spread over "
        f"{(max(reconnects) - min(reconnects)) if reconnects else 0:.1f} s); "
        f"polling requests during the restart: {polls_during_restart} "
        f"(whole test: {len(polls)}, pages' own count {sum(window_polls)}); "
        f"done on the stream on all {PAGES} pages"
    )
    assert polls_during_restart == 0
