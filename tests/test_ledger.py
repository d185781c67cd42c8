"""Issue 11: late payments counted, and money that fits no session kept in the payment ledger,
exactly one item per case however often it is delivered (real ingest, real MongoDB driver)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.system import service_process, start_ready
from shared.cache import StatusCache
from shared.ledger import IssueKind, IssueStatus, Ledger
from shared.model import StreamStatus, utcnow
from shared.mongo import Store
from shared.settings import Settings
from shared.signing import sign_data
from tests.helpers import TEST_CHECKSUM_KEY, add_session, signed_webhook, subscribed
from tests.test_webhook_ingest import Client, post
from tests.test_webhook_ingest import ingest as ingest  # the same real ingest fixture


async def items(store: Store, **query: Any) -> list[dict[str, Any]]:
    return [doc async for doc in store.issues.find(query)]


async def expire_by_cleanup(store: Store, settings: Settings) -> None:
    """The cleanup job as it runs, over the test's Redis and MongoDB."""
    from redis.asyncio import Redis

    from session_api.cleanup import run_cleanup

    redis = Redis.from_url(settings.redis_url)
    try:
        result = await run_cleanup(store, StatusCache(redis))
    finally:
        await redis.aclose()
    assert result.expired >= 1


async def held_partial_session(store: Store, settings: Settings) -> tuple[dict[str, Any], datetime]:
    """A session paid 10,000 of 40,000 (FT1) that expired 5 minutes ago: cleanup recorded its
    open `partial_expired` item and holds it from the TTL. The session and its expiry."""
    expires = utcnow() - timedelta(minutes=5)
    session = await add_session(
        store, amount=40_000, amountPaid=10_000, references=["FT1"], expiresAt=expires
    )
    await expire_by_cleanup(store, settings)
    return session, expires


def with_currency(body: dict[str, Any], currency: str) -> dict[str, Any]:
    body["data"]["currency"] = currency
    body["signature"] = sign_data(body["data"], TEST_CHECKSUM_KEY)
    return body


# --- late payments -----------------------------------------------------------------------


async def test_a_payment_made_a_second_before_expiry_and_delivered_five_minutes_after_cleanup_expired_the_session_completes_it(  # noqa: E501
    ingest: Client, store: Store, settings: Settings
) -> None:
    expires = utcnow() - timedelta(minutes=5)
    session = await add_session(store, amount=40_000, expiresAt=expires)
    await expire_by_cleanup(store, settings)
    expired = await store.sessions.find_one({"uuid": session["uuid"]})
    assert expired is not None and expired["status"] == "expired"
    webhook = signed_webhook(session["orderCode"], 40_000, made_at=expires - timedelta(seconds=1))
    async with subscribed(settings.redis_url, session["uuid"]) as waiting:
        status, body = await post(ingest, webhook)
        [event] = await waiting.wait_for(1)
    assert (status, body["outcome"]) == (200, "completed")
    assert (event.status, event.amount_paid) == (StreamStatus.DONE, 40_000)
    assert event.version == expired["version"] + 1
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("completed", 40_000)
    assert await items(store) == []


async def test_a_partial_item_is_settled_when_a_payment_made_in_time_completes_the_session_later(
    ingest: Client, store: Store, settings: Settings
) -> None:
    """Not the shopper's money to refund any more: the shop was told it was paid in full."""
    session, expires = await held_partial_session(store, settings)
    [item] = await items(store)
    assert (item["kind"], item["status"]) == ("partial_expired", "open")
    held = await store.sessions.find_one({"uuid": session["uuid"]})
    assert held is not None and "heldPurgeAt" in held
    webhook = signed_webhook(session["orderCode"], 30_000, made_at=expires - timedelta(seconds=1))
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "completed")
    [settled] = await items(store)
    assert (settled["status"], settled["resolvedBy"]) == ("resolved", "system")
    assert "paid in full" in settled["note"] and "resolvedAt" in settled
    released = await store.sessions.find_one({"uuid": session["uuid"]})
    assert released is not None and "purgeAt" in released and "heldPurgeAt" not in released


async def test_a_payment_made_in_time_that_still_leaves_the_session_short_keeps_its_partial_item(
    ingest: Client, store: Store, settings: Settings
) -> None:
    session, expires = await held_partial_session(store, settings)
    webhook = signed_webhook(session["orderCode"], 5_000, made_at=expires - timedelta(seconds=1))
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "partial")
    [item] = await items(store)
    assert (item["kind"], item["status"]) == ("partial_expired", "open")
    held = await store.sessions.find_one({"uuid": session["uuid"]})
    assert held is not None and held["amountPaid"] == 15_000 and "heldPurgeAt" in held


async def test_a_redelivered_payment_that_completed_a_held_session_settles_what_its_first_delivery_left_open(  # noqa: E501
    ingest: Client, store: Store, settings: Settings
) -> None:
    """The first delivery counted and completed the session, then died before settling."""
    session, expires = await held_partial_session(store, settings)
    await store.sessions.update_one(
        {"uuid": session["uuid"]},
        {
            "$set": {"status": "completed", "amountPaid": 40_000},
            "$push": {"references": "FT2"},
            "$inc": {"version": 1},
        },
    )
    webhook = signed_webhook(
        session["orderCode"], 30_000, reference="FT2", made_at=expires - timedelta(seconds=1)
    )
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "duplicate")
    [settled] = await items(store)
    assert (settled["status"], settled["resolvedBy"]) == ("resolved", "system")
    released = await store.sessions.find_one({"uuid": session["uuid"]})
    assert released is not None and "heldPurgeAt" not in released


async def test_a_redelivered_partial_payment_of_a_held_session_leaves_its_item_open(
    ingest: Client, store: Store, settings: Settings
) -> None:
    session, expires = await held_partial_session(store, settings)
    webhook = signed_webhook(
        session["orderCode"], 10_000, reference="FT1", made_at=expires - timedelta(minutes=1)
    )
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "duplicate")
    [item] = await items(store)
    assert (item["kind"], item["status"]) == ("partial_expired", "open")
    held = await store.sessions.find_one({"uuid": session["uuid"]})
    assert held is not None and "heldPurgeAt" in held


async def test_a_payment_made_twenty_minutes_after_expiry_is_a_late_item_and_the_session_stays_expired(  # noqa: E501
    ingest: Client, store: Store, settings: Settings
) -> None:
    expires = utcnow() - timedelta(minutes=25)
    session = await add_session(store, amount=40_000, expiresAt=expires)
    await expire_by_cleanup(store, settings)
    webhook = signed_webhook(session["orderCode"], 40_000, made_at=expires + timedelta(minutes=20))
    async with subscribed(settings.redis_url, session["uuid"]) as waiting:
        status, body = await post(ingest, webhook)
        assert await waiting.settle() == []
    assert (status, body["outcome"]) == (200, "late")
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("expired", 0)
    [item] = await items(store)
    assert (item["kind"], item["status"], item["amount"]) == ("late", "open", 40_000)
    assert item["data"] == webhook["data"] and item["uuid"] == session["uuid"]


async def test_a_late_payment_without_a_readable_transaction_time_is_a_late_item(
    ingest: Client, store: Store
) -> None:
    session = await add_session(store, amount=8_000, expiresAt=utcnow() - timedelta(minutes=1))
    webhook = signed_webhook(session["orderCode"], 8_000)
    webhook["data"]["transactionDateTime"] = "yesterday"
    webhook["signature"] = sign_data(webhook["data"], TEST_CHECKSUM_KEY)
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "late")
    assert [i["kind"] for i in await items(store)] == ["late"]


# --- one item per case -------------------------------------------------------------------


async def test_an_unknown_order_is_one_open_item(ingest: Client, store: Store) -> None:
    webhook = signed_webhook(987_654_321, 12_000)
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "unknown_order")
    [item] = await items(store)
    assert (item["kind"], item["orderCode"], item["reference"]) == (
        "unknown_order",
        987_654_321,
        webhook["data"]["reference"],
    )
    assert (item["status"], item["session"], item["data"]) == ("open", None, webhook["data"])


async def test_payos_confirm_webhook_test_delivery_is_recorded_as_a_test_and_not_alarmed(
    ingest: Client, store: Store
) -> None:
    webhook = signed_webhook(123, 3_000, description="VQRIO123")
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "unknown_order")
    [item] = await items(store)
    assert (item["kind"], item["status"], item["test"]) == ("unknown_order", "resolved", True)
    assert (await Ledger(store).open_counts())["unknown_order"] == 0


async def test_an_overpayment_completes_the_session_and_is_one_item_with_the_excess(
    ingest: Client, store: Store
) -> None:
    session = await add_session(store, amount=30_000)
    first = await post(ingest, signed_webhook(session["orderCode"], 20_000))
    second = await post(ingest, signed_webhook(session["orderCode"], 25_000))
    assert [first[1]["outcome"], second[1]["outcome"]] == ["partial", "completed"]
    [item] = await items(store)
    assert (item["kind"], item["amount"], item["excess"]) == ("overpaid", 25_000, 15_000)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("completed", 45_000)


async def test_a_payment_in_another_currency_is_one_item_and_counts_nothing(
    ingest: Client, store: Store
) -> None:
    session = await add_session(store, amount=10_000)
    webhook = with_currency(signed_webhook(session["orderCode"], 10_000), "USD")
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "currency")
    [item] = await items(store)
    assert (item["kind"], item["status"], item["uuid"]) == ("currency", "open", session["uuid"])
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("pending", 0)


CASES: dict[str, Callable[[Store], Awaitable[tuple[dict[str, Any], str]]]] = {}


def case(name: str) -> Callable[..., Any]:
    def register(f: Callable[[Store], Awaitable[tuple[dict[str, Any], str]]]) -> Any:
        CASES[name] = f
        return f

    return register


@case("unknown_order")
async def _unknown(store: Store) -> tuple[dict[str, Any], str]:
    return signed_webhook(555_000_111, 9_000), "unknown_order"


@case("overpaid")
async def _overpaid(store: Store) -> tuple[dict[str, Any], str]:
    session = await add_session(store, amount=10_000)
    return signed_webhook(session["orderCode"], 14_000), "completed"


@case("late")
async def _late(store: Store) -> tuple[dict[str, Any], str]:
    expires = utcnow() - timedelta(hours=1)
    session = await add_session(store, amount=10_000, expiresAt=expires, status="expired")
    return signed_webhook(
        session["orderCode"], 10_000, made_at=expires + timedelta(hours=1)
    ), "late"


@case("currency")
async def _currency(store: Store) -> tuple[dict[str, Any], str]:
    session = await add_session(store, amount=10_000)
    return with_currency(signed_webhook(session["orderCode"], 10_000), "USD"), "currency"


@pytest.mark.parametrize("kind", sorted(CASES))
async def test_twenty_concurrent_redeliveries_make_exactly_one_item(
    ingest: Client, store: Store, kind: str
) -> None:
    webhook, first = await CASES[kind](store)
    results = await asyncio.gather(*(post(ingest, webhook) for _ in range(20)))
    assert all(status == 200 for status, _ in results)
    outcomes = sorted(body["outcome"] for _, body in results)
    assert outcomes == sorted([first] + ["duplicate"] * 19)
    [item] = await items(store)
    assert (item["kind"], item["status"]) == (kind, "open")
    stored = await store.sessions.find_one({"orderCode": webhook["data"]["orderCode"]})
    if stored is not None:
        assert stored["amountPaid"] == (14_000 if kind == "overpaid" else 0)


@pytest.fixture
async def two_ingests(settings: Settings, tmp_path: Path, store: Store) -> AsyncIterator[list[str]]:
    """Two webhook-ingest processes over the same Redis and MongoDB."""
    procs = [
        service_process(settings, "webhook-ingest", tmp_path, label=f"ingest-{i}") for i in range(2)
    ]
    try:
        await asyncio.gather(*(start_ready(proc, 15) for proc in procs))
        yield [f"http://127.0.0.1:{proc.port}" for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


@pytest.mark.parametrize("kind", sorted(CASES))
async def test_two_ingest_processes_racing_twenty_redeliveries_make_exactly_one_item(
    two_ingests: list[str], store: Store, kind: str
) -> None:
    webhook, _ = await CASES[kind](store)
    body = json.dumps(webhook)
    async with httpx.AsyncClient(timeout=10) as http:

        async def deliver(i: int) -> int:
            url = f"{two_ingests[i % 2]}/api/webhooks"
            resp = await http.post(url, content=body, headers={"Content-Type": "application/json"})
            return resp.status_code

        assert await asyncio.gather(*(deliver(i) for i in range(20))) == [200] * 20
    [item] = await items(store)
    assert item["kind"] == kind
    assert await store.webhooks.count_documents({}) == 1


# --- the session is kept while an item about it is open ----------------------------------


@pytest.fixture
async def ledger(store: Store) -> AsyncIterator[Ledger]:
    yield Ledger(store)


async def test_a_session_with_an_open_item_is_held_from_the_ttl_and_released_on_resolve(
    ingest: Client, store: Store, ledger: Ledger
) -> None:
    session = await add_session(store, amount=10_000)
    await post(ingest, with_currency(signed_webhook(session["orderCode"], 10_000), "EUR"))
    held = await store.sessions.find_one({"uuid": session["uuid"]})
    assert held is not None and "purgeAt" not in held and held["heldPurgeAt"] is not None
    [item] = await items(store)
    await ledger.resolve(str(item["_id"]), by="ops@example", note="refunded")
    released = await store.sessions.find_one({"uuid": session["uuid"]})
    assert released is not None and "heldPurgeAt" not in released
    assert released["purgeAt"] == held["heldPurgeAt"]
    [resolved] = await items(store)
    assert (resolved["status"], resolved["resolvedBy"], resolved["note"]) == (
        IssueStatus.RESOLVED,
        "ops@example",
        "refunded",
    )
    assert resolved["resolvedAt"] is not None


async def test_open_counts_are_by_kind_with_zeroes(ingest: Client, store: Store) -> None:
    await post(ingest, signed_webhook(444_000_001, 1_000))
    await post(ingest, signed_webhook(444_000_002, 1_000))
    counts = await Ledger(store).open_counts()
    assert counts == {**{k.value: 0 for k in IssueKind}, "unknown_order": 2}


async def test_a_payment_whose_session_the_cleanup_expired_under_it_is_counted_not_forgotten(
    store: Store, settings: Settings
) -> None:
    from shared.payments import Outcome, Payments, Transaction

    expires = utcnow() + timedelta(seconds=30)
    session = await add_session(store, amount=9_000, expiresAt=expires)
    stale = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stale is not None
    # The cleanup expires it between the core's read and its update.
    await store.sessions.update_one(
        {"uuid": session["uuid"]}, {"$set": {"status": "expired"}, "$inc": {"version": 1}}
    )
    webhook = signed_webhook(session["orderCode"], 9_000, made_at=expires - timedelta(seconds=5))
    tx = Transaction(session["orderCode"], webhook["data"]["reference"], 9_000, webhook["data"])
    payments = Payments(store, Ledger(store), grace_seconds=900)
    applied = await payments._decide(tx, stale, utcnow(), tries=3)
    assert applied.outcome is Outcome.COMPLETED
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("completed", 9_000)


async def test_a_redelivery_after_the_item_was_resolved_does_not_hold_the_session_again(
    ingest: Client, store: Store, ledger: Ledger
) -> None:
    session = await add_session(store, amount=10_000)
    webhook = with_currency(signed_webhook(session["orderCode"], 10_000), "EUR")
    await post(ingest, webhook)
    [item] = await items(store)
    await ledger.resolve(str(item["_id"]), by="ops", note="refunded")
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "duplicate")
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and "heldPurgeAt" not in stored and stored["purgeAt"] is not None
    assert [i["status"] for i in await items(store)] == ["resolved"]
