"""webhook-ingest: signed PayOS webhooks stored, sessions completed once, events published once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient

from devstack.payos_simulator.state import new_reference
from devstack.system import Backends, wait_ready
from shared.appkeys import CACHE, STORE
from shared.model import StatusEvent, StreamStatus, utcnow
from shared.mongo import Store
from shared.settings import Settings
from shared.signing import sign_data
from tests.helpers import TEST_CHECKSUM_KEY, add_session, signed_webhook, subscribed
from webhook_ingest import create_app

Client = TestClient[Any, Any]


@pytest.fixture
async def ingest(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, store: Store
) -> Client:
    client = await aiohttp_client(create_app(settings))
    # Index creation runs in the background at start-up; /readyz waits for it.
    await wait_ready(str(client.make_url("")), 5)
    return client


async def post(client: Client, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(
        "/api/webhooks", data=raw, headers={"Content-Type": "application/json"}
    )
    return resp.status, await resp.json()


async def test_valid_webhook_completes_session_and_publishes_one_event(
    ingest: Client, store: Store, settings: Settings
) -> None:
    session = await add_session(store, amount=50_000)
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        status, body = await post(ingest, signed_webhook(session["orderCode"], 50_000))
        assert (status, body["outcome"]) == (200, "completed")
        [event] = await sub.wait_for(1)
        assert len(await sub.settle()) == 1
    assert event.status is StreamStatus.DONE
    assert (event.uuid, event.amount, event.amount_paid) == (session["uuid"], 50_000, 50_000)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["status"] == "completed"
    assert await store.webhooks.count_documents({"orderCode": session["orderCode"]}) == 1
    cached = await ingest.app[CACHE].get(session["uuid"])
    assert cached is not None and cached.status is StreamStatus.DONE


async def test_twenty_concurrent_copies_complete_once_and_publish_once(
    ingest: Client, store: Store, settings: Settings
) -> None:
    session = await add_session(store, amount=20_000)
    webhook = signed_webhook(session["orderCode"], 20_000)
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        results = await asyncio.gather(*(post(ingest, webhook) for _ in range(20)))
        await sub.wait_for(1)
        assert len(await sub.settle()) == 1
    assert all(status == 200 for status, _ in results)
    outcomes = sorted(body["outcome"] for _, body in results)
    assert outcomes.count("completed") == 1
    assert outcomes.count("duplicate") == 19
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert (stored["status"], stored["amountPaid"], stored["version"]) == ("completed", 20_000, 2)
    assert await store.webhooks.count_documents({}) == 1


async def test_redelivered_webhook_is_acknowledged_and_changes_nothing(
    ingest: Client, store: Store, settings: Settings
) -> None:
    session = await add_session(store, amount=10_000)
    webhook = signed_webhook(session["orderCode"], 10_000)
    assert (await post(ingest, webhook))[0] == 200
    before = await store.sessions.find_one({"uuid": session["uuid"]})
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        status, body = await post(ingest, webhook)
        assert await sub.settle() == []
    assert (status, body["outcome"]) == (200, "duplicate")
    assert await store.sessions.find_one({"uuid": session["uuid"]}) == before


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda w: w["data"].__setitem__("amount", w["data"]["amount"] * 10),
            id="tampered-amount",
        ),
        pytest.param(
            lambda w: w.update(signed_webhook(w["data"]["orderCode"], 5_000, key="wrong-key")),
            id="wrong-key",
        ),
        pytest.param(lambda w: w.pop("signature"), id="missing-signature"),
        pytest.param(lambda w: w.__setitem__("signature", ""), id="empty-signature"),
        pytest.param(lambda w: w["data"].__setitem__("injected", "x"), id="unsigned-extra-field"),
    ],
)
async def test_bad_signature_is_rejected_and_nothing_stored(
    ingest: Client, store: Store, settings: Settings, tamper: Callable[[dict[str, Any]], None]
) -> None:
    session = await add_session(store, amount=5_000)
    webhook = signed_webhook(session["orderCode"], 5_000)
    tamper(webhook)
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        status, body = await post(ingest, webhook)
        assert await sub.settle() == []
    assert status == 401
    assert body["success"] is False and "signature" in body["error"]
    assert await store.webhooks.count_documents({}) == 0
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["status"] == "pending"


def _valid() -> dict[str, Any]:
    return signed_webhook(1234, 5_000)


def _with_data(**changes: Any) -> dict[str, Any]:
    w = _valid()
    w["data"].update(changes)
    return w


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{not json", "not valid JSON", id="invalid-json"),
        pytest.param(b"\xff\xfe", "not valid JSON", id="not-utf8"),
        pytest.param(b"[1, 2]", "JSON object", id="array"),
        pytest.param({"code": "00", "signature": "ab"}, "`data`", id="no-data"),
        pytest.param({"data": "x", "signature": "ab"}, "`data`", id="data-not-object"),
        pytest.param(_with_data(orderCode="1234"), "orderCode", id="orderCode-string"),
        pytest.param(_with_data(orderCode=-5), "orderCode", id="orderCode-negative"),
        pytest.param(_with_data(amount=True), "amount", id="amount-bool"),
        pytest.param(_with_data(amount=1.5), "amount", id="amount-float"),
        pytest.param(_with_data(amount=-1), "amount", id="amount-negative"),
        pytest.param(_with_data(reference=None), "reference", id="reference-missing"),
        pytest.param(_with_data(reference=""), "reference", id="reference-empty"),
        pytest.param(_with_data(description=7), "description", id="description-number"),
        pytest.param({**_valid(), "signature": 12345}, "signature", id="signature-number"),
        pytest.param({**_valid(), "success": "yes"}, "success", id="success-string"),
        pytest.param({**_valid(), "code": 0}, "code", id="code-number"),
    ],
)
async def test_malformed_body_is_400_and_nothing_stored(
    ingest: Client, store: Store, body: Any, message: str
) -> None:
    status, answer = await post(ingest, body)
    assert status == 400
    assert answer["success"] is False and message in answer["error"]
    assert await store.webhooks.count_documents({}) == 0


async def test_oversized_body_is_413_and_nothing_stored(ingest: Client, store: Store) -> None:
    webhook = _valid()
    webhook["data"]["padding"] = "x" * (64 * 1024)
    status, answer = await post(ingest, webhook)
    assert status == 413
    assert answer["success"] is False and "exceeds" in answer["error"]
    assert await store.webhooks.count_documents({}) == 0


async def test_a_webhook_of_exactly_the_body_limit_is_taken_one_byte_more_is_413(
    ingest: Client, store: Store
) -> None:
    limit = 64 * 1024  # MAX_BODY_BYTES' default
    session = await add_session(store, amount=5_000)

    def padded(size: int) -> bytes:
        raw = json.dumps(signed_webhook(session["orderCode"], 5_000)).encode()
        return raw[:-1] + b" " * (size - len(raw)) + b"}"

    assert await post(ingest, padded(limit + 1)) == (
        413,
        {"success": False, "error": f"body exceeds {limit} bytes"},
    )
    assert await store.webhooks.count_documents({}) == 0
    status, body = await post(ingest, padded(limit))
    assert (status, body.get("outcome")) == (200, "completed"), body


async def test_webhook_with_an_extra_signed_field_is_accepted(ingest: Client, store: Store) -> None:
    session = await add_session(store, amount=7_000)
    webhook = signed_webhook(session["orderCode"], 7_000)
    # A field PayOS may add tomorrow, signed like the others.
    webhook["data"]["newFieldFromPayOS"] = "value"
    webhook["signature"] = sign_data(webhook["data"], TEST_CHECKSUM_KEY)
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "completed")
    stored = await store.webhooks.find_one({"orderCode": session["orderCode"]})
    assert stored is not None and stored["data"]["newFieldFromPayOS"] == "value"


async def test_unknown_order_is_acknowledged_recorded_and_touches_no_session(
    ingest: Client, store: Store
) -> None:
    session = await add_session(store)
    # PayOS's confirm-webhook test delivery.
    status, body = await post(ingest, signed_webhook(123, 3_000))
    assert (status, body["outcome"]) == (200, "unknown_order")
    assert await store.webhooks.count_documents({"orderCode": 123}) == 1
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["version"]) == ("pending", 1)


async def test_failed_transaction_is_recorded_and_session_stays_pending(
    ingest: Client, store: Store
) -> None:
    session = await add_session(store, amount=9_000)
    status, body = await post(ingest, signed_webhook(session["orderCode"], 9_000, code="01"))
    assert (status, body["outcome"]) == (200, "not_paid")
    assert await store.webhooks.count_documents({"orderCode": session["orderCode"]}) == 1
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("pending", 0)


async def test_signed_success_is_paid_whatever_the_unsigned_envelope_says(
    ingest: Client, store: Store
) -> None:
    session = await add_session(store, amount=9_000)
    webhook = signed_webhook(session["orderCode"], 9_000)
    # Outside `data`, so the signature still holds: anyone on the path could write these.
    webhook.update(code="01", success=False, desc="failed")
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "completed")
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("completed", 9_000)


async def test_signed_failure_is_not_paid_whatever_the_unsigned_envelope_says(
    ingest: Client, store: Store
) -> None:
    session = await add_session(store, amount=9_000)
    webhook = signed_webhook(session["orderCode"], 9_000, code="01")
    webhook.update(code="00", success=True, desc="success")
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "not_paid")
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("pending", 0)


async def test_signed_data_without_a_code_is_not_paid_whatever_the_envelope_says(
    ingest: Client, store: Store
) -> None:
    session = await add_session(store, amount=9_000)
    webhook = signed_webhook(session["orderCode"], 9_000)
    del webhook["data"]["code"]
    webhook["signature"] = sign_data(webhook["data"], TEST_CHECKSUM_KEY)
    # Only the unsigned envelope would say "paid" here.
    webhook.update(code="00", success=True, desc="success")
    status, body = await post(ingest, webhook)
    assert (status, body["outcome"]) == (200, "not_paid")
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("pending", 0)


async def test_partial_payments_add_up_then_complete(
    ingest: Client, store: Store, settings: Settings
) -> None:
    session = await add_session(store, amount=30_000)
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        first = await post(ingest, signed_webhook(session["orderCode"], 10_000))
        second = await post(ingest, signed_webhook(session["orderCode"], 20_000))
        events = await sub.wait_for(2)
    assert [first[1]["outcome"], second[1]["outcome"]] == ["partial", "completed"]
    assert [(e.status.value, e.amount_paid) for e in events] == [
        ("pending", 10_000),
        ("done", 30_000),
    ]
    assert events[0].version < events[1].version


async def test_completed_session_never_moves_back(ingest: Client, store: Store) -> None:
    session = await add_session(store, amount=5_000)
    await post(ingest, signed_webhook(session["orderCode"], 5_000))
    status, body = await post(ingest, signed_webhook(session["orderCode"], 1_000, code="01"))
    late = await post(ingest, signed_webhook(session["orderCode"], 5_000))
    assert (status, body["outcome"]) == (200, "not_paid")
    assert late[1]["outcome"] == "not_pending"
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("completed", 5_000)


async def test_expired_session_is_not_completed(
    ingest: Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session's expiry is reached by the ingest's clock only, so the document is still
    # there (as under a real TTL monitor, which lags ~60 s), whatever the database's TTL does.
    session = await add_session(store, amount=5_000, expiresAt=utcnow() + timedelta(minutes=5))
    later = utcnow() + timedelta(minutes=10)
    monkeypatch.setattr("webhook_ingest.ingest.utcnow", lambda: later)
    status, body = await post(ingest, signed_webhook(session["orderCode"], 5_000))
    assert (status, body["outcome"]) == (200, "not_pending")
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert (stored["status"], stored["amountPaid"], stored["version"]) == ("pending", 0, 1)
    assert await store.webhooks.count_documents({"orderCode": session["orderCode"]}) == 1


class _GatedSessions:
    """The sessions collection, except that the first `parties` reads by orderCode (the
    ingest's) wait for each other: concurrent deliveries all read the session before any of
    them updates it, every time."""

    def __init__(self, real: Any, parties: int) -> None:
        self._real = real
        self._left = parties
        self._barrier = asyncio.Barrier(parties)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def find_one(self, *args: Any, **kwargs: Any) -> Any:
        doc = await self._real.find_one(*args, **kwargs)
        if self._left > 0 and args and "orderCode" in args[0]:
            self._left -= 1
            async with asyncio.timeout(5):
                await self._barrier.wait()
        return doc


def _gate_reads(ingest: Client, monkeypatch: pytest.MonkeyPatch, parties: int) -> None:
    app_store = ingest.app[STORE]
    monkeypatch.setattr(app_store, "sessions", _GatedSessions(app_store.sessions, parties))


async def test_concurrent_copies_of_a_partial_payment_count_it_once(
    ingest: Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A partial payment leaves the session pending, so `status: pending` cannot tell the
    # copies apart: only the reference guard keeps the second copy from counting again.
    session = await add_session(store, amount=30_000)
    webhook = signed_webhook(session["orderCode"], 10_000)
    _gate_reads(ingest, monkeypatch, 2)
    results = await asyncio.gather(post(ingest, webhook), post(ingest, webhook))
    assert sorted(body["outcome"] for _, body in results) == ["duplicate", "partial"]
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert (stored["status"], stored["amountPaid"], stored["version"]) == ("pending", 10_000, 2)
    assert stored["references"] == [webhook["data"]["reference"]]


async def test_concurrent_partial_transactions_that_sum_to_the_amount_complete_it_once(
    ingest: Client, store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each transaction reads the session unpaid, so neither update completes it by itself:
    # the delivery that counts second finds it paid in full and completes it.
    session = await add_session(store, amount=30_000)
    halves = [signed_webhook(session["orderCode"], 15_000) for _ in range(2)]
    _gate_reads(ingest, monkeypatch, 2)
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        results = await asyncio.gather(*(post(ingest, w) for w in halves))
        assert sorted(body["outcome"] for _, body in results) == ["completed", "partial"]
        stored = await store.sessions.find_one({"uuid": session["uuid"]})
        assert stored is not None
        assert (stored["status"], stored["amountPaid"]) == ("completed", 30_000)
        assert stored["version"] == 4 and stored.get("completedAt") is not None
        async with asyncio.timeout(5):
            while not any(e.status is StreamStatus.DONE for e in sub.events):
                await sub.wait_for(len(sub.events) + 1)
    cached = await ingest.app[CACHE].get(session["uuid"])
    assert cached is not None and (cached.status, cached.version) == (StreamStatus.DONE, 4)


async def test_a_delivery_that_died_between_counting_and_completing_completes_on_redelivery(
    ingest: Client, store: Store, settings: Settings
) -> None:
    # Counted (by concurrent partial transactions, say) but never completed: the redelivery
    # of the last one finds its reference counted and the sum covering the amount.
    reference = new_reference()
    session = await add_session(
        store, amount=20_000, amountPaid=20_000, references=["earlier", reference], version=3
    )
    webhook = signed_webhook(session["orderCode"], 20_000, reference=reference)
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        status, body = await post(ingest, webhook)
        [event] = await sub.wait_for(1)
    assert (status, body["outcome"]) == (200, "completed")
    assert (event.status, event.version) == (StreamStatus.DONE, 4)
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None
    assert (stored["status"], stored["amountPaid"], stored["version"]) == ("completed", 20_000, 4)
    # And once only: another copy changes nothing.
    again = await post(ingest, webhook)
    assert again == (200, {**again[1], "outcome": "duplicate"})
    after = await store.sessions.find_one({"uuid": session["uuid"]})
    assert after is not None and after["version"] == 4


async def test_payment_of_a_newer_session_replaces_the_cached_status_of_an_older_order(
    ingest: Client, store: Store, settings: Settings
) -> None:
    # An older session under the same uuid left `expired` (version 2) in the cache; the newer
    # session (a larger orderCode) is paid at its own version 2. What readers see must be it.
    session = await add_session(store, amount=10_000, orderCode=2_000_000_000_002)
    older = {**session, "orderCode": 2_000_000_000_001, "status": "expired", "version": 2}
    assert await ingest.app[CACHE].put(StatusEvent.from_session(older))
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        status, body = await post(ingest, signed_webhook(session["orderCode"], 10_000))
        assert (status, body["outcome"]) == (200, "completed")
        [event] = await sub.wait_for(1)
    assert (event.order_code, event.status) == (session["orderCode"], StreamStatus.DONE)
    cached = await ingest.app[CACHE].get(session["uuid"])
    assert cached is not None
    assert (cached.order_code, cached.status) == (session["orderCode"], StreamStatus.DONE)


async def test_mongodb_down_is_503_then_redelivery_is_stored_once(
    ingest: Client, store: Store, servers: Backends
) -> None:
    if servers.mongo is None:
        pytest.skip("MongoDB is external; the suite cannot stop it")
    session = await add_session(store, amount=8_000)
    webhook = signed_webhook(session["orderCode"], 8_000)
    servers.mongo.stop()
    try:
        status, body = await post(ingest, webhook)
        assert status == 503 and body["retryable"] is True
    finally:
        servers.mongo.start()
    for _ in range(2):  # PayOS redelivers; a retry may race another
        status, body = await post(ingest, webhook)
        assert status == 200
    assert await store.webhooks.count_documents({"orderCode": session["orderCode"]}) == 1
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("completed", 8_000)


async def test_redis_down_is_acknowledged_and_event_arrives_after_redis_returns(
    ingest: Client, store: Store, settings: Settings, servers: Backends
) -> None:
    session = await add_session(store, amount=6_000)
    servers.redis.stop()
    try:
        status, body = await post(ingest, signed_webhook(session["orderCode"], 6_000))
        assert (status, body["outcome"]) == (200, "completed")
        stored = await store.sessions.find_one({"uuid": session["uuid"]})
        assert stored is not None and stored["status"] == "completed"
        # The deferred publish is marked in MongoDB, so it outlives this ingest process.
        assert stored.get("publishPending")
    finally:
        servers.redis.start()
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        [event] = await sub.wait_for(1, timeout=10)
    assert event.status is StreamStatus.DONE
    async with asyncio.timeout(5):
        while "publishPending" in (await store.sessions.find_one({"uuid": session["uuid"]}) or {}):
            await asyncio.sleep(0.05)
    cached = await ingest.app[CACHE].get(session["uuid"])
    assert cached is not None and cached.status is StreamStatus.DONE


async def test_readiness_requires_mongodb_and_only_watches_redis(
    ingest: Client, servers: Backends
) -> None:
    assert (await ingest.get("/healthz")).status == 200
    ready = await ingest.get("/readyz")
    assert ready.status == 200
    body = await ready.json()
    assert body == {
        "status": "ready",
        "checks": {"mongodb": "ok", "redis": "ok"},
        "required": ["mongodb"],
    }
    servers.redis.stop()
    try:
        # Without Redis the ingest still stores and acknowledges webhooks: it stays ready.
        degraded = await ingest.get("/readyz")
        assert degraded.status == 200
        body = await degraded.json()
        assert body["status"] == "degraded"
        assert body["checks"]["redis"].startswith("down")
        assert (await ingest.get("/healthz")).status == 200
        metrics = await (await ingest.get("/metrics")).text()
        assert 'paypush_dependency_up{dependency="redis",required="false"} 0.0' in metrics
        assert 'paypush_dependency_up{dependency="mongodb",required="true"} 1.0' in metrics
    finally:
        servers.redis.start()


async def test_metrics_count_webhooks_by_outcome(ingest: Client, store: Store) -> None:
    session = await add_session(store, amount=4_000)
    await post(ingest, signed_webhook(session["orderCode"], 4_000))
    await post(ingest, b"nope")
    text = await (await ingest.get("/metrics")).text()
    assert 'paypush_webhooks_total{outcome="completed"} 1.0' in text
    assert 'paypush_webhooks_total{outcome="invalid"} 1.0' in text
    assert "paypush_webhook_seconds_bucket" in text


async def test_logs_never_hold_a_full_signature(ingest: Client, store: Store) -> None:
    session = await add_session(store, amount=4_000)
    webhook = signed_webhook(session["orderCode"], 4_000)
    good_signature = webhook["signature"]
    webhook["data"]["amount"] = 1
    with structlog.testing.capture_logs() as logs:
        await post(ingest, webhook)
    rejected = [entry for entry in logs if entry["event"] == "webhook_rejected"]
    assert rejected and rejected[0]["signature"].startswith(good_signature[:6])
    assert good_signature not in json.dumps(logs, default=str)
