"""Every Redis key, channel and TTL the services share, defined once.

Keys of one session carry the uuid as a hash tag (`{uuid}`), so the cache entry and the
channel of a session live in the same Redis Cluster slot: the cache-and-publish script may
then touch both atomically, and sharded pub/sub routes the channel to that shard.
"""

from __future__ import annotations

PREFIX = "paypush"

# The original system's in-memory cache kept a status for 15 minutes.
STATUS_TTL_SECONDS = 15 * 60
# An unknown uuid is remembered briefly, so a poller hammering a bad id costs one query.
UNKNOWN_TTL_SECONDS = 30
# A session (and its webhook record) lives 24 h, as in the original.
SESSION_TTL_SECONDS = 24 * 60 * 60


def status_key(uuid: str) -> str:
    """The cached status (event JSON) of one session."""
    return f"{PREFIX}:status:{{{uuid}}}"


def unknown_key(uuid: str) -> str:
    """Marker that no session has this uuid (negative cache)."""
    return f"{PREFIX}:unknown:{{{uuid}}}"


def status_channel(uuid: str) -> str:
    """The pub/sub channel on which every change of one session is published."""
    return f"{PREFIX}:events:{{{uuid}}}"


CHANNEL_PREFIX = f"{PREFIX}:events:"


def uuid_of_channel(channel: str) -> str:
    """The session uuid a channel name belongs to."""
    return channel.removeprefix(CHANNEL_PREFIX).strip("{}")


# Every stream-gateway process keeps this channel subscribed on its one pub/sub connection, so
# the connection is in subscribed mode (and watched) even while no browser waits.
GATEWAY_CHANNEL = f"{PREFIX}:gateway"


# Session creations of one client in the current fixed window (the key expires with it).
RATE_LIMIT_WINDOW_SECONDS = 60


def session_rate_key(client: str) -> str:
    """The counter of session creations by one client address in the current window."""
    return f"{PREFIX}:ratelimit:sessions:{client}"


def admin_signin_rate_key(client: str) -> str:
    """The counter of the operator console's failed sign-ins by one client address."""
    return f"{PREFIX}:ratelimit:admin-signin:{client}"


# The reconciler's lease (session-api): one holder per deployment asks PayOS about pending
# sessions; the value is the holder's token, so only it renews or releases the lease.
RECONCILER_LEASE_KEY = f"{PREFIX}:reconciler:lease"
# The shop-event dispatcher's lease (session-api, issue 17), the same kind of lease.
OUTBOX_LEASE_KEY = f"{PREFIX}:outbox:lease"
