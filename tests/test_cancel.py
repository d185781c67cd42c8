"""Issue 13 item 2: cancelling a session, against the unmodified payos SDK, the PayOS simulator
and a real ingest. The payment always wins: what PayOS took before the cancel is counted, a
payment PayOS reports after it completes the session and is a ledger item; a cancel frees the
session's place in the pending limit and is published like any final status."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from session_api import create_app
from shared.appkeys import METRICS
from shared.model import StreamStatus
from shared.mongo import Store
from shared.settings import Settings
from tests.helpers import Sim, subscribed
from tests.test_session_api import Client, _ready, create, get_json
from tests.test_session_api import api as api  # the same fixtures
from tests.test_session_api import api_settings as api_settings
from tests.test_session_api import sim as sim

ACCOUNT = "shopper.42"


async def cancel(client: Client, uuid: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post(f"/api/sessions/{uuid}/cancel")
    return resp.status, await resp.json()


async def new_session(client: Client, amount: int = 20_000) -> dict[str, Any]:
    status, body = await create(client, {"accountNumber": ACCOUNT, "amount": amount})
    assert status == 201, body
    return body


async def link_status(sim: Sim, order_code: int) -> str:
    return str((await sim.payos.payment_requests.get(order_code)).status)


async def drop_deliveries(sim: Sim) -> None:
    """PayOS takes payments but none of its webhooks gets through."""
    async with sim.http.post(f"{sim.url}/sim/faults", json={"dropAllDeliveries": True}) as resp:
        assert resp.status == 200


async def stored(store: Store, uuid: str) -> dict[str, Any]:
    doc = await store.sessions.find_one({"uuid": uuid})
    assert doc is not None
    return doc


async def shop_events(store: Store, uuid: str, *, within: float = 5.0) -> list[str]:
    """The types of the shop's events about `uuid`, once the dispatcher has moved all of them
    from the outboxes (the session's, its ledger items') into the event log. Read until every
    event seen in an outbox is in the log: the three collections are not read at one instant,
    and the dispatcher moves entries between them meanwhile."""
    seen: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        doc = await stored(store, uuid)
        in_outbox = [json.loads(raw) for raw in doc.get("outbox", [])]
        async for item in store.issues.find({"uuid": uuid}):
            in_outbox += [json.loads(raw) for raw in item.get("outbox", [])]
        logged = [json.loads(e["body"]) async for e in store.events.find({})]
        ours = [e for e in [*in_outbox, *logged] if e["data"].get("uuid") == uuid]
        seen.update((e["id"], e["type"]) for e in ours)
        if not in_outbox and seen.keys() <= {e["id"] for e in logged}:
            return sorted(seen.values())
        assert loop.time() < deadline, f"not relayed into the event log: {seen}, {logged}"
        await asyncio.sleep(0.02)


def cancels(client: Client, outcome: str) -> float:
    value = client.app[METRICS].get_sample_value(
        "paypush_session_cancels_total", {"outcome": outcome}
    )
    return float(value or 0)


# --- the cancel itself -------------------------------------------------------------------------


async def test_a_cancel_closes_the_session_cancels_the_link_and_publishes_cancelled(
    api: Client, sim: Sim, store: Store, settings: Settings
) -> None:
    created = await new_session(api)
    async with subscribed(settings.redis_url, created["uuid"]) as waiting:
        status, body = await cancel(api, created["uuid"])
        [event] = await waiting.wait_for(1)
    assert status == 200, body
    assert (body["success"], body["status"], body["uuid"]) == (True, "cancelled", created["uuid"])
    assert event.status is StreamStatus.CANCELLED and event.version == body["version"]
    doc = await stored(store, created["uuid"])
    assert doc["status"] == "cancelled" and doc["version"] == 2 and "cancelledAt" in doc
    assert await link_status(sim, created["orderCode"]) == "CANCELLED"
    assert await shop_events(store, created["uuid"]) == ["session.cancelled"]
    assert cancels(api, "cancelled") == 1
    _, read = await get_json(api, f"/api/webhooks?uuid={created['uuid']}")
    assert read["status"] == "cancelled"


async def test_cancelling_twice_answers_the_same_cancelled_state(api: Client, store: Store) -> None:
    created = await new_session(api)
    first = await cancel(api, created["uuid"])
    second = await cancel(api, created["uuid"])
    assert first == second and first[0] == 200
    doc = await stored(store, created["uuid"])
    assert doc["version"] == 2
    assert await shop_events(store, created["uuid"]) == ["session.cancelled"]


async def test_a_cancelled_session_frees_its_place_in_the_pending_limit(api: Client) -> None:
    sessions = [await new_session(api, 10_000) for _ in range(5)]
    status, refused = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    assert (status, refused["pendingCount"]) == (429, 5)
    assert (await cancel(api, sessions[2]["uuid"]))[0] == 200
    _, limit = await get_json(api, f"/api/webhooks/check-session-limit?accountNumber={ACCOUNT}")
    assert (limit["canCreate"], limit["pendingCount"]) == (True, 4)
    assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 201


async def test_check_session_limit_reports_a_cancelled_session(api: Client) -> None:
    created = await new_session(api)
    await cancel(api, created["uuid"])
    _, body = await get_json(api, f"/api/webhooks/check-session-limit?uuid={created['uuid']}")
    assert (body["exists"], body["status"], body["message"]) == (
        True,
        "cancelled",
        "session is cancelled",
    )


async def test_a_cancelled_session_cannot_be_resumed_by_its_uuid(api: Client) -> None:
    created = await new_session(api)
    await cancel(api, created["uuid"])
    status, body = await create(
        api, {"accountNumber": ACCOUNT, "amount": 20_000, "uuid": created["uuid"]}
    )
    assert (status, body["retryable"]) == (409, False)


# --- the payment wins --------------------------------------------------------------------------


async def test_cancelling_a_paid_session_is_409_with_the_paid_state(
    api: Client, sim: Sim, store: Store
) -> None:
    created = await new_session(api)
    await sim.pay(created["orderCode"], wait=True)
    status, body = await cancel(api, created["uuid"])
    assert (status, body["success"], body["retryable"]) == (409, False, False)
    assert body["session"]["status"] == "done" and body["session"]["amountPaid"] == 20_000
    assert "paid" in body["error"]
    assert (await stored(store, created["uuid"]))["status"] == "completed"
    assert await link_status(sim, created["orderCode"]) == "PAID"


async def test_a_payment_payos_took_before_the_cancel_wins_though_its_webhook_never_came(
    api: Client, sim: Sim, store: Store, settings: Settings
) -> None:
    created = await new_session(api)
    await drop_deliveries(sim)
    assert (await sim.pay(created["orderCode"]))["delivered"] is False
    async with subscribed(settings.redis_url, created["uuid"]) as waiting:
        status, body = await cancel(api, created["uuid"])
        [event] = await waiting.wait_for(1)
    assert status == 409 and body["session"]["status"] == "done"
    assert event.status is StreamStatus.DONE
    doc = await stored(store, created["uuid"])
    assert (doc["status"], doc["amountPaid"]) == ("completed", 20_000)
    assert await shop_events(store, created["uuid"]) == ["payment.completed"]


async def test_a_partial_payment_before_the_cancel_is_counted_and_left_to_an_operator(
    api: Client, sim: Sim, store: Store
) -> None:
    created = await new_session(api)
    await drop_deliveries(sim)
    await sim.pay(created["orderCode"], amount=5_000)
    status, body = await cancel(api, created["uuid"])
    assert (status, body["status"], body["amountPaid"]) == (200, "cancelled", 5_000)
    [item] = [i async for i in store.issues.find({"orderCode": created["orderCode"]})]
    assert (item["kind"], item["amount"], item["status"]) == ("partial_cancelled", 5_000, "open")
    assert item["source"] == "cancel"
    doc = await stored(store, created["uuid"])
    # Held from the TTL while the item is open.
    assert "heldPurgeAt" in doc and "purgeAt" not in doc
    assert await shop_events(store, created["uuid"]) == [
        "payment.needs_attention",
        "payment.partial",
        "session.cancelled",
    ]


async def test_a_payment_reported_after_the_cancel_completes_the_session_and_is_a_ledger_item(
    api: Client, sim: Sim, store: Store, settings: Settings
) -> None:
    created = await new_session(api)
    assert (await cancel(api, created["uuid"]))[0] == 200
    async with subscribed(settings.redis_url, created["uuid"]) as waiting:
        # PayOS took a transfer in flight when the link was cancelled; its webhook comes now.
        paid = await sim.pay(created["orderCode"], force=True, wait=True)
        [event] = await waiting.wait_for(1)
    assert paid["delivered"] is True
    assert event.status is StreamStatus.DONE
    doc = await stored(store, created["uuid"])
    assert (doc["status"], doc["amountPaid"], doc["version"]) == ("completed", 20_000, 3)
    [item] = [i async for i in store.issues.find({"orderCode": created["orderCode"]})]
    assert (item["kind"], item["reference"]) == ("paid_after_cancel", paid["reference"])
    assert await shop_events(store, created["uuid"]) == [
        "payment.completed",
        "payment.needs_attention",
        "session.cancelled",
    ]


async def test_cancels_racing_a_payment_never_lose_it(api: Client, sim: Sim, store: Store) -> None:
    """Whichever PayOS takes first decides; the stored session always agrees with PayOS and
    every cancel's answer agrees with the stored session."""
    for _ in range(6):
        created = await new_session(api)

        async def pay(order_code: int = created["orderCode"]) -> int:
            url = f"{sim.url}/sim/pay/{order_code}"
            async with sim.http.post(url, json={"wait": True}) as resp:
                return resp.status  # 409 once the link is cancelled

        answers, paid = await asyncio.gather(
            asyncio.gather(*(cancel(api, created["uuid"]) for _ in range(3))), pay()
        )
        assert paid in (200, 409)
        link = await sim.payos.payment_requests.get(created["orderCode"])
        doc = await stored(store, created["uuid"])
        assert doc["amountPaid"] == link.amount_paid
        if link.status == "PAID":
            assert doc["status"] == "completed"
            assert all(s == 409 and b["session"]["status"] == "done" for s, b in answers)
        else:
            assert (link.status, doc["status"]) == ("CANCELLED", "cancelled")
            assert all(s == 200 and b["status"] == "cancelled" for s, b in answers)
        await store.sessions.delete_many({})


# --- PayOS failing -----------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [("down", 502), ("error", 502), ("slow", 504)])
async def test_payos_failing_answers_an_error_and_changes_nothing(
    api: Client, sim: Sim, store: Store, mode: str, expected: int
) -> None:
    created = await new_session(api)
    await sim.faults(mode, delay=1.5)
    status, body = await cancel(api, created["uuid"])
    assert (status, body["success"], body["retryable"]) == (expected, False, True)
    doc = await stored(store, created["uuid"])
    assert (doc["status"], doc["version"]) == ("pending", 1)
    assert cancels(api, "payos_timeout" if mode == "slow" else "payos_error") == 1
    await sim.faults("none")
    # Once PayOS answers, the same cancel goes through.
    assert (await cancel(api, created["uuid"]))[0] == 200


async def test_the_reconciler_closes_a_session_cancelled_on_payos_checkout(
    aiohttp_client: Callable[..., Awaitable[Client]],
    api_settings: Settings,
    sim: Sim,
    store: Store,
) -> None:
    """The shopper cancels on PayOS's page and never comes back (or a cancel's process died
    after PayOS took it): PayOS's link is CANCELLED, and the reconciler closes the session."""
    settings = dataclasses.replace(
        api_settings, reconcile_after_seconds=0.5, reconcile_interval_seconds=0.3
    )
    site = await _ready(await aiohttp_client(create_app(settings)))
    created = await new_session(site)
    async with subscribed(settings.redis_url, created["uuid"]) as waiting:
        async with sim.http.post(f"{created['checkoutUrl']}/cancel", allow_redirects=False) as resp:
            assert resp.status == 303
        [event] = await waiting.wait_for(1, timeout=10)
    assert event.status is StreamStatus.CANCELLED
    doc = await stored(store, created["uuid"])
    assert doc["status"] == "cancelled" and doc["checkAt"] == -1.0


# --- bad input ---------------------------------------------------------------------------------


async def test_a_malformed_uuid_is_400(api: Client) -> None:
    status, body = await cancel(api, "not-a-uuid")
    assert status == 400 and body["success"] is False and "uuid" in body["error"]


async def test_an_unknown_uuid_is_404(api: Client, store: Store) -> None:
    created = await new_session(api)
    other = "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b"
    status, body = await cancel(api, other)
    assert status == 404 and body["success"] is False
    assert (await stored(store, created["uuid"]))["status"] == "pending"


async def test_get_on_the_cancel_route_is_405(api: Client) -> None:
    resp = await api.get(f"/api/sessions/{secrets.token_hex(4)}/cancel")
    assert resp.status == 405
