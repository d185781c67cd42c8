"""Deposit-page benchmark: webhook sent → success drawn on the page, push vs polling fallback.

    python -m bench.page [--runs 20]

Runs the whole system (its own Redis and MongoDB stand-in), opens the deposit page in
headless Chromium, and for each run creates a deposit, has the simulator deliver the signed
webhook, and takes the time from just before the delivery to the moment the page drew
"paid" (the page records `Date.now()` then; both clocks are this machine's). The same again
with the stream blocked, so the page reaches "paid" by polling every 5 s. Each transfer
lands at a random moment (0.2 to 5.2 s after the page started waiting).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import time

import aiohttp
from playwright.async_api import Browser, Route

from devstack.browser import chromium
from devstack.system import System
from shared.settings import Settings

from ._common import own_system, percentile, table


async def one_deposit(browser: Browser, system: System, *, block_stream: bool) -> float:
    """Milliseconds from the webhook's delivery starting to "paid" drawn on the page."""
    context = await browser.new_context()
    page = await context.new_page()

    async def block(route: Route) -> None:
        await route.abort()

    if block_stream:
        await page.route("**/api/webhooks/stream*", block)
    await page.goto(system.page_url)
    await page.locator("#account").fill("8" + str(secrets.randbelow(10**9)).zfill(9))
    await page.locator("#create").click()
    await page.wait_for_selector("body[data-state=waiting]")
    transport = "polling" if block_stream else "stream"
    await page.wait_for_selector(f"body[data-transport={transport}]")
    # A transfer lands at a random moment of the page's wait, so polling is measured over
    # every phase of its 5 s period, not only just after a poll.
    await asyncio.sleep(0.2 + random.random() * 5)
    order_code = await page.inner_text("#pay-order")
    sent_at = time.time() * 1000
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{system.settings.payos_base_url}/sim/pay/{order_code}", json={}) as resp,
    ):
        assert resp.status == 200
    await page.wait_for_selector("body[data-state=paid]", timeout=15_000)
    paid_at: float = await page.evaluate("window.paypushPaidAt")
    await context.close()
    return paid_at - sent_at


async def run(runs: int, system: System) -> None:
    results: dict[str, list[float]] = {"push (SSE)": [], "polling fallback (5 s)": []}
    async with chromium() as browser:
        for label, blocked in (("push (SSE)", False), ("polling fallback (5 s)", True)):
            for _ in range(runs):
                results[label].append(await one_deposit(browser, system, block_stream=blocked))
    rows = [
        [
            label,
            len(v),
            f"{statistics.median(v):.0f}",
            f"{percentile(v, 90):.0f}",
            f"{min(v):.0f}",
            f"{max(v):.0f}",
        ]
        for label, v in results.items()
    ]
    print(table(["transport", "runs", "median ms", "p90 ms", "min ms", "max ms"], rows))
    push, poll = (statistics.median(v) for v in results.values())
    print(f"\npolling fallback / push (median): {poll / push:,.0f} times slower")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with own_system(Settings.from_env({}, log_level="WARNING")) as running:
        asyncio.run(run(args.runs, running))


if __name__ == "__main__":
    main()
