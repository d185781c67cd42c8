"""The ingest's core (`Ingestor`) on real Redis and MongoDB, without the HTTP edge: what each
delivery records, its outcome, the event it publishes and whether it published it.

tests/test_webhook_ingest.py drives the same through `POST /api/webhooks`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from redis.asyncio import Redis

from devstack.servers import free_port
from shared import keys
from shared.cache import StatusCache
from shared.ledger import Ledger
from shared.model import StreamStatus, utcnow
from shared.mongo import PUBLISH_PENDING, Store
from shared.payments import Payments
from shared.settings import Settings
from tests.helpers import TEST_CHECKSUM_KEY, add_session, signed_webhook
from webhook_ingest.errors import StoreUnavailable
from webhook_ingest.ingest import Ingestor, Outcome
from webhook_ingest.payload import Webhook, parse_webhook
from webhook_ingest.resync import Resync


def payments(store: Store) -> Payments:
    """The counting core as the ingest's app builds it (the default grace)."""
    return Payments(store, Ledger(store), grace_seconds=900)


@pytest.fixture
async def ingestor(settings: Settings, store: Store) -> AsyncIterator[Ingestor]:
    redis = Redis.from_url(settings.redis_url)
    cache = StatusCache(redis)
    yield Ingestor(store, cache, Resync(store, cache), payments(store))
    await redis.aclose()


def webhook(order_code: int, amount: int, **changes: object) -> Webhook:
    body = signed_webhook(order_code, amount, **changes)  # type: ignore[arg-type]
    return parse_webhook(json.dumps(body).encode(), TEST_CHECKSUM_KEY)


async def test_a_delivery_is_recorded_with_everything_it_said(
    ingestor: Ingestor, store: Store
) -> None:
    delivery = webhook(123, 3_000)
    result = await ingestor.ingest(delivery)
    assert (result.outcome, result.event, result.published) == (
        Outcome.UNKNOWN_ORDER,
        None,
        False,
    )
    stored = await store.webhooks.find_one({"orderCode": 123}, {"_id": 0})
    assert stored is not None
    received, expires = stored.pop("receivedAt"), stored.pop("expiresAt")
    assert stored == {
        "orderCode": 123,
        "reference": delivery.reference,
        "amount": 3_000,
        "code": delivery.code,
        "desc": delivery.desc,
        "success": delivery.success,
        "data": delivery.data,
    }
    assert expires - received == timedelta(seconds=keys.SESSION_TTL_SECONDS)


async def test_a_payment_in_full_completes_publishes_once_and_its_copy_is_a_duplicate(
    ingestor: Ingestor, store: Store
) -> None:
    session = await add_session(store, amount=9_000)
    delivery = webhook(session["orderCode"], 9_000)
    first = await ingestor.ingest(delivery)
    assert (first.outcome, first.published) == (Outcome.COMPLETED, True)
    assert first.event is not None
    assert (first.event.status, first.event.amount_paid, first.event.version) == (
        StreamStatus.DONE,
        9_000,
        2,
    )
    again = await ingestor.ingest(delivery)
    assert (again.outcome, again.event, again.published) == (Outcome.DUPLICATE, first.event, False)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert (stored["status"], stored["amountPaid"], stored["version"]) == ("completed", 9_000, 2)
    assert stored["references"] == [delivery.reference]
    assert stored["completedAt"] is not None and stored["updatedAt"] is not None


async def test_partial_payments_count_each_and_complete_at_the_amount(
    ingestor: Ingestor, store: Store
) -> None:
    session = await add_session(store, amount=10_000)
    first = await ingestor.ingest(webhook(session["orderCode"], 4_000))
    assert first.outcome is Outcome.PARTIAL and first.published
    assert first.event is not None
    assert (first.event.status, first.event.amount_paid) == (StreamStatus.PENDING, 4_000)
    second = await ingestor.ingest(webhook(session["orderCode"], 6_000))
    assert second.outcome is Outcome.COMPLETED and second.event is not None
    assert (second.event.amount_paid, second.event.version) == (10_000, 3)
    # More money for a session paid in full counts nothing there: it is a ledger item.
    extra = await ingestor.ingest(webhook(session["orderCode"], 1_000))
    assert extra.outcome is Outcome.OVERPAID and extra.event == second.event
    assert not extra.published
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["amountPaid"] == 10_000
    assert await store.db["paymentIssues"].count_documents({"kind": "overpaid"}) == 1


async def test_one_more_than_the_amount_completes_and_one_less_does_not(
    ingestor: Ingestor, store: Store
) -> None:
    over = await add_session(store, amount=5_000)
    result = await ingestor.ingest(webhook(over["orderCode"], 5_001))
    assert result.outcome is Outcome.COMPLETED
    under = await add_session(store, amount=5_000)
    result = await ingestor.ingest(webhook(under["orderCode"], 4_999))
    assert result.outcome is Outcome.PARTIAL


async def test_a_failed_transaction_is_recorded_and_counts_nothing(
    ingestor: Ingestor, store: Store
) -> None:
    session = await add_session(store, amount=9_000)
    result = await ingestor.ingest(webhook(session["orderCode"], 9_000, code="01"))
    assert result.outcome is Outcome.NOT_PAID and result.event is not None
    assert (result.event.status, result.event.amount_paid) == (StreamStatus.PENDING, 0)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["version"]) == ("pending", 1)


async def test_before_the_indexes_exist_nothing_is_taken(settings: Settings, store: Store) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        cache = StatusCache(redis)
        store.indexes_ready = False
        with pytest.raises(StoreUnavailable, match="indexes not ready"):
            await Ingestor(store, cache, Resync(store, cache), payments(store)).ingest(
                webhook(123, 3_000)
            )
        assert await store.webhooks.count_documents({}) == 0
    finally:
        await redis.aclose()


async def test_a_redelivered_failed_transaction_is_a_duplicate(
    ingestor: Ingestor, store: Store
) -> None:
    session = await add_session(store, amount=9_000)
    delivery = webhook(session["orderCode"], 9_000, code="01")
    assert (await ingestor.ingest(delivery)).outcome is Outcome.NOT_PAID
    assert (await ingestor.ingest(delivery)).outcome is Outcome.DUPLICATE
    assert await store.webhooks.count_documents({"orderCode": session["orderCode"]}) == 1


async def test_counting_a_transaction_moves_updated_at_to_the_databases_now(
    ingestor: Ingestor, store: Store
) -> None:
    long_ago = utcnow() - timedelta(hours=1)
    session = await add_session(store, amount=10_000, updatedAt=long_ago)
    result = await ingestor.ingest(webhook(session["orderCode"], 4_000))
    assert result.event is not None and result.event.updated_at > long_ago + timedelta(minutes=59)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and "completedAt" not in stored


async def test_a_session_stored_without_amount_paid_counts_from_zero(
    ingestor: Ingestor, store: Store
) -> None:
    session = await add_session(store, amount=10_000)
    await store.sessions.update_one({"uuid": session["uuid"]}, {"$unset": {"amountPaid": ""}})
    result = await ingestor.ingest(webhook(session["orderCode"], 9_999))
    assert result.outcome is Outcome.PARTIAL and result.event is not None
    assert result.event.amount_paid == 9_999


async def test_with_redis_down_the_payment_counts_unpublished_and_is_marked_for_later(
    store: Store,
) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        cache = StatusCache(dead)
        ingestor = Ingestor(store, cache, Resync(store, cache), payments(store))
        session = await add_session(store, amount=9_000)
        result = await ingestor.ingest(webhook(session["orderCode"], 9_000))
        assert (result.outcome, result.published) == (Outcome.COMPLETED, False)
        stored = await store.sessions.find_one({"uuid": session["uuid"]})
        assert stored is not None and stored.get(PUBLISH_PENDING)
    finally:
        await dead.aclose()


async def test_a_redelivered_payment_for_an_unknown_order_is_a_duplicate(
    ingestor: Ingestor, store: Store
) -> None:
    delivery = webhook(987_654_321, 5_000)
    first = await ingestor.ingest(delivery)
    assert first.outcome is Outcome.UNKNOWN_ORDER and first.event is None
    again = await ingestor.ingest(delivery)
    assert again.outcome is Outcome.DUPLICATE and again.event is None
    assert await store.db["paymentIssues"].count_documents({"orderCode": 987_654_321}) == 1


async def test_a_failed_transaction_for_an_unknown_order_is_an_unknown_order(
    ingestor: Ingestor, store: Store
) -> None:
    result = await ingestor.ingest(webhook(987_654_322, 5_000, code="01"))
    assert result.outcome is Outcome.UNKNOWN_ORDER
    assert (result.event, result.published) == (None, False)
    # Nothing was paid: no money to look at.
    assert await store.db["paymentIssues"].count_documents({"orderCode": 987_654_322}) == 0
