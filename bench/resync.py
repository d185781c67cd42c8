"""What a pub/sub reconnect costs the gateway: the re-read of every open stream's status.

    python -m bench.resync [--streams 10000] [--lost 100]

After a reconnect whatever was published meanwhile is gone, and after a Redis failover the
cache may have lost the `done` too, so the hub re-reads every open stream from MongoDB (in
batches of `hub.REREAD_BATCH`, `hub.REREAD_WORKERS` at a time) and repairs the cache. This
benchmark holds N streams on the real `Hub` (in this process, no HTTP: the re-read is what is
measured), over its own redis-server and MongoDB stand-in, marks `--lost` sessions completed
in MongoDB only (the failover lost their cache write and publish), cuts the pub/sub connection
and measures: time until every stream was re-read, MongoDB queries, Redis commands, this
process's CPU, and how many of the lost `done`s reached their streams. Side by side, the
re-read the gateway did before (cache only, one GET per stream, 32 at a time), which is
cheaper and misses every lost `done`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from devstack.seed import store_pending_sessions
from shared.cache import StatusCache
from shared.model import StatusEvent, StreamStatus
from shared.mongo import Store, mongo_client
from shared.settings import Settings
from shared.status import StatusReader
from stream_gateway.hub import Hub, Listener
from stream_gateway.links import open_link, pubsub_client
from stream_gateway.metrics import GatewayMetrics

from ._common import AMOUNT, backends, cpu_seconds, redis_for, table

OLD_WORKERS = 32


async def commands(redis: Redis) -> dict[str, int]:
    stats: dict[str, Any] = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


async def until(condition: Any) -> None:
    async with asyncio.timeout(120):
        while not condition():
            await asyncio.sleep(0.01)


async def run(args: argparse.Namespace) -> None:
    with backends() as env:
        mongo = env.mongo
        assert mongo is not None, "the benchmark's own MongoDB stand-in"
        settings = Settings.from_env(
            {}, redis_url=env.redis_url, mongodb_url=env.mongodb_url(), log_level="WARNING"
        )
        store = Store(mongo_client(settings))
        await store.ensure_indexes()
        redis = redis_for(settings.redis_url)
        cache = StatusCache(redis)
        queries = 0

        def counted() -> None:
            nonlocal queries
            queries += 1

        reader = StatusReader(cache, store, on_db_query=counted)
        metrics = GatewayMetrics.create(CollectorRegistry())
        pubsub = pubsub_client(settings, "bench-resync")
        hub = Hub(lambda: open_link(pubsub), reader, metrics)
        try:
            print(f"storing {args.streams} pending sessions ...", flush=True)
            docs = await store_pending_sessions(store, args.streams, amount=AMOUNT)
            for doc in docs:
                await cache.put(StatusEvent.from_session(doc))
            hub.start()
            await until(lambda: hub.connected)
            listeners = [Listener(doc["uuid"], after_version=1) for doc in docs]
            await asyncio.gather(*(hub.join(listener) for listener in listeners))
            print(f"{hub.subscription_count} streams joined", flush=True)

            # The failover lost these sessions' `done`: in MongoDB, not in the cache.
            lost = docs[: args.lost]
            for doc in lost:
                await store.sessions.update_one(
                    {"uuid": doc["uuid"]},
                    {"$set": {"status": "completed", "amountPaid": AMOUNT, "version": 2}},
                )
            got_done = {doc["uuid"]: asyncio.Event() for doc in lost}
            for listener in listeners[: args.lost]:

                async def send(event: StatusEvent, pushed: bool, uuid: str = listener.uuid) -> bool:
                    if event.status is StreamStatus.DONE:
                        got_done[uuid].set()
                    return False

                listener.attach(send)

            def reread() -> float:
                return float(metrics.resync_reads._value.get())

            base_reads, base_queries = reread(), queries
            base_cmds, base_cpu = await commands(redis), time.process_time()
            base_mongo_cpu = cpu_seconds(mongo.pid)
            started = time.perf_counter()
            await redis.client_kill_filter(_type="pubsub")
            await until(lambda: reread() - base_reads >= args.streams)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - base_cpu
            mongo_cpu = cpu_seconds(mongo.pid) - base_mongo_cpu
            cmds = delta(base_cmds, await commands(redis))
            async with asyncio.timeout(10):
                await asyncio.gather(*(e.wait() for e in got_done.values()))
            repaired = 0
            for doc in lost:
                cached = await cache.get(doc["uuid"])
                repaired += cached is not None and cached.status is StreamStatus.DONE
            new_row = [
                "MongoDB, batched (now)",
                f"{elapsed * 1000:,.0f}",
                queries - base_queries,
                sum(cmds.values()) - cmds.get("client|kill", 0),
                f"{cpu * 1000:,.0f}",
                f"{mongo_cpu * 1000:,.0f}",
                f"{sum(e.is_set() for e in got_done.values())}/{len(lost)}",
                f"{repaired}/{len(lost)}",
            ]

            # The re-read as it was: one cache GET per stream, 32 at a time.
            base_cmds, base_cpu = await commands(redis), time.process_time()
            pending = list(reversed([doc["uuid"] for doc in docs]))
            lost_set = {doc["uuid"] for doc in docs[args.lost : 2 * args.lost]}
            for doc in docs[args.lost : 2 * args.lost]:
                await store.sessions.update_one(
                    {"uuid": doc["uuid"]}, {"$set": {"status": "completed", "version": 3}}
                )
            seen_done = 0

            async def worker() -> None:
                nonlocal seen_done
                while pending:
                    uuid = pending.pop()
                    event = await reader.read(uuid)
                    if uuid in lost_set and event is not None and event.version == 3:
                        seen_done += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(OLD_WORKERS)))
            old_elapsed = time.perf_counter() - started
            old_cpu = time.process_time() - base_cpu
            old_cmds = delta(base_cmds, await commands(redis))
            old_row = [
                "cache only (before)",
                f"{old_elapsed * 1000:,.0f}",
                0,
                sum(old_cmds.values()),
                f"{old_cpu * 1000:,.0f}",
                "0",
                f"{seen_done}/{len(lost_set)}",
                "—",
            ]
            print()
            print(
                table(
                    [
                        f"re-read of {args.streams:,} streams",
                        "time ms",
                        "MongoDB queries",
                        "Redis commands",
                        "gateway CPU ms",
                        "MongoDB CPU ms",
                        "lost done delivered",
                        "cache repaired",
                    ],
                    [new_row, old_row],
                )
            )
            print(
                f"\nper stream: {elapsed / args.streams * 1e6:,.0f} µs wall, "
                f"{cpu / args.streams * 1e6:,.0f} µs gateway CPU (before: "
                f"{old_elapsed / args.streams * 1e6:,.0f} µs, {old_cpu / args.streams * 1e6:,.0f}"
                f" µs); time ratio {elapsed / old_elapsed:.1f}x"
            )
        finally:
            await hub.stop()
            await pubsub.aclose()
            await redis.aclose()
            await store.client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--lost", type=int, default=100)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
