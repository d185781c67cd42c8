"""session-api's request limits on a real redis-server: the fixed window, `0 = unlimited`,
and whose address counts behind trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import make_mocked_request
from redis.asyncio import Redis

from session_api.limits import RateLimiter, client_address, parse_networks
from shared import keys
from shared.settings import Settings, SettingsError

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
