"""session-api: sessions and the per-account limit against the unmodified payos SDK and the
PayOS simulator, status reads through the cache, listing, cleanup and stats, on real servers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient
from payos import APIError, AsyncPayOS

from devstack.system import Backends, wait_ready
from session_api import create_app
from session_api.appkeys import SESSIONS
from session_api.cleanup import run_cleanup
from session_api.session_view import SessionView
from session_api.validation import CreateRequest
from shared.appkeys import CACHE, METRICS, STORE
from shared.model import StatusEvent, StreamStatus, utcnow
from shared.mongo import Store
from shared.payos_client import payos_client
from shared.settings import Settings
from tests.helpers import Sim, add_session, paused, run_cleanup_job, simulator_to_ingest, subscribed
from webhook_ingest import create_app as create_ingest

Client = TestClient[Any, Any]
ACCOUNT = "0001112223"
CRON = {"Authorization": "Bearer test-cron-secret"}
ADMIN = {"Authorization": "Bearer test-admin-token"}


@pytest.fixture
async def sim(settings: Settings, store: Store) -> AsyncIterator[Sim]:
    async with simulator_to_ingest(settings) as running:
        yield running


@pytest.fixture
def api_settings(settings: Settings, sim: Sim) -> Settings:
    return dataclasses.replace(
        settings,
        payos_base_url=sim.url,
        payos_timeout_seconds=0.5,
        cron_secret="test-cron-secret",
        admin_token="test-admin-token",
    )


async def _ready(client: Client) -> Client:
    # Index creation runs in the background at start-up; /readyz waits for it.
    await wait_ready(str(client.make_url("")), 5)
    return client


@pytest.fixture
async def api(aiohttp_client: Callable[..., Awaitable[Client]], api_settings: Settings) -> Client:
    return await _ready(await aiohttp_client(create_app(api_settings)))


async def create(client: Client, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(
        "/api/sessions", data=raw, headers={"Content-Type": "application/json"}
    )
    return resp.status, await resp.json()


async def get_json(client: Client, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.get(path, **kw)
    return resp.status, await resp.json()


def db_queries(client: Client) -> float:
    value = client.app[METRICS].get_sample_value("paypush_status_db_queries_total")
    return float(value or 0)


def new_uuid() -> str:
    return str(uuidlib.uuid4())


# --- create ---------------------------------------------------------------------------------


async def test_create_returns_the_link_and_stores_a_pending_session(
    api: Client, store: Store
) -> None:
    status, body = await create(api, {"accountNumber": ACCOUNT, "amount": 50_000})
    assert status == 201, body
    assert body["success"] is True and body["status"] == "pending" and body["resumed"] is False
    assert (body["amount"], body["description"]) == (50_000, "NAPTIEN")
    assert body["checkoutUrl"].startswith("http") and body["qrCode"].startswith("000201")
    assert body["expiresAt"].endswith("Z")
    stored = await store.sessions.find_one({"uuid": body["uuid"]})
    assert stored is not None
    assert (stored["orderCode"], stored["status"], stored["qrCode"]) == (
        body["orderCode"],
        "pending",
        body["qrCode"],
    )
    assert stored["expiresAt"] - stored["createdAt"] == timedelta(hours=24)
    cached = await api.app[CACHE].get(body["uuid"])
    assert cached is not None and cached.status is StreamStatus.PENDING


async def test_twenty_concurrent_creates_for_one_account_make_exactly_five(
    api: Client, store: Store
) -> None:
    body = {"accountNumber": ACCOUNT, "amount": 10_000}
    results = await asyncio.gather(*(create(api, body) for _ in range(20)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] * 5 + [429] * 15
    refused = [b for s, b in results if s == 429]
    assert all((b["pendingCount"], b["maxAllowed"]) == (5, 5) for b in refused)
    assert "5" in refused[0]["error"]
    assert await store.sessions.count_documents({"accountNumber": ACCOUNT}) == 5


async def test_two_replicas_sharing_the_database_make_exactly_five(
    aiohttp_client: Callable[..., Awaitable[Client]], api_settings: Settings, store: Store
) -> None:
    a = await _ready(await aiohttp_client(create_app(api_settings)))
    b = await _ready(await aiohttp_client(create_app(api_settings)))
    body = {"accountNumber": ACCOUNT, "amount": 10_000}
    results = await asyncio.gather(*(create(c, body) for c in [a, b] * 10))
    assert sorted(status for status, _ in results) == [201] * 5 + [429] * 15
    codes = [b["orderCode"] for s, b in results if s == 201]
    assert len(set(codes)) == 5
    assert await store.sessions.count_documents({"accountNumber": ACCOUNT}) == 5


async def test_a_lock_left_by_a_dead_replica_is_taken_over_once_its_lease_ran_out(
    api: Client, store: Store
) -> None:
    expired_lease = int(time.time() * 1000) - 1
    await store.db["locks"].insert_one(
        {"_id": ACCOUNT, "owner": "dead", "leaseUntil": expired_lease}
    )
    status, _ = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    assert status == 201
    assert await store.db["locks"].count_documents({}) == 0


async def test_other_accounts_are_not_limited_by_a_full_one(api: Client) -> None:
    for _ in range(5):
        assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 201
    assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 429
    assert (await create(api, {"accountNumber": "999888777", "amount": 10_000}))[0] == 201


async def test_pending_uuid_resumes_the_same_session(api: Client, store: Store) -> None:
    uuid = new_uuid()
    first = await create(api, {"accountNumber": ACCOUNT, "amount": 20_000, "uuid": uuid})
    again = await create(api, {"accountNumber": ACCOUNT, "amount": 20_000, "uuid": uuid})
    assert (first[0], again[0]) == (201, 200)
    assert again[1]["resumed"] is True
    for key in ("uuid", "orderCode", "qrCode", "checkoutUrl", "expiresAt"):
        assert again[1][key] == first[1][key]
    assert await store.sessions.count_documents({}) == 1


async def test_resume_does_not_count_against_the_limit(api: Client) -> None:
    uuids = [new_uuid() for _ in range(5)]
    for uuid in uuids:
        assert (await create(api, {"accountNumber": ACCOUNT, "amount": 9_000, "uuid": uuid}))[
            0
        ] == 201
    status, body = await create(api, {"accountNumber": ACCOUNT, "amount": 9_000, "uuid": uuids[2]})
    assert (status, body["resumed"]) == (200, True)


async def test_another_accounts_uuid_is_refused_without_leaking_it(
    api: Client, store: Store
) -> None:
    uuid = new_uuid()
    mine = await create(api, {"accountNumber": ACCOUNT, "amount": 20_000, "uuid": uuid})
    status, body = await create(api, {"accountNumber": "5556667778", "amount": 1_000, "uuid": uuid})
    assert (mine[0], status) == (201, 409)
    assert body["success"] is False
    leaked = json.dumps(body)
    for secret in (mine[1]["qrCode"], mine[1]["checkoutUrl"], str(mine[1]["orderCode"]), ACCOUNT):
        assert secret not in leaked
    assert await store.sessions.count_documents({}) == 1


async def test_a_used_uuid_whose_session_expired_and_was_deleted_is_409_not_a_new_session(
    api: Client, store: Store
) -> None:
    uuid = new_uuid()
    status, first = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000, "uuid": uuid})
    assert status == 201
    # Two days later the cron job expires the session (`expired` cached for 15 min) and
    # deletes it (a day after its expiry, when a late payment can no longer need it).
    later = utcnow() + timedelta(days=2, seconds=1)
    first_run = await run_cleanup(store, api.app[CACHE], now=later)
    # Kept while its `session.expired` waits in its outbox (issue 17): deleted by this run
    # only if the app's dispatcher took the event in between, else by the next run.
    assert first_run.expired == 1
    async with asyncio.timeout(10):
        while await store.sessions.count_documents({"outboxPending": {"$gt": 0}}):
            await asyncio.sleep(0.05)
    second_run = await run_cleanup(store, api.app[CACHE], now=later)
    assert second_run.expired == 0
    assert first_run.sessions_deleted + second_run.sessions_deleted == 1
    status, body = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000, "uuid": uuid})
    assert status == 409, body
    assert (body["success"], body["retryable"]) == (False, False)
    assert "already used" in body["error"]
    assert await store.sessions.count_documents({}) == 0
    _, read = await get_json(api, f"/api/webhooks?uuid={uuid}")
    assert (read["orderCode"], read["status"]) == (first["orderCode"], "expired")


async def test_a_used_uuid_whose_expired_document_still_exists_is_409_not_503(
    api: Client, store: Store
) -> None:
    # The document is past its expiresAt but still there (its TTL runs a day after that).
    old = await add_session(store, account=ACCOUNT, expiresAt=utcnow() - timedelta(seconds=1))
    assert await store.sessions.count_documents({"uuid": old["uuid"]}) == 1
    status, body = await create(
        api, {"accountNumber": ACCOUNT, "amount": 10_000, "uuid": old["uuid"]}
    )
    assert status == 409, body
    assert (body["success"], body["retryable"]) == (False, False)
    assert "already used" in body["error"]
    assert await store.sessions.count_documents({}) == 1


async def test_limit_frees_when_a_session_is_paid(api: Client, sim: Sim, store: Store) -> None:
    created = [await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}) for _ in range(5)]
    assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 429
    paid = await sim.pay(created[0][1]["orderCode"])
    assert paid["delivered"] is True
    stored = await store.sessions.find_one({"uuid": created[0][1]["uuid"]})
    assert stored is not None and stored["status"] == "completed"
    assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 201


async def test_limit_frees_when_a_session_passes_its_expiry(api: Client, store: Store) -> None:
    for _ in range(4):
        await add_session(store, account=ACCOUNT)
    # Past expiresAt: the TTL monitor may not have deleted it yet, the count must ignore it.
    await add_session(store, account=ACCOUNT, expiresAt=utcnow() - timedelta(seconds=1))
    assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 201
    assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 429


class _CountingSessions:
    """The real sessions collection, noting each method called on it."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.called: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.called.append(name)
        return getattr(self._real, name)


async def test_the_account_limit_is_counted_without_an_aggregation(
    api: Client, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `count_documents` is an aggregation, which the MongoDB stand-in runs over every stored
    # session: once per session created, the soak's creations slowed as sessions piled up
    # until they timed out (shared.mongo: stand-in).
    for _ in range(3):
        await add_session(store, account="999888777")
    spy = _CountingSessions(api.app[STORE].sessions)
    monkeypatch.setattr(api.app[STORE], "sessions", spy)
    for _ in range(5):
        assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 201
    status, refused = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    _, check = await get_json(api, f"/api/webhooks/check-session-limit?accountNumber={ACCOUNT}")
    assert (status, refused["pendingCount"], check["pendingCount"]) == (429, 5, 5)
    assert "find" in spy.called
    assert not {"count_documents", "aggregate"} & set(spy.called)


async def test_limit_frees_when_cleanup_expires_a_stale_session(api: Client, store: Store) -> None:
    for _ in range(4):
        await add_session(store, account=ACCOUNT)
    await add_session(store, account=ACCOUNT, createdAt=utcnow() - timedelta(hours=25))
    assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 429
    assert (await api.post("/api/webhooks/cleanup", headers=CRON)).status == 200
    assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 201


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{nope", "valid JSON", id="invalid-json"),
        pytest.param(b"\xff\xfe", "valid JSON", id="not-utf8"),
        pytest.param([ACCOUNT, 10_000], "JSON object", id="array"),
        pytest.param({"amount": 10_000}, "accountNumber", id="account-missing"),
        pytest.param(
            {"accountNumber": 123456789, "amount": 10_000}, "accountNumber", id="acct-int"
        ),
        pytest.param(
            {"accountNumber": "12 ab", "amount": 10_000}, "accountNumber", id="acct-space"
        ),
        pytest.param({"accountNumber": "", "amount": 10_000}, "accountNumber", id="acct-empty"),
        pytest.param(
            {"accountNumber": "1" * 65, "amount": 10_000}, "accountNumber", id="acct-long"
        ),
        pytest.param({"accountNumber": ACCOUNT}, "amount", id="amount-missing"),
        pytest.param({"accountNumber": ACCOUNT, "amount": "10000"}, "amount", id="amount-string"),
        pytest.param({"accountNumber": ACCOUNT, "amount": 10_000.5}, "amount", id="amount-float"),
        pytest.param({"accountNumber": ACCOUNT, "amount": True}, "amount", id="amount-bool"),
        pytest.param({"accountNumber": ACCOUNT, "amount": 0}, "amount", id="amount-zero"),
        pytest.param({"accountNumber": ACCOUNT, "amount": -5_000}, "amount", id="amount-negative"),
        pytest.param({"accountNumber": ACCOUNT, "amount": 999}, "amount", id="amount-too-small"),
        pytest.param(
            {"accountNumber": ACCOUNT, "amount": 10_000_000_001}, "amount", id="amount-too-large"
        ),
        pytest.param(
            {"accountNumber": ACCOUNT, "amount": 10_000, "description": "x" * 26},
            "description",
            id="description-too-long",
        ),
        pytest.param(
            {"accountNumber": ACCOUNT, "amount": 10_000, "description": ""},
            "description",
            id="description-empty",
        ),
        pytest.param(
            {"accountNumber": ACCOUNT, "amount": 10_000, "description": "nạp tiền"},
            "description",
            id="description-accents",
        ),
        pytest.param(
            {"accountNumber": ACCOUNT, "amount": 10_000, "description": 7},
            "description",
            id="description-number",
        ),
        pytest.param(
            {"accountNumber": ACCOUNT, "amount": 10_000, "uuid": "not-a-uuid"},
            "uuid",
            id="uuid-bad",
        ),
        pytest.param(
            {"accountNumber": ACCOUNT, "amount": 10_000, "uuid": str(uuidlib.uuid1())},
            "uuid",
            id="uuid-v1",
        ),
        pytest.param(
            {"accountNumber": ACCOUNT, "amount": 10_000, "uuid": new_uuid().upper()},
            "uuid",
            id="uuid-uppercase",
        ),
    ],
)
async def test_invalid_create_request_is_400_and_nothing_stored(
    api: Client, store: Store, body: Any, message: str
) -> None:
    status, answer = await create(api, body)
    assert status == 400
    assert answer["success"] is False and message in answer["error"]
    assert await store.sessions.count_documents({}) == 0


async def test_oversized_create_request_is_413_and_nothing_stored(
    api: Client, store: Store
) -> None:
    body = {"accountNumber": ACCOUNT, "amount": 10_000, "padding": "x" * 20_000}
    status, answer = await create(api, body)
    assert status == 413 and "exceeds" in answer["error"]
    assert await store.sessions.count_documents({}) == 0


async def test_payos_down_is_502_and_nothing_counted(api: Client, sim: Sim, store: Store) -> None:
    await sim.faults("down")
    status, body = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    assert status == 502 and body["payosCode"] == "503" and "PayOS" in body["error"]
    assert await store.sessions.count_documents({}) == 0
    _, check = await get_json(api, f"/api/webhooks/check-session-limit?accountNumber={ACCOUNT}")
    assert check["pendingCount"] == 0


async def test_payos_slow_is_504_and_nothing_counted(api: Client, sim: Sim, store: Store) -> None:
    await sim.faults("slow", delay=1.5)  # the test's PAYOS_TIMEOUT_SECONDS is 0.5
    status, body = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    assert status == 504 and "did not answer" in body["error"]
    assert await store.sessions.count_documents({}) == 0


async def test_payos_error_code_is_502_and_nothing_counted(
    api: Client, sim: Sim, store: Store
) -> None:
    await sim.faults("error")
    status, body = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    assert status == 502 and body["payosCode"] == "20" and "refused" in body["error"]
    assert await store.sessions.count_documents({}) == 0


async def test_a_uuid_whose_creation_failed_at_payos_can_be_used_again(
    api: Client, sim: Sim
) -> None:
    # A failed creation gives its uuid back: retrying the same request may succeed.
    uuid = new_uuid()
    body = {"accountNumber": ACCOUNT, "amount": 10_000, "uuid": uuid}
    await sim.faults("error")
    assert (await create(api, body))[0] == 502
    await sim.faults("none")
    status, created = await create(api, body)
    assert (status, created["uuid"]) == (201, uuid)


async def test_failed_payos_calls_never_fill_the_limit(api: Client, sim: Sim) -> None:
    await sim.faults("error")
    for _ in range(6):
        assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 502
    await sim.faults("none")
    for _ in range(5):
        assert (await create(api, {"accountNumber": ACCOUNT, "amount": 10_000}))[0] == 201


# --- a creation interrupted after its reservation -------------------------------------------


@pytest.fixture
def patient_settings(api_settings: Settings) -> Settings:
    """PayOS and MongoDB may take 5 s: long enough for a late answer to be interrupted by
    something else first (PyMongo gives up on a silent server after its timeout)."""
    return dataclasses.replace(api_settings, payos_timeout_seconds=5, mongodb_timeout_ms=5000)


@pytest.fixture
async def patient_api(
    aiohttp_client: Callable[..., Awaitable[Client]], patient_settings: Settings
) -> Client:
    return await _ready(await aiohttp_client(create_app(patient_settings)))


@pytest.fixture
async def payos(api_settings: Settings) -> AsyncIterator[AsyncPayOS]:
    """The payos SDK pointed at the simulator, to look at its links as PayOS knows them."""
    client = payos_client(api_settings)
    yield client
    await client.aclose()


async def start_create(
    client: Client, store: Store, payos: AsyncPayOS, uuid: str
) -> tuple[asyncio.Task[SessionView], int]:
    """Start creating a session for `uuid`; return once PayOS holds its link (and its code)."""
    request = CreateRequest(ACCOUNT, 10_000, "NAPTIEN", uuid)
    task = asyncio.create_task(client.app[SESSIONS].create(request))
    async with asyncio.timeout(5):
        while (doc := await store.sessions.find_one({"uuid": uuid})) is None:
            await asyncio.sleep(0.01)
        while await link_status(payos, doc["orderCode"]) is None:
            await asyncio.sleep(0.01)
    return task, int(doc["orderCode"])


async def eventual_link_status(
    payos: AsyncPayOS, order_code: int, expected: str, within: float = 3.0
) -> str | None:
    """The link's status once it is `expected`, or whatever it is after `within` seconds
    (the rollback cancels the link in the background)."""
    deadline = time.monotonic() + within
    while (status := await link_status(payos, order_code)) != expected:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    return status


async def link_status(payos: AsyncPayOS, order_code: int) -> str | None:
    """The link's status at PayOS, None if PayOS has no link for this order."""
    try:
        link = await payos.payment_requests.get(order_code)
    except APIError:
        return None
    status: str = link.status
    return status


async def test_a_create_cancelled_while_payos_answers_late_counts_nothing_and_cancels_the_link(
    patient_api: Client, sim: Sim, store: Store, payos: AsyncPayOS
) -> None:
    await sim.faults("late", delay=3)
    task, order_code = await start_create(patient_api, store, payos, new_uuid())
    task.cancel()  # as shutdown cancels a handler
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.sessions.count_documents({}) == 0
    assert await eventual_link_status(payos, order_code, "CANCELLED") == "CANCELLED"


async def test_a_create_cancelled_while_storing_its_link_counts_nothing_and_cancels_the_link(
    patient_api: Client, sim: Sim, store: Store, payos: AsyncPayOS, servers: Backends
) -> None:
    if servers.mongo is None:
        pytest.skip("MongoDB is external; the suite cannot pause it")
    await sim.faults("late", delay=1)
    uuid = new_uuid()
    task, order_code = await start_create(patient_api, store, payos, uuid)
    with paused(servers.mongo):
        # PayOS answers within the second; storing its link then waits on MongoDB.
        await asyncio.sleep(1.5)
        assert not task.done()
        task.cancel()
        await asyncio.sleep(0.1)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.sessions.count_documents({}) == 0
    _, check = await get_json(
        patient_api, f"/api/webhooks/check-session-limit?accountNumber={ACCOUNT}"
    )
    assert check["pendingCount"] == 0
    assert await eventual_link_status(payos, order_code, "CANCELLED") == "CANCELLED"


async def test_a_rollback_outlives_a_second_cancellation_and_shutdown_waits_for_it(
    patient_api: Client, sim: Sim, store: Store, payos: AsyncPayOS, servers: Backends
) -> None:
    if servers.mongo is None:
        pytest.skip("MongoDB is external; the suite cannot pause it")
    await sim.faults("late", delay=3)
    task, order_code = await start_create(patient_api, store, payos, new_uuid())
    with paused(servers.mongo):
        task.cancel()  # the rollback starts, and waits on MongoDB
        await asyncio.sleep(0.2)
        task.cancel()  # shutdown's second word: the handler stops waiting for it
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(1):
                await task
    await patient_api.close()  # the app's cleanup, before its clients close
    assert await store.sessions.count_documents({}) == 0
    assert await link_status(payos, order_code) == "CANCELLED"  # done by then, not later


async def test_payos_answering_after_the_timeout_counts_nothing_and_cancels_the_link(
    api: Client, sim: Sim, store: Store, payos: AsyncPayOS
) -> None:
    await sim.faults("late", delay=1.5)  # the test's PAYOS_TIMEOUT_SECONDS is 0.5
    status, body = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    assert status == 504, body
    assert await store.sessions.count_documents({}) == 0
    # The one order code issued so far: the counter's value.
    counter = await store.db["counters"].find_one({"_id": "orderCode"})
    assert counter is not None
    assert await eventual_link_status(payos, int(counter["seq"]), "CANCELLED") == "CANCELLED"


# --- status reads ---------------------------------------------------------------------------


async def test_status_of_a_created_session_is_a_cache_hit(api: Client) -> None:
    _, created = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    status, body = await get_json(api, f"/api/webhooks?uuid={created['uuid']}")
    assert status == 200
    assert body["success"] is True
    assert (body["uuid"], body["orderCode"], body["status"], body["amount"]) == (
        created["uuid"],
        created["orderCode"],
        "pending",
        10_000,
    )
    assert db_queries(api) == 0


async def test_status_miss_reads_mongodb_once_and_refills_the_cache(
    api: Client, store: Store
) -> None:
    session = await add_session(store, amount=12_000)
    for _ in range(3):
        status, body = await get_json(api, f"/api/webhooks?uuid={session['uuid']}")
        assert (status, body["status"], body["amount"]) == (200, "pending", 12_000)
    assert db_queries(api) == 1
    cached = await api.app[CACHE].get(session["uuid"])
    assert cached is not None and cached.order_code == session["orderCode"]


async def test_cache_hit_answers_the_same_json_as_a_miss(api: Client, store: Store) -> None:
    session = await add_session(store, amount=15_000)
    miss = await (await api.get(f"/api/webhooks?uuid={session['uuid']}")).json()
    resp = await api.get(f"/api/webhooks?uuid={session['uuid']}")
    assert resp.content_type == "application/json"
    assert await resp.json() == miss
    assert db_queries(api) == 1


async def test_fifty_concurrent_misses_cost_one_mongodb_query(api: Client, store: Store) -> None:
    session = await add_session(store)
    results = await asyncio.gather(
        *(get_json(api, f"/api/webhooks?uuid={session['uuid']}") for _ in range(50))
    )
    assert all(status == 200 and body["uuid"] == session["uuid"] for status, body in results)
    assert db_queries(api) == 1


async def test_unknown_uuid_is_404_and_cached_as_unknown(api: Client) -> None:
    uuid = new_uuid()
    for _ in range(3):
        status, body = await get_json(api, f"/api/webhooks?uuid={uuid}")
        assert status == 404 and body["success"] is False
    assert db_queries(api) == 1
    assert await api.app[CACHE].is_unknown(uuid)


async def test_malformed_uuid_status_is_400(api: Client) -> None:
    status, body = await get_json(api, "/api/webhooks?uuid=../../etc")
    assert status == 400 and "uuid" in body["error"]
    assert db_queries(api) == 0


async def test_status_of_a_paid_session_is_done(api: Client, sim: Sim) -> None:
    _, created = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    await sim.pay(created["orderCode"])
    status, body = await get_json(api, f"/api/webhooks?uuid={created['uuid']}")
    assert (status, body["status"], body["amountPaid"]) == (200, "done", 10_000)


# --- check-session-limit --------------------------------------------------------------------


async def test_check_by_uuid_reports_existence_and_status(api: Client) -> None:
    _, created = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    status, body = await get_json(api, f"/api/webhooks/check-session-limit?uuid={created['uuid']}")
    assert status == 200
    assert (body["success"], body["exists"], body["status"]) == (True, True, "pending")
    assert body["message"]
    _, missing = await get_json(api, f"/api/webhooks/check-session-limit?uuid={new_uuid()}")
    assert (missing["exists"], missing["status"]) == (False, None)


async def test_check_by_account_reports_the_count_and_whether_one_more_fits(
    api: Client, store: Store
) -> None:
    for _ in range(4):
        await add_session(store, account=ACCOUNT)
    path = f"/api/webhooks/check-session-limit?accountNumber={ACCOUNT}"
    _, body = await get_json(api, path)
    assert (body["success"], body["canCreate"], body["pendingCount"], body["maxAllowed"]) == (
        True,
        True,
        4,
        5,
    )
    await add_session(store, account=ACCOUNT)
    _, full = await get_json(api, path)
    assert (full["canCreate"], full["pendingCount"]) == (False, 5) and full["message"]


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("", id="neither"),
        pytest.param(f"?uuid={new_uuid()}&accountNumber={ACCOUNT}", id="both"),
        pytest.param("?uuid=nope", id="bad-uuid"),
        pytest.param("?accountNumber=a%20b", id="bad-account"),
        pytest.param("?accountNumber=" + "1" * 65, id="long-account"),
    ],
)
async def test_check_with_a_bad_query_is_400(api: Client, query: str) -> None:
    status, body = await get_json(api, f"/api/webhooks/check-session-limit{query}")
    assert status == 400 and body["success"] is False


# --- list -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="none"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong"),
        pytest.param({"Authorization": "test-admin-token"}, id="no-scheme"),
        pytest.param(CRON, id="cron-secret"),
    ],
)
async def test_list_without_the_admin_token_is_401(api: Client, headers: dict[str, str]) -> None:
    resp = await api.get("/api/webhooks?page=1&limit=10", headers=headers)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await resp.json())["success"] is False


async def test_list_with_the_admin_token_pages_newest_first(api: Client, store: Store) -> None:
    made = []
    for i in range(5):
        made.append(await add_session(store, createdAt=utcnow() + timedelta(seconds=i)))
    status, first = await get_json(api, "/api/webhooks?page=1&limit=2", headers=ADMIN)
    assert status == 200
    assert (first["total"], first["pages"], first["page"], first["limit"]) == (5, 3, 1, 2)
    assert [s["uuid"] for s in first["items"]] == [made[4]["uuid"], made[3]["uuid"]]
    _, last = await get_json(api, "/api/webhooks?page=3&limit=2", headers=ADMIN)
    assert [s["uuid"] for s in last["items"]] == [made[0]["uuid"]]
    assert last["items"][0]["createdAt"].endswith("Z")


@pytest.mark.parametrize("query", ["?limit=101", "?limit=0", "?page=0", "?page=x"])
async def test_list_with_out_of_range_paging_is_400(api: Client, query: str) -> None:
    status, _ = await get_json(api, f"/api/webhooks{query}", headers=ADMIN)
    assert status == 400


# --- cleanup --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="none"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong"),
        pytest.param(ADMIN, id="admin-token"),
    ],
)
async def test_cleanup_without_the_cron_secret_is_401_and_changes_nothing(
    api: Client, store: Store, method: str, headers: dict[str, str]
) -> None:
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    resp = await api.request(method, "/api/webhooks/cleanup", headers=headers)
    assert resp.status == 401
    stored = await store.sessions.find_one({"uuid": stale["uuid"]})
    assert stored is not None and stored["status"] == "pending"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_cleanup_with_the_cron_secret_expires_stale_sessions(
    api: Client, store: Store, method: str
) -> None:
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    fresh = await add_session(store)
    status, body = (
        await get_json(api, "/api/webhooks/cleanup", headers=CRON)
        if method == "GET"
        else (await _post_json(api, "/api/webhooks/cleanup", headers=CRON))
    )
    assert status == 200 and (body["expired"], body["published"]) == (1, 1)
    stored = await store.sessions.find_one({"uuid": stale["uuid"]})
    assert stored is not None and (stored["status"], stored["version"]) == ("expired", 2)
    kept = await store.sessions.find_one({"uuid": fresh["uuid"]})
    assert kept is not None and kept["status"] == "pending"


async def _post_json(client: Client, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    resp = await client.post(path, **kw)
    return resp.status, await resp.json()


async def test_cleanup_publishes_expired_to_a_waiting_subscriber(
    api: Client, store: Store, settings: Settings
) -> None:
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    async with subscribed(settings.redis_url, stale["uuid"]) as sub:
        assert (await api.post("/api/webhooks/cleanup", headers=CRON)).status == 200
        [event] = await sub.wait_for(1)
    assert (event.uuid, event.status, event.version) == (stale["uuid"], StreamStatus.EXPIRED, 2)
    status, body = await get_json(api, f"/api/webhooks?uuid={stale['uuid']}")
    assert (status, body["status"]) == (200, "expired")


async def test_cleanup_leaves_no_publish_mark_once_redis_took_expired(
    api: Client, store: Store
) -> None:
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    assert (await api.post("/api/webhooks/cleanup", headers=CRON)).status == 200
    stored = await store.sessions.find_one({"uuid": stale["uuid"]})
    assert stored is not None and stored["status"] == "expired"
    assert "publishPending" not in stored


async def test_expired_that_redis_missed_during_cleanup_is_published_by_the_ingest_sweep(
    aiohttp_client: Callable[..., Awaitable[Client]],
    settings: Settings,
    store: Store,
    servers: Backends,
) -> None:
    # No PayOS simulator (and so no ingest) here: the ingest below starts only once the
    # subscriber listens, and its start-up sweep is the one that must publish.
    api = await _ready(
        await aiohttp_client(
            create_app(dataclasses.replace(settings, cron_secret="test-cron-secret"))
        )
    )
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    servers.redis.stop()
    try:
        status, body = await _post_json(api, "/api/webhooks/cleanup", headers=CRON)
        assert status == 200 and (body["expired"], body["publishFailed"]) == (1, 1)
    finally:
        servers.redis.start()
    async with subscribed(settings.redis_url, stale["uuid"]) as sub:
        await _ready(await aiohttp_client(create_ingest(settings)))
        [event] = await sub.wait_for(1, timeout=10)
    assert (event.uuid, event.status, event.version) == (stale["uuid"], StreamStatus.EXPIRED, 2)
    async with asyncio.timeout(5):
        while "publishPending" in (await store.sessions.find_one({"uuid": stale["uuid"]}) or {}):
            await asyncio.sleep(0.05)


async def test_cleanup_twice_in_a_row_changes_nothing_the_second_time(
    api: Client, store: Store, settings: Settings
) -> None:
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    _, first = await _post_json(api, "/api/webhooks/cleanup", headers=CRON)
    async with subscribed(settings.redis_url, stale["uuid"]) as sub:
        _, second = await _post_json(api, "/api/webhooks/cleanup", headers=CRON)
        assert await sub.settle() == []
    assert first["expired"] == 1
    assert (second["expired"], second["sessionsDeleted"], second["webhooksDeleted"]) == (0, 0, 0)
    stored = await store.sessions.find_one({"uuid": stale["uuid"]})
    assert stored is not None and stored["version"] == 2


async def test_cleanup_twice_at_once_expires_and_publishes_each_session_once(
    api: Client, store: Store, settings: Settings
) -> None:
    stale = [await add_session(store, createdAt=utcnow() - timedelta(hours=25)) for _ in range(20)]
    async with subscribed(settings.redis_url, stale[0]["uuid"]) as sub:
        runs = await asyncio.gather(
            *(_post_json(api, "/api/webhooks/cleanup", headers=CRON) for _ in range(2))
        )
        await sub.wait_for(1)
        assert len(await sub.settle()) == 1
    assert [status for status, _ in runs] == [200, 200]
    assert sum(body["expired"] for _, body in runs) == 20
    assert sum(body["published"] for _, body in runs) == 20
    versions = [d["version"] async for d in store.sessions.find({})]
    assert versions == [2] * 20


async def test_cleanup_deletes_expired_records(api: Client, store: Store) -> None:
    past = utcnow() - timedelta(minutes=1)
    await store.webhooks.insert_one({"orderCode": 1, "reference": "FT1", "expiresAt": past})
    await add_session(store, status="completed", expiresAt=past - timedelta(days=1), purgeAt=past)
    live = await store.webhooks.insert_one(
        {"orderCode": 2, "reference": "FT2", "expiresAt": utcnow() + timedelta(hours=1)}
    )
    _, body = await _post_json(api, "/api/webhooks/cleanup", headers=CRON)
    assert body["success"] is True
    # Deleted by this run or already by the TTL monitor (the stand-in's is eager).
    assert await store.webhooks.count_documents({}) == 1
    assert await store.webhooks.find_one({"_id": live.inserted_id}) is not None
    assert await store.sessions.count_documents({}) == 0


async def test_cleanup_command_exits_zero_and_prints_its_counts(
    api_settings: Settings, store: Store
) -> None:
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "session_api.cleanup",
        env=api_settings.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert (result["success"], result["expired"]) == (True, 1)
    stored = await store.sessions.find_one({"uuid": stale["uuid"]})
    assert stored is not None and stored["status"] == "expired"


async def test_cleanup_command_pushes_its_counts_to_the_pushgateway(
    api_settings: Settings, store: Store
) -> None:
    """Issue 15: the CronJob's counts reach Prometheus (through a Pushgateway), not only the
    HTTP path's. A stand-in Pushgateway records what is pushed."""
    await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    [(method, path, body)] = await run_cleanup_job(api_settings)
    assert (method, path) == ("POST", "/metrics/job/session-cleanup")
    assert "paypush_cleanup_job_expired_sessions 1.0" in body
    assert 'paypush_cleanup_job_deleted_records{collection="sessions"}' in body
    assert "paypush_cleanup_job_last_success_timestamp_seconds" in body


# --- stats and ops --------------------------------------------------------------------------


async def test_stats_count_cached_orders_subscriptions_and_pending_sessions(
    api: Client, store: Store, settings: Settings
) -> None:
    _, a = await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    await create(api, {"accountNumber": ACCOUNT, "amount": 20_000})
    await add_session(store, status="completed")
    async with subscribed(settings.redis_url, a["uuid"]), subscribed(settings.redis_url, a["uuid"]):
        status, body = await get_json(api, "/api/stats")
    assert status == 200
    assert (body["cachedOrders"], body["activeSubscriptions"], body["pendingSessions"]) == (
        2,
        2,
        2,
    )


def redis_calls(redis_url: str, *commands: str) -> int:
    """Calls of these commands the real redis-server has served so far (INFO commandstats)."""
    stats = redis.Redis.from_url(redis_url).info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)


async def test_concurrent_stats_calls_cost_one_counting_round(
    api: Client, settings: Settings
) -> None:
    for _ in range(3):
        await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    scans = redis_calls(settings.redis_url, "scan")
    channels = redis_calls(settings.redis_url, "pubsub|channels")
    answers = await asyncio.gather(*(get_json(api, "/api/stats") for _ in range(50)))
    assert {(status, body["cachedOrders"]) for status, body in answers} == {(200, 3)}
    # Three keys fit one SCAN reply: one counting round is one SCAN and one PUBSUB CHANNELS.
    assert redis_calls(settings.redis_url, "scan") - scans == 1
    assert redis_calls(settings.redis_url, "pubsub|channels") - channels == 1


async def test_stats_lag_the_truth_by_at_most_a_second(
    api: Client, store: Store, settings: Settings
) -> None:
    session = await add_session(store)
    assert (await get_json(api, "/api/stats"))[1]["cachedOrders"] == 0
    await api.app[CACHE].put(StatusEvent.from_session(session))
    scans = redis_calls(settings.redis_url, "scan")
    # Within the second: the snapshot, without asking Redis again.
    assert (await get_json(api, "/api/stats"))[1]["cachedOrders"] == 0
    assert redis_calls(settings.redis_url, "scan") == scans
    await asyncio.sleep(1.1)
    assert (await get_json(api, "/api/stats"))[1]["cachedOrders"] == 1


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="anonymous"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param(CRON, id="cron-secret"),
    ],
)
async def test_public_stats_answer_counts_only_even_when_redis_is_down(
    api: Client, servers: Backends, headers: dict[str, str]
) -> None:
    servers.redis.stop()
    try:
        status, body = await get_json(api, "/api/stats", headers=headers)
    finally:
        servers.redis.start()
    assert status == 200
    # Which backend failed, and how (its address), is for admins.
    assert body == {
        "success": True,
        "cachedOrders": None,
        "activeSubscriptions": None,
        "pendingSessions": 0,
    }


async def test_admin_stats_also_tell_when_they_were_counted_and_what_failed(
    api: Client, servers: Backends
) -> None:
    servers.redis.stop()
    try:
        before = utcnow()
        status, body = await get_json(api, "/api/stats", headers=ADMIN)
    finally:
        servers.redis.start()
    assert status == 200
    assert (body["cachedOrders"], body["activeSubscriptions"], body["pendingSessions"]) == (
        None,
        None,
        0,
    )
    assert set(body["errors"]) == {"redis"} and body["errors"]["redis"]
    assert datetime.fromisoformat(body["takenAt"]) >= before - timedelta(seconds=1)


async def test_health_readiness_and_metrics(api: Client) -> None:
    assert (await api.get("/healthz")).status == 200
    ready = await api.get("/readyz")
    assert (await ready.json())["checks"] == {"redis": "ok", "mongodb": "ok"}
    assert (await ready.json())["required"] == ["mongodb"]
    await create(api, {"accountNumber": ACCOUNT, "amount": 10_000})
    await create(api, {"accountNumber": ACCOUNT, "amount": 1})
    text = await (await api.get("/metrics")).text()
    assert 'paypush_session_requests_total{outcome="created"} 1.0' in text
    assert 'paypush_session_requests_total{outcome="invalid"} 1.0' in text
    assert "paypush_status_db_queries_total 0.0" in text


async def test_cors_allows_the_site_origin_only(api: Client, api_settings: Settings) -> None:
    origin = api_settings.cors_origins[0]
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    resp = await api.options("/api/sessions", headers=preflight)
    assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == origin
    evil = await api.options(
        "/api/sessions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert evil.status == 403
