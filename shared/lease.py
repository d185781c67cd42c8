"""A lease in Redis: one holder per deployment for work that must not run twice at once.

`SET key token NX PX ttl` takes it; the holder renews it well before the TTL runs out, and
only while the key still holds its own token (a script compares and extends, or compares and
deletes, in one step). A holder that dies stops renewing and the key expires: another process
takes over within one TTL. A holder that cannot reach Redis to renew gives the work up before
the TTL could have passed, so two holders overlap only if a process is paused longer than
the remaining TTL — the work run under a lease must therefore stay safe to repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable

import structlog
from redis.asyncio import Redis

from .clients import REDIS_ERRORS
from .keys import PREFIX

log = structlog.get_logger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lease_key(name: str) -> str:
    return f"{PREFIX}:lease:{name}"


class Lease:
    """One named lease, taken by this process under a random token of its own."""

    def __init__(self, redis: Redis, name: str, ttl_seconds: float) -> None:
        self.name = name
        self.key = lease_key(name)
        self.ttl_ms = max(int(ttl_seconds * 1000), 100)
        self.token = secrets.token_hex(16)
        self._redis = redis
        self.held = False

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (or this process already does)."""
        taken = await self._redis.set(self.key, self.token, nx=True, px=self.ttl_ms)
        if not taken:
            taken = await self.renew()
        self.held = bool(taken)
        return self.held

    async def renew(self) -> bool:
        """Extend the lease; False if it is no longer ours (expired and taken by another)."""
        renewed = await self._redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)
        self.held = bool(renewed)
        return self.held

    async def release(self) -> None:
        """Give the lease up now (a successor need not wait for the TTL)."""
        self.held = False
        await self._redis.eval(_RELEASE, 1, self.key, self.token)

    async def holder(self) -> str | None:
        raw = await self._redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw


async def _renew(lease: Lease, within: float) -> bool:
    """Renew, bounded: a renewal that cannot finish before the lease could lapse is lost."""
    try:
        async with asyncio.timeout(within):
            return await lease.renew()
    except TimeoutError:
        log.warning("lease_renewal_failed", lease=lease.name, error="timeout")
    except REDIS_ERRORS as exc:
        log.warning("lease_renewal_failed", lease=lease.name, error=str(exc))
    return False


async def run_under_lease(
    lease: Lease,
    work: Callable[[], Awaitable[None]],
    *,
    on_change: Callable[[bool], None] | None = None,
) -> None:
    """Forever: take `lease` when free, run `work` while holding it, renewing it every third of
    its TTL; cancel `work` the moment the lease is lost or cannot be renewed in time.

    Runs as a supervised task; `work` is expected to loop until cancelled.
    """
    interval = lease.ttl_ms / 1000 / 3
    while True:
        try:
            taken = await lease.acquire()
        except REDIS_ERRORS as exc:
            log.warning("lease_unavailable", lease=lease.name, error=str(exc))
            taken = False
        if not taken:
            await asyncio.sleep(interval)
            continue
        log.info("lease_taken", lease=lease.name)
        if on_change is not None:
            on_change(True)
        task = asyncio.ensure_future(work())
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=interval)
                if done:
                    task.result()  # an error of the work is the supervisor's to see
                    break
                renewed = await _renew(lease, interval)
                if not renewed:
                    log.warning("lease_lost", lease=lease.name)
                    break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if on_change is not None:
                on_change(False)
            if lease.held:
                with contextlib.suppress(*REDIS_ERRORS):
                    await lease.release()
