"""The gateway's pub/sub connections: the only code that speaks Redis pub/sub.

A link is what the hub reads and writes: subscribe and unsubscribe session channels, read
messages (subscription confirmations, events, pongs) from one coroutine. Two kinds:

- `PubSubLink`: one connection to a single Redis, SUBSCRIBE / UNSUBSCRIBE.
- `ShardedPubSubLink`: Redis Cluster with sharded pub/sub (SSUBSCRIBE / SUNSUBSCRIBE), whose
  messages stay on the shard that owns the channel's slot. One connection per primary (a
  handful), each subscribed to a keep-alive channel of its own shard; every session channel
  goes to the connection of the primary owning its slot. When the cluster moves a slot away
  (Redis then ends that subscription with an unrequested SUNSUBSCRIBE) or a node fails, the
  link fails as a whole: the hub reconnects (re-reading the topology) and resubscribes.

redis-py's own `ClusterPubSub.get_sharded_message` polls node connections in turn, each with
the full timeout, so an event on one shard can wait a whole idle period behind a quiet one;
here each shard has its own reader feeding one inbox, and events pass at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared import keys
from shared.settings import Settings

log = structlog.get_logger(__name__)

# How long opening a link waits for Redis to confirm its keep-alive subscription.
CONFIRM_TIMEOUT = 2.0
# Silence on a pub/sub connection after which it is pinged, and after which it is dead.
IDLE_PING_SECONDS = 5.0
DEAD_AFTER_SECONDS = 15.0

Kind = Literal["subscribe", "unsubscribe", "message", "pong", "other"]

# Plain and sharded pub/sub say the same things; the hub needs no difference.
_KINDS: dict[str, Kind] = {
    "subscribe": "subscribe",
    "ssubscribe": "subscribe",
    "unsubscribe": "unsubscribe",
    "sunsubscribe": "unsubscribe",
    "message": "message",
    "smessage": "message",
    "pong": "pong",
}


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    uuid: str | None  # None for the gateway's own channels and for pongs
    data: bytes = b""


class LinkClosedError(RedisConnectionError):
    """A command given to a link after it was closed (redis-py would silently reconnect)."""


class Liveness:
    """The watchdog of one pub/sub connection: pinged once it has been silent for
    IDLE_PING_SECONDS, dead once silent (even to that PING) for DEAD_AFTER_SECONDS.

    A connection whose peer vanished without a word (a node powered off, a partition)
    otherwise looks like a quiet one: reads just time out, forever.
    """

    __slots__ = ("_last_heard", "_pinged", "_what")

    def __init__(self, what: str) -> None:
        self._what = what
        self._last_heard = asyncio.get_running_loop().time()
        self._pinged = False

    def heard(self) -> None:
        """Something arrived: the connection lives."""
        self._last_heard = asyncio.get_running_loop().time()
        self._pinged = False

    async def silent(self, ping: Callable[[], Awaitable[object]]) -> None:
        """A read timed out: ping once (the PONG counts as heard), or raise once dead."""
        if asyncio.get_running_loop().time() - self._last_heard > DEAD_AFTER_SECONDS:
            raise TimeoutError(f"{self._what} silent, even to PING")
        if not self._pinged:
            await ping()
            self._pinged = True


class Link(Protocol):
    """What the hub needs of a pub/sub connection (read by one coroutine only).

    Each link watches its own connection(s) (`Liveness`): `read` raises once one is dead.

    A closed link refuses every command with `LinkClosedError`: redis-py's `PubSub` would
    open a new connection for a SUBSCRIBE after `aclose()`, subscribed and read by nobody.
    """

    async def open(self) -> None:
        """Connect and subscribe the keep-alive channel(s); returns once Redis confirmed."""

    async def subscribe(self, uuids: Iterable[str]) -> None: ...

    async def unsubscribe(self, uuids: Iterable[str]) -> None: ...

    async def read(self, *, idle: float) -> Message | None:
        """The next message, or None after `idle` seconds of silence (each link pings its
        quiet connections itself, and raises once one is dead)."""

    async def close(self) -> None: ...


def pubsub_client(settings: Settings, client_name: str) -> Redis | RedisCluster:
    """The client of the hub's connections: no retries of its own, the hub reconnects.

    With `REDIS_CLUSTER=true` a cluster client, used for the topology only: the sharded link
    opens its connections to the primaries itself, with these same options.
    """
    options = _pubsub_options(client_name)
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **options)
    return Redis.from_url(settings.redis_url, **options)


def open_link(redis: Redis | RedisCluster) -> Link:
    """A new, unopened link over `redis`: sharded on a cluster, plain otherwise."""
    if isinstance(redis, RedisCluster):
        return ShardedPubSubLink(redis)
    return PubSubLink(redis)


def _pubsub_options(client_name: str | None) -> dict[str, Any]:
    return {
        "socket_connect_timeout": 1.0,
        "socket_timeout": 2.0,
        "health_check_interval": 0,
        "retry": Retry(NoBackoff(), 0, supported_errors=()),
        "client_name": client_name,
    }


def _message(raw: dict[str, Any]) -> Message:
    kind = _KINDS.get(str(raw["type"]), "other")
    channel = raw.get("channel")
    uuid: str | None = None
    if isinstance(channel, bytes):
        name = channel.decode()
        if name.startswith(keys.CHANNEL_PREFIX):
            uuid = keys.uuid_of_channel(name)
    data = raw.get("data")
    return Message(kind, uuid, data if isinstance(data, bytes) else b"")


class PubSubLink:
    """One pub/sub connection to a single Redis: SUBSCRIBE, UNSUBSCRIBE, read."""

    def __init__(self, redis: Redis) -> None:
        self._pubsub = redis.pubsub()
        self._closed = False
        self._liveness: Liveness | None = None

    def _check_open(self) -> None:
        if self._closed:
            raise LinkClosedError("pub/sub link closed")

    async def open(self) -> None:
        self._check_open()
        self._liveness = Liveness("pub/sub connection")
        await self._pubsub.subscribe(keys.GATEWAY_CHANNEL)
        while True:
            msg = await self.read(idle=CONFIRM_TIMEOUT)
            if msg is not None and msg.kind == "subscribe" and msg.uuid is None:
                return

    async def subscribe(self, uuids: Iterable[str]) -> None:
        self._check_open()
        await self._pubsub.subscribe(*(keys.status_channel(u) for u in uuids))

    async def unsubscribe(self, uuids: Iterable[str]) -> None:
        self._check_open()
        await self._pubsub.unsubscribe(*(keys.status_channel(u) for u in uuids))

    async def read(self, *, idle: float) -> Message | None:
        self._check_open()
        liveness = self._liveness
        assert liveness is not None, "read before open"
        raw = await self._pubsub.get_message(timeout=idle)
        if raw is None:
            await liveness.silent(self._pubsub.ping)
            return None
        liveness.heard()
        return _message(raw)

    async def close(self) -> None:
        self._closed = True
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]


class SlotMovedError(RedisConnectionError):
    """The cluster ended a shard subscription the gateway did not end: the slot moved."""


def owner(cluster: RedisCluster, channel: str) -> ClusterNode:
    """The primary that owns `channel`'s slot, as far as the client's topology knows."""
    node = cluster.get_node_from_key(channel)
    if node is None:
        raise SlotMovedError(f"no node owns the slot of {channel!r}")
    return node


def keepalive_channel(cluster: RedisCluster, node: ClusterNode) -> str:
    """The gateway's keep-alive shard channel on `node`: the first tag hashing to its slots."""
    tag = 0
    while True:
        channel = f"{keys.GATEWAY_CHANNEL}:{{{tag}}}"
        if owner(cluster, channel).name == node.name:
            return channel
        tag += 1


class _Shard:
    """The connection to one primary and the coroutine reading it."""

    def __init__(self, node: ClusterNode, client_name: str | None) -> None:
        self.node = node
        self.client = Redis(host=node.host, port=int(node.port), **_pubsub_options(client_name))
        self.pubsub: PubSub = self.client.pubsub()
        self.reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        with contextlib.suppress(RedisError, OSError):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


class ShardedPubSubLink:
    """Sharded pub/sub over a Redis Cluster: one connection per primary, one inbox."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._shards: dict[str, _Shard] = {}  # by node name (host:port)
        self._inbox: asyncio.Queue[Message | Exception] = asyncio.Queue()
        # SUNSUBSCRIBEs sent per channel whose confirmation is not read yet: any other
        # SUNSUBSCRIBE is the cluster's, after moving the slot.
        self._leaving: Counter[bytes] = Counter()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise LinkClosedError("sharded pub/sub link closed")

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    async def open(self) -> None:
        self._check_open()
        # A fresh topology on every (re)connect: a failover or resharding is why we are here.
        await self._cluster.aclose()
        await self._cluster.initialize()
        client_name = self._cluster.get_connection_kwargs().get("client_name")
        for node in self._cluster.get_primaries():
            shard = _Shard(node, str(client_name) if client_name else None)
            self._shards[node.name] = shard
            channel = keepalive_channel(self._cluster, node)
            await shard.pubsub.ssubscribe(channel)
            while True:
                raw = await shard.pubsub.get_message(timeout=CONFIRM_TIMEOUT)
                if raw is not None and raw["type"] == "ssubscribe":
                    break
        for shard in self._shards.values():
            shard.reader = asyncio.create_task(self._read_shard(shard), name="hub-shard")
        log.info("sharded_pubsub_open", shards=sorted(self._shards))

    async def subscribe(self, uuids: Iterable[str]) -> None:
        self._check_open()
        try:
            for shard, channels in self._route(uuids):
                await shard.pubsub.ssubscribe(*channels)
        except Exception as exc:
            self._fail(exc)
            raise

    async def unsubscribe(self, uuids: Iterable[str]) -> None:
        self._check_open()
        try:
            for shard, channels in self._route(uuids):
                self._leaving.update(c.encode() for c in channels)
                await shard.pubsub.sunsubscribe(*channels)
        except Exception as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: Exception) -> None:
        """A failed command fails the link: the hub's next read raises it and reconnects."""
        self._inbox.put_nowait(exc)

    async def read(self, *, idle: float) -> Message | None:
        self._check_open()
        try:
            async with asyncio.timeout(idle):
                item = await self._inbox.get()
        except TimeoutError:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        self._closed = True
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.close()

    def _route(self, uuids: Iterable[str]) -> Iterable[tuple[_Shard, list[str]]]:
        """The channels of `uuids` grouped by slot (a sharded command takes one slot only),
        each with the shard that owns it."""
        by_slot: defaultdict[int, list[str]] = defaultdict(list)
        for uuid in uuids:
            channel = keys.status_channel(uuid)
            by_slot[self._cluster.keyslot(channel)].append(channel)
        for channels in by_slot.values():
            node = owner(self._cluster, channels[0])
            shard = self._shards.get(node.name)
            if shard is None:
                # A primary this link did not connect to: the topology changed, start over.
                raise SlotMovedError(f"no connection to {node.name}, the owner of a channel")
            yield shard, channels

    async def _read_shard(self, shard: _Shard) -> None:
        """Read one shard until it fails; hand every message (or the failure) to the inbox."""
        liveness = Liveness(f"shard {shard.node.name}")
        try:
            while True:
                raw = await shard.pubsub.get_message(timeout=IDLE_PING_SECONDS)
                if raw is None:
                    await liveness.silent(shard.pubsub.ping)
                    continue
                liveness.heard()
                if raw["type"] == "sunsubscribe":
                    channel = raw["channel"]
                    if not self._leaving[channel]:
                        raise SlotMovedError(f"{channel!r} left {shard.node.name}")
                    self._leaving[channel] -= 1
                    if not self._leaving[channel]:
                        del self._leaving[channel]
                self._inbox.put_nowait(_message(raw))
        except Exception as exc:
            # Any failure (RedisClusterException is not a RedisError) fails the whole link.
            self._inbox.put_nowait(exc)
