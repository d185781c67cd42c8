"""Request limits of session-api: body size on every POST, session creations per client.

The rate limit is a fixed window per client address, counted in Redis so it holds across
replicas: the first creation of a window starts the counter with the window as its TTL; a
creation beyond the limit is answered 429 with `Retry-After` (the window's remaining time).
Redis unavailable: the limit fails open (logged) — a payment must not be refused because the
limiter's store is down; the per-account limit in MongoDB still holds.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from redis.asyncio import Redis

from shared import keys
from shared.clients import REDIS_ERRORS
from shared.web import Handler

from .errors import BodyTooLarge, RateLimited

log = structlog.get_logger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Count one creation and answer (count, milliseconds left in the window), atomically.
_HIT = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if n == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""
# Longest client identifier kept in a key (an IPv6 address is at most 45 characters).
MAX_CLIENT_LEN = 64


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    count: int
    retry_after: int  # seconds until the window ends (0 when allowed)


class RateLimiter:
    """At most `limit` hits (session creations, unless `key` names another counter) per client
    address and window (0: unlimited)."""

    def __init__(
        self,
        redis: Redis,
        limit: int,
        *,
        window_seconds: int = keys.RATE_LIMIT_WINDOW_SECONDS,
        key: Callable[[str], str] = keys.session_rate_key,
    ) -> None:
        self.limit = limit
        self.window_seconds = window_seconds
        self._key = key
        self._hit = redis.register_script(_HIT)

    async def hit(self, client: str) -> Decision:
        """Count one creation by `client`; raises one of `REDIS_ERRORS`."""
        if self.limit <= 0:
            return Decision(True, 0, 0)
        result: Any = await self._hit(keys=[self._key(client)], args=[self.window_seconds * 1000])
        count, ttl_ms = int(result[0]), int(result[1])
        if count <= self.limit:
            return Decision(True, count, 0)
        return Decision(False, count, max(1, math.ceil(ttl_ms / 1000)))


def parse_networks(proxies: Sequence[str]) -> tuple[Network, ...]:
    """TRUSTED_PROXIES as networks; Settings has refused any with host bits set."""
    return tuple(ipaddress.ip_network(p) for p in proxies)


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(request: web.Request, trusted: Sequence[Network]) -> str:
    """The client's address: the peer, or — when the peer is a trusted proxy — the nearest
    X-Forwarded-For hop that is not itself a trusted proxy (walking from the right, since
    every hop left of the first untrusted one was written by the client and may be forged)."""
    address = request.remote or "unknown"
    if trusted:
        hops = [
            hop.strip()
            for header in request.headers.getall("X-Forwarded-For", [])
            for hop in header.split(",")
            if hop.strip()
        ]
        while hops and _trusted(address, trusted):
            address = hops.pop()
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address[:MAX_CLIENT_LEN]


async def check_rate(
    request: web.Request, limiter: RateLimiter, trusted: tuple[Network, ...]
) -> None:
    """Count a creation by `request`'s client; RateLimited (429) when over the limit."""
    client = client_address(request, trusted)
    try:
        decision = await limiter.hit(client)
    except REDIS_ERRORS as exc:
        log.warning("rate_limit_unavailable", error=str(exc))
        return
    if decision.allowed:
        return
    log.info("session_rate_limited", client=client, count=decision.count)
    raise RateLimited(
        f"too many payment sessions from this address; at most {limiter.limit} per "
        f"{limiter.window_seconds} s, try again in {decision.retry_after} s",
        retry_after=decision.retry_after,
    )


def body_limit_middleware(max_bytes: int) -> Any:
    """413 for any request declaring a body over `max_bytes`, before its handler runs (and
    so before authentication): a handler that never reads its body still refuses it. Inside
    `error_middleware`, which answers it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > max_bytes:
            raise BodyTooLarge(max_bytes)
        return await handler(request)

    return middleware
