"""session-api's request limits on a real redis-server: the fixed window, `0 = unlimited`,
and whose address counts behind trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from redis.asyncio import Redis

from devstack.servers import free_port
from session_api.limits import (
    Decision,
    RateLimiter,
    body_limit_middleware,
    check_rate,
    client_address,
    parse_networks,
)
from shared import keys
from shared.settings import Settings, SettingsError
from shared.web import ascii_int, error_middleware

CLIENT = "203.0.113.7"


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


async def test_a_limit_of_zero_is_unlimited(redis: Redis) -> None:
    limiter = RateLimiter(redis, 0)
    decisions = [await limiter.hit(CLIENT) for _ in range(50)]
    assert all(d.allowed for d in decisions)
    # Not even counted.
    assert not await redis.exists(keys.session_rate_key(CLIENT))


async def test_the_limit_allows_exactly_limit_hits_per_window(redis: Redis) -> None:
    limiter = RateLimiter(redis, 3, window_seconds=60)
    decisions = [await limiter.hit(CLIENT) for _ in range(5)]
    assert [(d.allowed, d.count) for d in decisions] == [
        (True, 1),
        (True, 2),
        (True, 3),
        (False, 4),
        (False, 5),
    ]
    assert 59_000 < await redis.pttl(keys.session_rate_key(CLIENT)) <= 60_000


async def test_the_window_is_fixed_and_retry_after_is_what_is_left_of_it(redis: Redis) -> None:
    limiter = RateLimiter(redis, 2, window_seconds=60)
    assert (await limiter.hit(CLIENT)).allowed and (await limiter.hit(CLIENT)).allowed
    key = keys.session_rate_key(CLIENT)
    # As if 58.5 s of the window had passed.
    await redis.pexpire(key, 1_500)
    refused = await limiter.hit(CLIENT)
    assert (refused.allowed, refused.retry_after) == (False, 2)
    # Further hits neither re-arm the window (it would become a sliding one, never ending for
    # a client that keeps trying) nor report more than what is left of it.
    assert 0 < await redis.pttl(key) <= 1_500
    await redis.pexpire(key, 400)
    assert (await limiter.hit(CLIENT)).retry_after == 1
    assert 0 < await redis.pttl(key) <= 400


async def test_a_counter_left_without_a_ttl_gets_the_window_again(redis: Redis) -> None:
    key = keys.session_rate_key(CLIENT)
    await redis.set(key, 7)  # e.g. a PERSIST by hand, or a crash between INCR and PEXPIRE
    refused = await RateLimiter(redis, 2, window_seconds=60).hit(CLIENT)
    assert (refused.allowed, refused.retry_after) == (False, 60)
    assert 59_000 < await redis.pttl(key) <= 60_000


def _from(peer: str, xff: str | None) -> str:
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    request = make_mocked_request("POST", "/api/sessions", headers=headers).clone(remote=peer)
    return client_address(request, parse_networks(["10.0.0.0/8"]))


def test_x_forwarded_for_counts_only_from_a_trusted_peer() -> None:
    assert _from("10.1.2.3", CLIENT) == CLIENT
    assert _from("198.51.100.1", CLIENT) == "198.51.100.1"
    # Walked from the right: the nearest untrusted hop, whatever the client wrote before it.
    assert _from("10.1.2.3", f"192.0.2.1, {CLIENT}, 10.9.9.9") == CLIENT


@pytest.mark.parametrize("hop", ["not-an-ip", "unknown", "10.0.0.1:443", "_hidden"])
def test_a_hop_that_is_not_an_address_is_never_trusted(hop: str) -> None:
    # If it were, the walk would go on to the hop left of it, which the client wrote.
    assert _from("10.1.2.3", f"192.0.2.66, {hop}") == hop


def test_trusted_proxies_with_host_bits_set_are_refused_clearly() -> None:
    # "10.1.2.3/8" is either a typo for one address or a network written loosely: refuse it
    # with a message that says so, rather than trust 16 million addresses without asking.
    with pytest.raises(SettingsError, match=r"TRUSTED_PROXIES: '10.1.2.3/8' has host bits set"):
        Settings.from_env({"TRUSTED_PROXIES": "10.1.2.3/8"})
    accepted = Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8,10.1.2.3/32,10.1.2.4,::1/128"})
    assert parse_networks(accepted.trusted_proxies) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("10.1.2.3/32"),
        ipaddress.ip_network("10.1.2.4/32"),
        ipaddress.ip_network("::1/128"),
    )


def test_without_trusted_proxies_the_peer_counts_whatever_the_header_says() -> None:
    request = make_mocked_request(
        "POST", "/api/sessions", headers={"X-Forwarded-For": CLIENT}
    ).clone(remote="198.51.100.1")
    assert client_address(request, ()) == "198.51.100.1"


def test_a_request_without_a_peer_address_counts_as_unknown() -> None:
    # A request over a UNIX socket has no peer address (aiohttp's `remote` is None then).
    request = make_mocked_request("POST", "/api/sessions").clone(remote=None)  # type: ignore[arg-type]
    assert client_address(request, parse_networks(["10.0.0.0/8"])) == "unknown"


def test_a_chain_of_trusted_proxies_is_walked_to_its_first_hop() -> None:
    # Every hop is a trusted proxy: the leftmost is the nearest thing to a client there is.
    assert _from("10.1.2.3", "10.0.0.9, 10.0.0.5") == "10.0.0.9"
    assert _from("10.1.2.3", "") == "10.1.2.3"


def test_every_x_forwarded_for_header_counts_as_one_list() -> None:
    request = make_mocked_request(
        "POST",
        "/api/sessions",
        headers=CIMultiDict([("X-Forwarded-For", CLIENT), ("X-Forwarded-For", "10.0.0.5")]),
    ).clone(remote="10.1.2.3")
    assert client_address(request, parse_networks(["10.0.0.0/8"])) == CLIENT


def test_addresses_are_counted_in_one_spelling_and_other_names_cut_short() -> None:
    assert _from("2001:DB8:0:0::1", None) == "2001:db8::1"
    assert _from("10.1.2.3", "x" * 100) == "x" * 64


async def _app_answer(
    aiohttp_client: Any, handler_app: web.Application, **request: Any
) -> tuple[int, dict[str, str], Any]:
    client = await aiohttp_client(handler_app)
    async with client.post("/", **request) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def _body_limited_app(max_bytes: int) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"read": len(await request.read())})

    app = web.Application(middlewares=[error_middleware, body_limit_middleware(max_bytes)])
    app.router.add_post("/", echo)
    return app


async def test_a_body_of_exactly_the_limit_passes_and_one_byte_more_is_413(
    aiohttp_client: Any,
) -> None:
    status, _, answer = await _app_answer(aiohttp_client, _body_limited_app(10), data=b"x" * 10)
    assert (status, answer) == (200, {"read": 10})
    status, _, answer = await _app_answer(aiohttp_client, _body_limited_app(10), data=b"x" * 11)
    assert status == 413 and answer["error"] == "body exceeds 10 bytes"


def _rate_limited_app(limiter: RateLimiter) -> web.Application:
    # The test client connects from 127.0.0.1: trusted, so X-Forwarded-For names the client.
    trusted = parse_networks(["127.0.0.0/8"])

    async def create(request: web.Request) -> web.Response:
        await check_rate(request, limiter, trusted)
        return web.json_response({"created": True})

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/", create)
    return app


async def test_a_refused_creation_is_429_with_the_time_left_in_the_window(
    aiohttp_client: Any, redis: Redis
) -> None:
    app = _rate_limited_app(RateLimiter(redis, 1, window_seconds=60))
    client = await aiohttp_client(app)
    for address in (CLIENT, "198.51.100.2"):  # each client has a window of its own
        async with client.post("/", headers={"X-Forwarded-For": address}) as resp:
            assert resp.status == 200 and await resp.json() == {"created": True}
    async with client.post("/", headers={"X-Forwarded-For": CLIENT}) as resp:
        answer = await resp.json()
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "60" and answer["retryAfter"] == 60
        assert "at most 1 per 60 s" in answer["error"]


async def test_with_redis_down_the_limit_fails_open(aiohttp_client: Any) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        client = await aiohttp_client(_rate_limited_app(RateLimiter(dead, 1)))
        for _ in range(3):
            async with client.post("/") as resp:
                assert resp.status == 200
    finally:
        await dead.aclose()


async def test_retry_after_is_the_time_left_rounded_up_to_whole_seconds(redis: Redis) -> None:
    limiter = RateLimiter(redis, 1, window_seconds=3_600)
    allowed = await limiter.hit(CLIENT)
    assert allowed == Decision(True, 1, 0)
    await redis.pexpire(keys.session_rate_key(CLIENT), 1_000_500)  # 1,000.5 s left
    refused = await limiter.hit(CLIENT)
    assert refused == Decision(False, 2, 1_001)


async def test_an_unlimited_limiter_decides_without_counting(redis: Redis) -> None:
    assert await RateLimiter(redis, 0).hit(CLIENT) == Decision(True, 0, 0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0", 0),
        ("42", 42),
        ("123456", 123456),
        ("1234567", None),
        ("", None),
        ("²", None),
        ("٢", None),
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1e3", None),
    ],
)
def test_a_number_in_a_header_query_or_cookie_is_ascii_digits_only(
    raw: str, expected: int | None
) -> None:
    # str.isdigit takes "²", which int() refuses: that was a 500 on the stream's lastEventId.
    assert ascii_int(raw, 6) == expected
