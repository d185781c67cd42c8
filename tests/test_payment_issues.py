"""Issue 11 in session-api: the payment ledger's admin API (ADMIN_TOKEN), the gauge of open
items, cleanup's `partial_expired` items, and the reconciler running in session-api
processes (one lease holder, taken over when it is killed)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.servers import wait_until
from devstack.system import service_process, start_ready
from session_api import create_app
from session_api.cleanup import run_cleanup
from shared.appkeys import CACHE, METRICS
from shared.ledger import Ledger, NewIssue
from shared.model import StreamStatus, utcnow
from shared.mongo import Store
from shared.settings import Settings
from tests.helpers import Sim, add_session, subscribed
from tests.test_session_api import Client, _ready, create
from tests.test_session_api import api_settings as api_settings  # the same fixtures
from tests.test_session_api import sim as sim

ADMIN = {"Authorization": "Bearer test-admin-token"}


@pytest.fixture
async def site(aiohttp_client: Callable[..., Awaitable[Client]], api_settings: Settings) -> Client:
    return await _ready(await aiohttp_client(create_app(api_settings)))


ISSUES = "/api/admin/payment-issues"


async def get(site: Client, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    resp = await site.get(path, **kw)
    return resp.status, await resp.json()


async def resolve(
    site: Client, item_id: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    resp = await site.post(
        f"{ISSUES}/{item_id}/resolve", json=body, headers=ADMIN if headers is None else headers
    )
    return resp.status, await resp.json()


async def unknown_order_items(store: Store, n: int, kind: str = "unknown_order") -> None:
    from shared.ledger import IssueKind

    ledger = Ledger(store)
    for i in range(n):
        await ledger.record(
            NewIssue(IssueKind(kind), 900_000 + i, f"FT{i}", 1_000 + i, {"orderCode": 900_000 + i})
        )


# --- listing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}],
    ids=["none", "wrong", "basic"],
)
async def test_the_ledger_without_the_admin_token_is_401(
    site: Client, store: Store, headers: dict[str, str]
) -> None:
    await unknown_order_items(store, 1)
    status, body = await get(site, ISSUES, headers=headers)
    assert (status, body["success"]) == (401, False)
    assert "items" not in body


async def test_the_ledger_pages_open_items_newest_first(site: Client, store: Store) -> None:
    await unknown_order_items(store, 5)
    status, body = await get(site, f"{ISSUES}?page=2&limit=2", headers=ADMIN)
    assert status == 200
    assert (body["page"], body["limit"], body["total"], body["pages"]) == (2, 2, 5, 3)
    assert [i["orderCode"] for i in body["items"]] == [900_002, 900_001]
    item = body["items"][0]
    assert (item["kind"], item["status"], item["reference"]) == ("unknown_order", "open", "FT2")
    assert len(item["id"]) == 24 and item["createdAt"].endswith("Z")


async def test_the_ledger_filters_by_kind_and_status(site: Client, store: Store) -> None:
    await unknown_order_items(store, 2)
    await unknown_order_items(store, 1, kind="currency")
    _, currency = await get(site, f"{ISSUES}?kind=currency", headers=ADMIN)
    assert [i["kind"] for i in currency["items"]] == ["currency"]
    _, resolved = await get(site, f"{ISSUES}?status=resolved", headers=ADMIN)
    assert resolved["total"] == 0
    _, everything = await get(site, f"{ISSUES}?status=all", headers=ADMIN)
    assert everything["total"] == 3


@pytest.mark.parametrize(
    "query",
    [
        "status=closed",
        "kind=refund",
        "page=0",
        "limit=101",
        "page=x",
        "limit=-1",
        "status=OPEN",
    ],
)
async def test_bad_ledger_filters_are_400(site: Client, query: str) -> None:
    status, body = await get(site, f"{ISSUES}?{query}", headers=ADMIN)
    assert (status, body["success"]) == (400, False)
    assert body["error"]


# --- resolving ---------------------------------------------------------------------------


async def _one_item(site: Client, store: Store) -> dict[str, Any]:
    await unknown_order_items(store, 1)
    _, body = await get(site, ISSUES, headers=ADMIN)
    item: dict[str, Any] = body["items"][0]
    return item


async def test_resolving_without_the_admin_token_is_401_and_changes_nothing(
    site: Client, store: Store
) -> None:
    item = await _one_item(site, store)
    status, _ = await resolve(site, item["id"], {"resolvedBy": "x", "note": "y"}, {})
    assert status == 401
    status, _ = await resolve(
        site, item["id"], {"resolvedBy": "x", "note": "y"}, {"Authorization": "Bearer no"}
    )
    assert status == 401
    [stored] = [d async for d in store.issues.find({})]
    assert stored["status"] == "open" and "resolvedBy" not in stored


async def test_resolving_keeps_who_when_and_the_note_and_closes_the_item(
    site: Client, store: Store
) -> None:
    item = await _one_item(site, store)
    before = utcnow()
    status, body = await resolve(
        site, item["id"], {"resolvedBy": "lan@ops", "note": "refunded to the sender"}
    )
    assert status == 200
    resolved = body["item"]
    assert (resolved["status"], resolved["resolvedBy"], resolved["note"]) == (
        "resolved",
        "lan@ops",
        "refunded to the sender",
    )
    [stored] = [d async for d in store.issues.find({})]
    assert stored["resolvedAt"] >= before - timedelta(seconds=1)
    _, still_open = await get(site, ISSUES, headers=ADMIN)
    assert still_open["total"] == 0
    again = await resolve(site, item["id"], {"resolvedBy": "bao@ops", "note": "again"})
    assert again[0] == 409 and again[1]["item"]["resolvedBy"] == "lan@ops"


@pytest.mark.parametrize(
    ("item_id", "body", "expected"),
    [
        ("0123456789abcdef01234567", {"resolvedBy": "a", "note": "b"}, 404),
        ("not-an-id", {"resolvedBy": "a", "note": "b"}, 400),
        (None, {"note": "b"}, 400),
        (None, {"resolvedBy": "a", "note": ""}, 400),
        (None, {"resolvedBy": "a", "note": "x" * 2001}, 400),
        (None, ["not", "an", "object"], 400),
    ],
    ids=["unknown", "malformed-id", "no-resolver", "empty-note", "long-note", "not-object"],
)
async def test_resolving_a_bad_request_changes_nothing(
    site: Client, store: Store, item_id: str | None, body: Any, expected: int
) -> None:
    item = await _one_item(site, store)
    status, answer = await resolve(site, item_id or item["id"], body)
    assert (status, answer["success"]) == (expected, False)
    [stored] = [d async for d in store.issues.find({})]
    assert stored["status"] == "open"


async def test_the_gauge_counts_open_items_by_kind(site: Client, store: Store) -> None:
    await unknown_order_items(store, 2)
    item = (await get(site, ISSUES, headers=ADMIN))[1]["items"][0]
    await resolve(site, item["id"], {"resolvedBy": "a", "note": "b"})
    registry = site.app[METRICS]
    value = registry.get_sample_value("paypush_payment_issues_open", {"kind": "unknown_order"})
    assert value == 1
    assert registry.get_sample_value("paypush_payment_issues_open", {"kind": "late"}) == 0


# --- cleanup: partial then expired ---------------------------------------------------------


async def test_a_partially_paid_session_that_expires_is_one_item_and_is_kept_until_resolved(
    site: Client, store: Store
) -> None:
    session = await add_session(
        store,
        amount=50_000,
        amountPaid=20_000,
        references=["FT1"],
        expiresAt=utcnow() - timedelta(days=1, minutes=1),
        purgeAt=utcnow() + timedelta(seconds=1.5),
    )
    first = await run_cleanup(store, site.app[CACHE])
    await asyncio.sleep(2)
    second = await run_cleanup(store, site.app[CACHE])
    assert (first.expired, first.partial_expired, second.partial_expired) == (1, 1, 0)
    # Past its purgeAt, yet kept (by the TTL monitor and the cleanup): its item is open.
    assert second.sessions_deleted == 0
    [item] = [d async for d in store.issues.find({})]
    assert (item["kind"], item["amount"], item["uuid"]) == (
        "partial_expired",
        20_000,
        session["uuid"],
    )
    assert await store.sessions.count_documents({"uuid": session["uuid"]}) == 1
    status, _ = await resolve(site, str(item["_id"]), {"resolvedBy": "a", "note": "refunded"})
    assert status == 200
    await run_cleanup(store, site.app[CACHE])
    assert await store.sessions.count_documents({"uuid": session["uuid"]}) == 0


async def test_twenty_concurrent_cleanups_make_one_partial_expired_item(
    site: Client, store: Store
) -> None:
    await add_session(
        store, amount=50_000, amountPaid=1_000, expiresAt=utcnow() - timedelta(minutes=1)
    )
    await asyncio.gather(*(run_cleanup(store, site.app[CACHE]) for _ in range(20)))
    assert await store.issues.count_documents({"kind": "partial_expired"}) == 1


# --- the reconciler in session-api ------------------------------------------------------------


async def test_session_api_reconciles_a_session_whose_webhooks_were_all_dropped(
    aiohttp_client: Callable[..., Awaitable[Client]],
    api_settings: Settings,
    sim: Sim,
    store: Store,
) -> None:
    settings = dataclasses.replace(
        api_settings, reconcile_after_seconds=1.0, reconcile_interval_seconds=0.3
    )
    site = await _ready(await aiohttp_client(create_app(settings)))
    _, created = await create(site, {"accountNumber": "1234567890", "amount": 25_000})
    async with sim.http.post(f"{sim.url}/sim/faults", json={"dropAllDeliveries": True}):
        pass
    async with sim.http.post(f"{sim.url}/sim/pay/{created['orderCode']}", json={}) as resp:
        assert (await resp.json())["delivered"] is False
    async with subscribed(settings.redis_url, created["uuid"]) as waiting:
        [event] = await waiting.wait_for(1, timeout=1.0 + 0.3 + 3)
    assert event.status is StreamStatus.DONE
    registry = site.app[METRICS]
    assert registry.get_sample_value("paypush_reconcile_transactions_recovered_total") == 1
    assert registry.get_sample_value("paypush_reconcile_lease_held") == 1
    _, status = await get(site, f"/api/webhooks?uuid={created['uuid']}")
    assert status["status"] == "done"


def _lease_held(url: str) -> bool:
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return False
    return "paypush_reconcile_lease_held 1.0" in text


async def test_two_session_api_processes_run_one_reconciler_and_the_other_takes_over_when_it_is_killed(  # noqa: E501
    api_settings: Settings, store: Store, tmp_path: Path
) -> None:
    lease = 2.0
    env = {"RECONCILE_LEASE_SECONDS": str(lease), "RECONCILE_INTERVAL_SECONDS": "0.3"}
    procs = [
        service_process(api_settings, "session-api", tmp_path, label=f"session-api-{i}", env=env)
        for i in range(2)
    ]
    urls = [f"http://127.0.0.1:{proc.port}" for proc in procs]
    try:
        await asyncio.gather(*(start_ready(proc, 15) for proc in procs))
        wait_until(lambda: any(_lease_held(u) for u in urls), 10, "a lease holder")
        await asyncio.sleep(lease)
        holders = [_lease_held(u) for u in urls]
        assert holders.count(True) == 1
        holder = holders.index(True)
        procs[holder].kill()
        killed = time.monotonic()
        other = urls[1 - holder]
        wait_until(lambda: _lease_held(other), lease + 5, "takeover")
        assert time.monotonic() - killed <= lease + 1.5
    finally:
        for proc in procs:
            proc.stop()


async def test_the_ledger_endpoints_refuse_every_wrong_credential(
    site: Client, store: Store
) -> None:
    from tests.test_security import bad_credentials

    item = await _one_item(site, store)
    targets = [("GET", ISSUES), ("POST", f"{ISSUES}/{item['id']}/resolve")]
    for method, path in targets:
        for name, headers, query in bad_credentials("test-admin-token", "test-cron-secret"):
            url = f"{path}?{query}" if query else path
            resp = await site.request(
                method, url, headers=headers, json={"resolvedBy": "a", "note": "b"}
            )
            assert resp.status == 401, (method, name)
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            body = await resp.json()
            assert body["success"] is False and "items" not in body and "item" not in body
    [stored] = [d async for d in store.issues.find({})]
    assert stored["status"] == "open", "a refused resolve changed the item"
