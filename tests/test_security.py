"""Security review, as tests: signatures, tokens, uuids, enumeration, limits, logs, headers, CORS.

What other suites already prove is referenced in SECURITY.md rather than repeated here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import secrets
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

import shared.signing
from devstack.payos_simulator import create_app as create_simulator
from devstack.system import wait_ready
from session_api import create_app as create_api
from shared import keys
from shared.model import utcnow
from shared.mongo import Store
from shared.settings import SECRETS, SERVICE_SECRETS, Settings
from stream_gateway import create_app as create_gateway
from tests.helpers import add_session, signed_webhook, subscribed
from webhook_ingest import create_app as create_ingest

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]
SITE = "http://127.0.0.1:8083"
FOREIGN = "https://evil.example"
FULL_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class Secrets:
    checksum_key: str
    api_key: str
    admin_token: str
    cron_secret: str

    def all(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@pytest.fixture
def secret_values() -> Secrets:
    return Secrets(*(f"{name}-{secrets.token_hex(16)}" for name in ("ck", "api", "adm", "cron")))


@pytest.fixture
def sec_settings(settings: Settings, secret_values: Secrets) -> Settings:
    return dataclasses.replace(
        settings,
        payos_checksum_key=secret_values.checksum_key,
        payos_api_key=secret_values.api_key,
        admin_token=secret_values.admin_token,
        cron_secret=secret_values.cron_secret,
        cors_origins=(SITE,),
        session_rate_limit_per_minute=1000,
        payos_timeout_seconds=2.0,
    )


async def ready(client: Client) -> Client:
    await wait_ready(str(client.make_url("")), 5)
    return client


@pytest.fixture
async def ingest(aiohttp_client: ClientFactory, sec_settings: Settings, store: Store) -> Client:
    return await ready(await aiohttp_client(create_ingest(sec_settings)))


@pytest.fixture
async def sim_url(sec_settings: Settings, ingest: Client) -> AsyncIterator[str]:
    """The PayOS simulator, delivering to the in-process ingest."""
    server = TestServer(
        create_simulator(
            dataclasses.replace(
                sec_settings, payos_webhook_url=str(ingest.make_url("/api/webhooks"))
            ),
            retry_delays=(0.05, 0.1),
        )
    )
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
def api_settings(sec_settings: Settings, sim_url: str) -> Settings:
    return dataclasses.replace(sec_settings, payos_base_url=sim_url)


@pytest.fixture
async def api(aiohttp_client: ClientFactory, api_settings: Settings) -> Client:
    return await ready(await aiohttp_client(create_api(api_settings)))


@pytest.fixture
async def gateway(aiohttp_client: ClientFactory, sec_settings: Settings, store: Store) -> Client:
    return await ready(await aiohttp_client(create_gateway(sec_settings)))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create(api: Client, account: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    resp = await api.post(
        "/api/sessions", json={"accountNumber": account, "amount": 20_000, **extra}
    )
    return resp.status, await resp.json()


async def post_webhook(ingest: Client, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await ingest.post("/api/webhooks", json=body)
    return resp.status, await resp.json()


async def snapshot(store: Store) -> tuple[list[dict[str, Any]], int]:
    sessions = [d async for d in store.sessions.find({}, {"_id": 0})]
    return sessions, await store.webhooks.count_documents({})


# --- webhook signatures -----------------------------------------------------------------------


class CompareSpy:
    """Stands in for hmac.compare_digest: records its arguments and answers `verdict`."""

    def __init__(self, verdict: bool) -> None:
        self.verdict = verdict
        self.calls: list[tuple[bytes, bytes]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return self.verdict


async def test_compare_digest_alone_decides_a_webhook_signature(
    ingest: Client, store: Store, secret_values: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await add_session(store, amount=20_000)
    genuine = signed_webhook(session["orderCode"], 20_000, key=secret_values.checksum_key)

    refuse = CompareSpy(False)
    monkeypatch.setattr("shared.signing.hmac.compare_digest", refuse)
    status, _ = await post_webhook(ingest, genuine)
    assert status == 401, "a genuine signature is refused when compare_digest says no"
    assert refuse.calls and refuse.calls[0][1] == genuine["signature"].encode()
    assert await store.webhooks.count_documents({}) == 0

    forged = {**genuine, "signature": "0" * 64}
    accept = CompareSpy(True)
    monkeypatch.setattr("shared.signing.hmac.compare_digest", accept)
    status, body = await post_webhook(ingest, forged)
    assert status == 200 and body["outcome"] == "completed", "the spy's yes is what let it in"
    assert accept.calls == [(genuine["signature"].encode(), b"0" * 64)]


async def test_replayed_webhook_with_a_changed_amount_is_refused_and_changes_nothing(
    ingest: Client, store: Store, secret_values: Secrets, settings: Settings
) -> None:
    session = await add_session(store, amount=20_000)
    genuine = signed_webhook(session["orderCode"], 5_000, key=secret_values.checksum_key)
    assert (await post_webhook(ingest, genuine))[0] == 200
    before = await snapshot(store)
    async with subscribed(settings.redis_url, session["uuid"]) as sub:
        for amount in (20_000, 15_000, 5_001, 0):
            replay = json.loads(json.dumps(genuine))
            replay["data"]["amount"] = amount
            status, body = await post_webhook(ingest, replay)
            assert status == 401 and body["success"] is False
        # The same reference with a fresh signature over a new amount is a forgery too:
        replay = json.loads(json.dumps(genuine))
        replay["data"]["amount"] = 20_000
        replay["signature"] = shared.signing.sign_data(replay["data"], "not-the-key")
        assert (await post_webhook(ingest, replay))[0] == 401
        assert await sub.settle() == []
    assert await snapshot(store) == before
    assert before[0][0]["amountPaid"] == 5_000 and before[0][0]["status"] == "pending"


# --- admin and cleanup tokens -----------------------------------------------------------------

PROTECTED = [
    ("GET", "/api/webhooks?page=1", "admin_token"),
    ("GET", "/api/webhooks/cleanup", "cron_secret"),
    ("POST", "/api/webhooks/cleanup", "cron_secret"),
]
OTHER = {"admin_token": "cron_secret", "cron_secret": "admin_token"}


def bad_credentials(right: str, other: str) -> Iterator[tuple[str, dict[str, str], str]]:
    yield "missing", {}, ""
    yield "wrong", bearer("x" + right), ""
    yield "prefix of the right one", bearer(right[:-1]), ""
    yield "empty bearer", {"Authorization": "Bearer "}, ""
    yield "basic scheme", {"Authorization": f"Basic {right}"}, ""
    yield "token scheme", {"Authorization": f"Token {right}"}, ""
    yield "no scheme", {"Authorization": right}, ""
    yield "the other service's token", bearer(other), ""
    yield "in the query string", {}, f"token={right}&access_token={right}"
    yield "in a cookie", {"Cookie": f"token={right}"}, ""


@pytest.mark.parametrize(("method", "path", "secret"), PROTECTED)
async def test_protected_endpoints_refuse_every_wrong_credential(
    api: Client, store: Store, secret_values: Secrets, method: str, path: str, secret: str
) -> None:
    right, other = getattr(secret_values, secret), getattr(secret_values, OTHER[secret])
    # Stale by age (not by expiresAt, which the TTL monitor may act on first).
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    for name, headers, query in bad_credentials(right, other):
        url = f"{path}{'&' if '?' in path else '?'}{query}" if query else path
        resp = await api.request(method, url, headers=headers)
        assert resp.status == 401, name
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        body = await resp.json()
        assert body["success"] is False and right not in json.dumps(body), name
    stored = await store.sessions.find_one({"uuid": stale["uuid"]})
    assert stored is not None and stored["status"] == "pending", "a refused cleanup ran"
    resp = await api.request(method, path, headers=bearer(right))
    await assert_it_ran(resp, path, store, stale)


async def assert_it_ran(
    resp: aiohttp.ClientResponse, path: str, store: Store, stale: dict[str, Any]
) -> None:
    """The protected endpoint did its work for an accepted credential, not only answer 200:
    the listing holds `stale`, the cleanup expired it."""
    assert resp.status == 200
    body = await resp.json()
    assert body["success"] is True
    stored = await store.sessions.find_one({"uuid": stale["uuid"]})
    assert stored is not None
    if path.startswith("/api/webhooks/cleanup"):
        assert (body["expired"], body["published"]) == (1, 1)
        assert (stored["status"], stored["version"]) == ("expired", 2)
    else:
        assert body["total"] == 1 and [s["uuid"] for s in body["items"]] == [stale["uuid"]]
        assert stored["status"] == "pending"


@pytest.mark.parametrize(("method", "path", "secret"), PROTECTED)
async def test_compare_digest_alone_decides_a_token(
    api: Client,
    store: Store,
    secret_values: Secrets,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    secret: str,
) -> None:
    right = getattr(secret_values, secret)
    stale = await add_session(store, createdAt=utcnow() - timedelta(hours=25))
    spy = CompareSpy(False)
    monkeypatch.setattr("session_api.views.hmac.compare_digest", spy)
    resp = await api.request(method, path, headers=bearer(right))
    assert resp.status == 401
    assert spy.calls == [(right.encode(), right.encode())]
    stored = await store.sessions.find_one({"uuid": stale["uuid"]})
    assert stored is not None and stored["status"] == "pending", "a refused cleanup ran"
    spy.verdict = True
    resp = await api.request(method, path, headers=bearer("anything"))
    await assert_it_ran(resp, path, store, stale)


# --- uuids and enumeration --------------------------------------------------------------------

NOT_UUID4 = [
    str(uuidlib.uuid1()),
    str(uuidlib.uuid3(uuidlib.NAMESPACE_DNS, "x")),
    str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, "x")),
    str(uuidlib.UUID(int=0)),
    str(uuidlib.uuid4()).upper(),
    "{" + str(uuidlib.uuid4()) + "}",
    "urn:uuid:" + str(uuidlib.uuid4()),
    uuidlib.uuid4().hex,
    str(uuidlib.uuid4()) + "\n",
    str(uuidlib.uuid4())[:-1] + "g",
    "123456",
    "",
]


@pytest.mark.parametrize("bad", NOT_UUID4)
async def test_only_a_canonical_uuid4_is_accepted_anywhere(
    api: Client, gateway: Client, bad: str
) -> None:
    for client, method, path, kw in (
        (api, "GET", "/api/webhooks", {"params": {"uuid": bad}}),
        (api, "GET", "/api/webhooks/check-session-limit", {"params": {"uuid": bad}}),
        (
            api,
            "POST",
            "/api/sessions",
            {"json": {"accountNumber": "0123456789", "amount": 20_000, "uuid": bad}},
        ),
        (gateway, "GET", "/api/webhooks/stream", {"params": {"uuid": bad}}),
    ):
        resp = await client.request(method, path, **kw)
        assert resp.status == 400, (path, bad)
        assert (await resp.json())["success"] is False
    if bad and "/" not in bad and "\n" not in bad:
        resp = await api.get(f"/api/sessions/{bad}/qr.svg")
        assert resp.status in (400, 404)  # 404: not even the route's shape (braces)


async def test_server_made_uuids_are_random_uuid4s(api: Client) -> None:
    made = [(await create(api, f"01234567{i:02d}"))[1]["uuid"] for i in range(5)]
    assert len(set(made)) == 5
    assert all(uuidlib.UUID(u).version == 4 and str(uuidlib.UUID(u)) == u for u in made)


async def test_no_public_endpoint_answers_by_order_code(
    api: Client, gateway: Client, store: Store
) -> None:
    """Real sessions of one account; every public endpoint, asked with their orderCodes in
    every parameter, gives back none of their data (uuid, account, link, QR)."""
    victim = "0999888777"
    sessions = [(await create(api, victim))[1] for _ in range(2)]
    assert all("uuid" in s for s in sessions)
    await store.sessions.update_one(
        {"uuid": sessions[1]["uuid"]}, {"$set": {"status": "completed"}}
    )
    secrets_of = [
        v
        for s in sessions
        for v in (s["uuid"], s["checkoutUrl"], s["qrCode"], s["checkoutUrl"].rsplit("/", 1)[-1])
    ] + [victim]
    answered = 0
    for session in sessions:
        code = str(session["orderCode"])
        probes: list[tuple[Client, str, dict[str, str]]] = [
            (api, "/api/webhooks", {"uuid": code}),
            (api, "/api/webhooks", {"orderCode": code}),
            (api, "/api/webhooks", {"orderCode": code, "page": "1"}),
            (api, "/api/webhooks/check-session-limit", {"uuid": code}),
            (api, "/api/webhooks/check-session-limit", {"orderCode": code}),
            (api, "/api/webhooks/check-session-limit", {"accountNumber": code}),
            (api, f"/api/sessions/{code}/qr.svg", {}),
            (api, f"/api/sessions/{code}", {}),
            (api, f"/api/sessions/{code}/qr.svg", {"orderCode": code}),
            (api, "/api/stats", {"orderCode": code}),
            (api, "/", {"orderCode": code}),
            (gateway, "/api/webhooks/stream", {"uuid": code}),
            (gateway, "/api/webhooks/stream", {"orderCode": code}),
            (gateway, "/api/stats", {"orderCode": code}),
        ]
        for client, path, params in probes:
            resp = await client.get(path, params=params)
            text = await resp.text()
            answered += 1
            leaked = [s for s in secrets_of if s in text]
            assert leaked == [], (path, params, resp.status)
        # Creating with the victim's uuid from another account: refused, nothing told.
        status, body = await create(api, "0111222333", uuid=session["uuid"])
        assert status == 409 and not [s for s in secrets_of if s in json.dumps(body)]
    assert answered == 28
    # The per-account check tells counts, never which sessions.
    resp = await api.get("/api/webhooks/check-session-limit", params={"accountNumber": victim})
    body = await resp.json()
    assert body["pendingCount"] == 1 and not [s for s in secrets_of[:-1] if s in json.dumps(body)]


# --- request size and rate limits -------------------------------------------------------------


async def test_every_public_post_refuses_an_oversized_body_with_413_json(
    api: Client, ingest: Client, store: Store, secret_values: Secrets
) -> None:
    huge = b'{"pad": "' + b"x" * 200_000 + b'"}'
    for client, path, headers in (
        (api, "/api/sessions", {}),
        (api, "/api/webhooks/cleanup", {}),
        (api, "/api/webhooks/cleanup", bearer(secret_values.cron_secret)),
        (ingest, "/api/webhooks", {}),
    ):
        resp = await client.post(
            path, data=huge, headers={"Content-Type": "application/json", **headers}
        )
        assert resp.status == 413, path
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body["success"] is False and "exceeds" in body["error"]
    assert await snapshot(store) == ([], 0)


async def test_a_body_of_exactly_the_limit_is_served_one_byte_more_is_413(
    api: Client, store: Store
) -> None:
    limit = 16 * 1024  # session-api's body limit

    def padded(account: str, size: int) -> bytes:
        raw = json.dumps({"accountNumber": account, "amount": 20_000}).encode()
        return raw[:-1] + b" " * (size - len(raw)) + b"}"

    headers = {"Content-Type": "application/json"}
    exact = await api.post("/api/sessions", data=padded("0556000001", limit), headers=headers)
    assert exact.status == 201, await exact.text()
    over = await api.post("/api/sessions", data=padded("0556000002", limit + 1), headers=headers)
    assert over.status == 413
    assert (await over.json())["error"] == f"body exceeds {limit} bytes"
    assert [s["accountNumber"] for s in (await snapshot(store))[0]] == ["0556000001"]


@pytest.fixture
def limited_settings(api_settings: Settings) -> Settings:
    return dataclasses.replace(api_settings, session_rate_limit_per_minute=3)


async def test_session_creation_is_rate_limited_per_client(
    aiohttp_client: ClientFactory, limited_settings: Settings, store: Store, settings: Settings
) -> None:
    api = await ready(await aiohttp_client(create_api(limited_settings)))
    for i in range(3):
        assert (await create(api, f"05550000{i:02d}"))[0] == 201
    before = await store.sessions.count_documents({})
    # Invalid or not, spoofed header or not: the fourth in the minute is refused, untouched.
    for attempt in (
        {"json": {"accountNumber": "0555000099", "amount": 20_000}},
        {
            "json": {"accountNumber": "0555000099", "amount": 20_000},
            "headers": {"X-Forwarded-For": "198.51.100.1"},
        },
        {"data": b"nope"},
    ):
        resp = await api.post("/api/sessions", **attempt)
        assert resp.status == 429
        retry_after = int(resp.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        body = await resp.json()
        assert body["success"] is False and body["retryAfter"] == retry_after
    assert await store.sessions.count_documents({}) == before
    redis = Redis.from_url(settings.redis_url)
    try:
        ttl = await redis.ttl(keys.session_rate_key("127.0.0.1"))
        assert 0 < ttl <= 60
    finally:
        await redis.aclose()


async def test_retry_after_is_what_is_left_of_the_window(
    aiohttp_client: ClientFactory, limited_settings: Settings, settings: Settings
) -> None:
    api = await ready(await aiohttp_client(create_api(limited_settings)))
    for i in range(3):
        assert (await create(api, f"05580000{i:02d}"))[0] == 201
    redis = Redis.from_url(settings.redis_url)
    try:
        # As if 57.5 s of the minute had passed.
        await redis.pexpire(keys.session_rate_key("127.0.0.1"), 2_500)
        resp = await api.post(
            "/api/sessions", json={"accountNumber": "0558000099", "amount": 20_000}
        )
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
        assert (await resp.json())["retryAfter"] == 3
        assert 0 < await redis.pttl(keys.session_rate_key("127.0.0.1")) <= 2_500
    finally:
        await redis.aclose()


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(
    aiohttp_client: ClientFactory, limited_settings: Settings
) -> None:
    proxied = dataclasses.replace(limited_settings, trusted_proxies=("127.0.0.0/8",))
    api = await ready(await aiohttp_client(create_api(proxied)))

    async def from_client(xff: str, n: int) -> int:
        resp = await api.post(
            "/api/sessions",
            json={"accountNumber": f"07770000{n:02d}", "amount": 20_000},
            headers={"X-Forwarded-For": xff},
        )
        return resp.status

    assert [await from_client("203.0.113.7", i) for i in range(4)] == [201, 201, 201, 429]
    # A client cannot escape by writing its own hops: the proxy appended the real one last.
    assert await from_client("198.51.100.9, 203.0.113.7", 10) == 429
    # Another client behind the same proxy has its own budget.
    assert await from_client("203.0.113.8", 11) == 201


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8,not-an-address"})
    assert Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8, ::1"}).trusted_proxies == (
        "10.0.0.0/8",
        "::1",
    )


# --- logs -------------------------------------------------------------------------------------


async def test_no_secret_nor_full_signature_is_ever_logged(
    api: Client,
    ingest: Client,
    sim_url: str,
    store: Store,
    secret_values: Secrets,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    signatures: list[str] = []
    with structlog.testing.capture_logs() as logs:
        status, session = await create(api, "0444555666")
        assert status == 201
        pay = f"{sim_url}/sim/pay/{session['orderCode']}"
        async with aiohttp.ClientSession() as http, http.post(pay, json={}) as resp:
            assert resp.status == 200
        async with asyncio.timeout(5):
            while (await (await api.get("/api/webhooks", params={"uuid": session["uuid"]})).json())[
                "status"
            ] != "done":
                await asyncio.sleep(0.05)
        forged = signed_webhook(session["orderCode"], 20_000, key="wrong-key")
        signatures.append(forged["signature"])
        assert (await post_webhook(ingest, forged))[0] == 401
        genuine = signed_webhook(session["orderCode"], 1, key=secret_values.checksum_key)
        signatures.append(genuine["signature"])
        assert (await post_webhook(ingest, genuine))[0] == 200
        for headers in (bearer(secret_values.cron_secret), bearer(secret_values.admin_token), {}):
            await api.post("/api/webhooks/cleanup", headers=headers)
        for headers in (bearer(secret_values.admin_token), bearer(secret_values.cron_secret)):
            await api.get("/api/webhooks", params={"page": "1"}, headers=headers)
    text = json.dumps(logs, default=str) + caplog.text
    assert {entry["event"] for entry in logs} >= {
        "request",
        "webhook_rejected",
        "webhook_ingested",
        "cleanup_done",
    }
    for name, value in secret_values.all().items():
        assert value not in text, f"{name} was logged"
    for signature in signatures:
        assert signature not in text
    assert FULL_SIGNATURE.search(text) is None, "a 64-hex value (a full signature) was logged"


# --- headers and CORS -------------------------------------------------------------------------


async def test_every_session_api_response_carries_the_security_headers(api: Client) -> None:
    for path in ("/", "/static/deposit.js", "/api/stats", "/api/webhooks?uuid=nope", "/missing"):
        resp = await api.get(path)
        csp = resp.headers["Content-Security-Policy"]
        directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, path
        assert directives["default-src"] == ["'self'"]
        assert directives["script-src"] == ["'self'"]
        assert directives["frame-ancestors"] == ["'none'"]
        assert directives["base-uri"] == ["'none'"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"


async def test_cors_never_wildcard_never_credentials_foreign_preflight_refused(
    api: Client, gateway: Client, ingest: Client
) -> None:
    for service, client, path in (
        ("api", api, "/api/stats"),
        ("gateway", gateway, "/api/stats"),
        ("ingest", ingest, "/healthz"),
    ):
        await _check_cors(service, client, path)


async def _check_cors(service: str, client: Client, path: str) -> None:
    for origin in (FOREIGN, "null", SITE + ".evil.example", "http://127.0.0.1:8084"):
        resp = await client.get(path, headers={"Origin": origin, "Cookie": "session=x"})
        assert "Access-Control-Allow-Origin" not in resp.headers, origin
        assert "Access-Control-Allow-Credentials" not in resp.headers
        pre = await client.options(
            path,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "Authorization",
            },
        )
        assert pre.status in (403, 405), origin
        assert "Access-Control-Allow-Origin" not in pre.headers
    if service != "ingest":
        ok = await client.options(
            path, headers={"Origin": SITE, "Access-Control-Request-Method": "GET"}
        )
        assert ok.status == 204
        assert ok.headers["Access-Control-Allow-Origin"] == SITE
        assert "Access-Control-Allow-Credentials" not in ok.headers
        resp = await client.get(path, headers={"Origin": SITE})
        assert resp.headers["Access-Control-Allow-Origin"] == SITE != "*"
        assert "Origin" in resp.headers["Vary"]


def test_production_refuses_the_embedded_development_secrets() -> None:
    with pytest.raises(ValueError, match="production needs real secrets") as info:
        Settings.from_env({"APP_ENV": "production"})
    for name in ("PAYOS_CHECKSUM_KEY", "PAYOS_API_KEY", "CRON_SECRET", "ADMIN_TOKEN"):
        assert name in str(info.value)


def test_each_process_requires_and_holds_only_the_secrets_it_uses() -> None:
    """Issue 15: the gateway and the cleanup job hold no secret; the ingest the checksum key
    only; session-api all of them. A used secret left at its development value (production)
    or empty refuses to start."""
    real = {name.upper(): f"real-{name}" for name in SECRETS}
    production = {"APP_ENV": "production"}
    gateway = Settings.from_env({**production, **real}, secrets=SERVICE_SECRETS["stream-gateway"])
    assert all(getattr(gateway, name) == "" for name in SECRETS)
    # Nothing to set for the gateway, even in production.
    assert Settings.from_env(production, secrets=()).is_production
    ingest = Settings.from_env(
        {**production, "PAYOS_CHECKSUM_KEY": "real"}, secrets=SERVICE_SECRETS["webhook-ingest"]
    )
    assert ingest.payos_checksum_key == "real" and ingest.admin_token == ""
    with pytest.raises(ValueError, match="PAYOS_CHECKSUM_KEY"):
        Settings.from_env(production, secrets=SERVICE_SECRETS["webhook-ingest"])
    with pytest.raises(ValueError, match="must not be empty"):
        Settings.from_env({"PAYOS_CHECKSUM_KEY": ""}, secrets=SERVICE_SECRETS["webhook-ingest"])
    api = Settings.from_env({**production, **real}, secrets=SERVICE_SECRETS["session-api"])
    assert all(getattr(api, name) == f"real-{name}" for name in SECRETS)
