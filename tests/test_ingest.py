"""The ingest's core (`Ingestor`) on real Redis and MongoDB, without the HTTP edge: what each
delivery records, its outcome, the event it publishes and whether it published it.

tests/test_webhook_ingest.py drives the same through `POST /api/webhooks`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from devstack.servers import free_port
from shared import keys, outbox
from shared.cache import StatusCache
from shared.ledger import Ledger
from shared.model import StreamStatus, utcnow
from shared.mongo import CHECK_AT, NO_CHECK, PUBLISH_PENDING, Store
from shared.payments import (
    COUNT_ATTEMPTS,
    VIETNAM,
    Payments,
    Transaction,
    parse_transaction_time,
)
from shared.settings import Settings
from tests.helpers import TEST_CHECKSUM_KEY, add_session, signed_webhook
from webhook_ingest.errors import StoreUnavailable
from webhook_ingest.ingest import Ingestor, Outcome
from webhook_ingest.payload import Webhook, parse_webhook
from webhook_ingest.resync import Resync

GRACE = timedelta(seconds=900)


def payments(store: Store) -> Payments:
    """The counting core as the ingest's app builds it (the default grace)."""
    return Payments(store, Ledger(store), grace_seconds=GRACE.total_seconds())


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


# --- the counting core (shared.payments) on what a delivery alone does not reach ---------------


def tx(
    order_code: int, reference: str, amount: int, made_at: datetime | None = None
) -> Transaction:
    """A paid transaction as the core sees it; `made_at` as PayOS writes it (Vietnam time)."""
    when = "" if made_at is None else made_at.astimezone(VIETNAM).strftime("%Y-%m-%d %H:%M:%S")
    data = {"reference": reference, "amount": amount, "transactionDateTime": when}
    return Transaction(order_code, reference, amount, data)


async def issue(store: Store, kind: str, order_code: int, reference: str) -> dict[str, Any] | None:
    return await store.issues.find_one(
        {"kind": kind, "orderCode": order_code, "reference": reference}
    )


def test_transaction_times_are_read_as_vietnam_time_unless_they_say_otherwise() -> None:
    naive = parse_transaction_time("2026-01-01 07:00:00")
    assert naive == datetime(2026, 1, 1, tzinfo=UTC)
    assert naive is not None and naive.utcoffset() == timedelta(hours=7)
    aware = parse_transaction_time("2026-01-01T07:00:00+00:00")
    assert aware == datetime(2026, 1, 1, 7, tzinfo=UTC)
    for unreadable in (None, "", "yesterday", 20260101):
        assert parse_transaction_time(unreadable) is None


async def test_expiry_is_judged_at_the_now_the_core_is_given_to_the_millisecond(
    store: Store,
) -> None:
    session = await add_session(store, amount=10_000)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    # At the very instant of expiry the session is no longer live: an unreadable time is late.
    applied = await payments(store).apply(
        tx(session["orderCode"], "FT-AT-EXPIRY", 4_000), now=stored["expiresAt"]
    )
    assert (applied.outcome, applied.changed) == ("late", False)
    assert await issue(store, "late", session["orderCode"], "FT-AT-EXPIRY") is not None
    # A millisecond before, it is live and the same kind of transfer counts.
    applied = await payments(store).apply(
        tx(session["orderCode"], "FT-BEFORE", 4_000),
        now=stored["expiresAt"] - timedelta(milliseconds=1),
    )
    assert (applied.outcome, applied.changed) == ("partial", True)


async def test_a_payment_made_at_the_last_second_of_the_grace_counts_and_one_second_later_is_late(
    store: Store,
) -> None:
    expired_at = utcnow().replace(microsecond=0) - timedelta(hours=1)
    session = await add_session(store, amount=10_000, status="expired", expiresAt=expired_at)
    core = payments(store)
    last = await core.apply(tx(session["orderCode"], "FT-LAST", 4_000, expired_at + GRACE))
    assert (last.outcome, last.changed) == ("partial", True)
    after = await core.apply(
        tx(session["orderCode"], "FT-AFTER", 4_000, expired_at + GRACE + timedelta(seconds=1))
    )
    assert (after.outcome, after.changed) == ("late", False)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert (stored["status"], stored["amountPaid"], stored["references"]) == (
        "expired",
        4_000,
        ["FT-LAST"],
    )


async def test_the_excess_is_right_on_a_session_counted_before_paid_amounts_were_kept(
    store: Store,
) -> None:
    # References counted by an older version: no `paidAmounts` for them.
    session = await add_session(
        store, amount=10_000, amountPaid=3_000, references=["FT-OLD"], version=2
    )
    core = payments(store)
    order = session["orderCode"]
    assert (await core.apply(tx(order, "FT-B", 3_000))).outcome == "partial"
    assert (await core.apply(tx(order, "FT-C", 6_000))).outcome == "completed"
    over = await issue(store, "overpaid", order, "FT-C")
    assert over is not None and over["excess"] == 2_000
    # The older ones paid nothing beyond the amount, and a redelivery says so.
    assert (await core.apply(tx(order, "FT-OLD", 3_000))).outcome == "duplicate"
    assert (await core.apply(tx(order, "FT-B", 3_000))).outcome == "duplicate"
    assert await store.issues.count_documents({"kind": "overpaid"}) == 1


async def test_a_session_paid_in_full_but_left_pending_is_completed_once_by_a_redelivery(
    store: Store,
) -> None:
    # Counted in full by a version that completed in a second update and died in between.
    long_ago = utcnow() - timedelta(hours=1)
    session = await add_session(
        store,
        amount=10_000,
        amountPaid=10_000,
        references=["FT-PAID"],
        paidAmounts=[10_000],
        version=2,
        updatedAt=long_ago,
    )
    core = payments(store)
    applied = await core.apply(tx(session["orderCode"], "FT-PAID", 10_000))
    assert (applied.outcome, applied.changed) == ("completed", True)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and applied.session is not None
    assert (stored["status"], stored["version"], stored[CHECK_AT]) == ("completed", 3, NO_CHECK)
    assert applied.session["version"] == 3
    assert stored["completedAt"] > long_ago and stored["updatedAt"] > long_ago
    [event] = [outbox.parse(e) for e in stored[outbox.OUTBOX]]
    assert (event["type"], event["data"]["status"], event["data"]["version"]) == (
        "payment.completed",
        "completed",
        3,
    )
    again = await core.apply(tx(session["orderCode"], "FT-PAID", 10_000))
    assert (again.outcome, again.changed) == ("duplicate", False)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and len(stored[outbox.OUTBOX]) == 1
    assert not await store.issues.find_one({"kind": "overpaid"})


class _AlwaysMovedOn:
    """The sessions collection, as if another change always landed just before each guarded
    update (and, with `deleted`, as if the session were then gone)."""

    def __init__(self, real: Any, *, deleted: bool = False) -> None:
        self._real = real
        self._deleted = deleted
        self.updates = 0
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def find_one_and_update(self, *args: Any, **kwargs: Any) -> None:
        self.updates += 1

    async def find_one(self, query: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if "_id" in query:
            # A fresh read: the change that beat the update is there (a cent more paid).
            self.reads += 1
            if self._deleted:
                return None
            await self._real.update_one(query, {"$inc": {"amountPaid": 1}})
        return await self._real.find_one(query, *args, **kwargs)


def moving_store(store: Store, *, deleted: bool = False) -> tuple[Store, _AlwaysMovedOn]:
    moving = Store(store.client)
    sessions = _AlwaysMovedOn(store.sessions, deleted=deleted)
    moving.sessions = cast(Any, sessions)
    return moving, sessions


async def test_a_session_that_keeps_changing_leaves_the_payment_a_late_item_after_a_few_tries(
    store: Store,
) -> None:
    session = await add_session(store, amount=10_000)
    moving, sessions = moving_store(store)
    applied = await Payments(moving, Ledger(store), grace_seconds=900).apply(
        tx(session["orderCode"], "FT-MOVING", 4_000)
    )
    assert (applied.outcome, applied.changed) == ("late", False)
    assert applied.session is not None and applied.session["uuid"] == session["uuid"]
    # The first try, then one per fresh read.
    assert (sessions.updates, sessions.reads) == (COUNT_ATTEMPTS + 1, COUNT_ATTEMPTS + 1)
    item = await issue(store, "late", session["orderCode"], "FT-MOVING")
    assert item is not None and item["uuid"] == session["uuid"]
    # About the session as last read.
    assert item["session"]["amountPaid"] == applied.session["amountPaid"] == COUNT_ATTEMPTS + 1


async def test_a_session_deleted_under_a_payment_leaves_it_a_late_item_about_that_session(
    store: Store,
) -> None:
    session = await add_session(store, amount=10_000)
    moving, sessions = moving_store(store, deleted=True)
    applied = await Payments(moving, Ledger(store), grace_seconds=900).apply(
        tx(session["orderCode"], "FT-GONE", 4_000)
    )
    assert (applied.outcome, applied.changed) == ("late", False)
    assert applied.session is not None and applied.session["uuid"] == session["uuid"]
    assert sessions.updates == 1
    item = await issue(store, "late", session["orderCode"], "FT-GONE")
    assert item is not None and item["uuid"] == session["uuid"]
    assert item["session"]["amount"] == 10_000


async def test_a_redelivery_records_the_excess_its_first_delivery_died_before_recording(
    store: Store,
) -> None:
    # Counted one over the amount (completing it); the process died before the overpaid item.
    session = await add_session(
        store,
        amount=10_000,
        amountPaid=10_001,
        references=["FT-OVER"],
        paidAmounts=[10_001],
        status="completed",
        version=2,
    )
    again = await payments(store).apply(tx(session["orderCode"], "FT-OVER", 10_001))
    assert (again.outcome, again.changed) == ("duplicate", False)
    item = await issue(store, "overpaid", session["orderCode"], "FT-OVER")
    assert item is not None and item["excess"] == 1
