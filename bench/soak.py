"""Soak: the whole system at a steady mixed load; memory and connections must stay flat.

    python -m bench.soak [--minutes 10] [--rate 4] [--interval S] [--max-rss-slope 1024]
                         [--max-fd-slope 30]

Starts its own redis-server and MongoDB stand-in and the four processes (PayOS simulator,
webhook-ingest, stream-gateway, session-api), then until the time is up keeps a steady load:
sessions created through session-api at `--rate` per second, each watched by a browser (an
SSE stream held 5-60 s) and then paid through the simulator (or, one in six, abandoned),
fallback polling of `GET /api/webhooks?uuid=`, the pre-flight check of
`check-session-limit`, and a cleanup run (`POST /api/webhooks/cleanup` with the CRON_SECRET
bearer) every 30 s.

Every `--interval` seconds it samples each process's RSS (/proc/PID/status VmRSS), its open
file descriptors (/proc/PID/fd) and Redis's `connected_clients`, prints a table per process,
then the least-squares slope of RSS (KiB/min) and of fds (per min) over the second half of
the run (the first half is warm-up). It exits 1 when a service process (webhook-ingest,
stream-gateway, session-api) or Redis's client count grows beyond the thresholds, or when a
payment was lost; Redis, the MongoDB stand-in and the simulator are reported but not judged
on memory: they hold the run's data (status cache, sessions, every link and delivery).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from devstack.servers import Process
from shared.mongo import Store, mongo_client
from shared.settings import Settings
from tests.faults.harness import (
    Driver,
    Payment,
    Report,
    http_client,
    reconcile,
    running_system,
    settle,
)

from ._common import backends, redis_for, rss_kib, table

# Judged on their memory and descriptors; the others hold the run's data by design.
JUDGED = ("webhook-ingest", "stream-gateway", "session-api")
HOLD_SECONDS = (5.0, 60.0)
ABANDON_EVERY = 6
# How long the end of the run may take to finish what is in flight.
SETTLE_SECONDS = 120.0
POLLS_PER_SECOND = 10
CLEANUP_EVERY_SECONDS = 30.0
TABLE_ROWS = 15


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_kib: int
    fds: int


@dataclass
class Curves:
    by_process: dict[str, list[Sample]] = field(default_factory=dict)
    redis_clients: list[tuple[float, int]] = field(default_factory=list)
    streams: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class Load:
    """What the load generator did, for the final lines."""

    sessions: int = 0
    paid: int = 0
    abandoned: int = 0
    polls: int = 0
    poll_errors: int = 0
    limit_checks: int = 0
    cleanups: int = 0
    cleanup_errors: int = 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute; 0 for fewer than 3."""
    if len(points) < 3:
        return 0.0
    xs = [t / 60 for t, _ in points]
    ys = [v for _, v in points]
    return statistics.linear_regression(xs, ys).slope


def second_half(points: Sequence[tuple[float, float]], end: float) -> list[tuple[float, float]]:
    return [(t, v) for t, v in points if t >= end / 2]


async def sample(
    processes: dict[str, Process], redis: Redis, driver: Driver, curves: Curves, t: float
) -> None:
    for name, proc in processes.items():
        with contextlib.suppress(OSError):
            curves.by_process.setdefault(name, []).append(
                Sample(t, rss_kib(proc.pid, missing=0), fd_count(proc.pid))
            )
    with contextlib.suppress(Exception):
        info = await redis.info("clients")
        curves.redis_clients.append((t, int(info["connected_clients"])))
    held = sum(1 for p in driver.payments for task in p.tasks if not task.done())
    curves.streams.append((t, held))


async def one_session(driver: Driver, load: Load, rng: random.Random, n: int, hold: float) -> None:
    """A browser: create, watch for up to `hold` s, then pay (or abandon the page)."""
    payment = await driver.create()
    load.sessions += 1
    driver.watch(payment)
    await asyncio.sleep(rng.uniform(min(HOLD_SECONDS[0], hold), hold))
    if n % ABANDON_EVERY == 0:
        for task in payment.tasks:
            task.cancel()
        load.abandoned += 1
        return
    await driver.pay(payment)
    load.paid += 1


async def poller(driver: Driver, load: Load, rng: random.Random, end: float) -> None:
    """Fallback polling, as a browser whose stream failed does."""
    while time.monotonic() < end:
        await asyncio.sleep(1 / POLLS_PER_SECOND)
        recent: list[Payment] = driver.payments[-200:]
        if not recent:
            continue
        payment = rng.choice(recent)
        try:
            resp = await driver.http.get(
                f"{driver.system.api_url}/api/webhooks", params={"uuid": payment.uuid}
            )
            load.polls += 1
            load.poll_errors += resp.status_code != 200
            if load.polls % 10 == 0:
                check = await driver.http.get(
                    f"{driver.system.api_url}/api/webhooks/check-session-limit",
                    params={"accountNumber": payment.account},
                )
                load.limit_checks += 1
                load.poll_errors += check.status_code != 200
        except Exception:
            load.poll_errors += 1


async def cleaner(driver: Driver, load: Load, end: float) -> None:
    """The CronJob, much more often than every 6 h."""
    secret = driver.system.settings.cron_secret
    while time.monotonic() + CLEANUP_EVERY_SECONDS < end:
        await asyncio.sleep(CLEANUP_EVERY_SECONDS)
        try:
            resp = await driver.http.post(
                f"{driver.system.api_url}/api/webhooks/cleanup",
                headers={"Authorization": f"Bearer {secret}"},
            )
            load.cleanups += 1
            load.cleanup_errors += resp.status_code != 200
        except Exception:
            load.cleanup_errors += 1


async def run(args: argparse.Namespace) -> int:
    duration = args.minutes * 60
    interval = args.interval or max(1.0, min(5.0, duration / 40))
    # Short runs hold streams for less, so the load still turns over many times.
    hold = min(HOLD_SECONDS[1], max(10.0, duration / 4))
    rng = random.Random(args.seed)
    with backends() as env:
        base = Settings.from_env(
            # Every simulated browser comes from 127.0.0.1: no per-address creation limit.
            {"SESSION_RATE_LIMIT_PER_MINUTE": "0", "LOG_LEVEL": "WARNING"},
            redis_url=env.redis_url,
            mongodb_url=env.mongodb_url("soak"),
        )
        async with (
            running_system(base, env.dir, gateways=1, simulator_in_process=False) as system,
            http_client() as http,
        ):
            settings = system.settings
            redis = redis_for(env.redis_url)
            store = Store(mongo_client(settings))
            driver = Driver(system, http, watch_timeout=hold + 120, rng=rng)
            processes = {p.name: p for p in system.processes}
            processes.update({p.name: p for p in env.processes})
            curves, load = Curves(), Load()
            print(
                f"soak: {args.minutes:g} min at {args.rate:g} sessions/s, sampling every "
                f"{interval:g} s; logs in {env.dir / 'logs'}",
                flush=True,
            )
            t0 = time.monotonic()
            end = t0 + duration
            background = [
                asyncio.create_task(poller(driver, load, rng, end)),
                asyncio.create_task(cleaner(driver, load, end)),
            ]
            sessions: list[asyncio.Task[None]] = []
            next_sample = t0
            n = 0
            try:
                while (now := time.monotonic()) < end:
                    if now >= next_sample:
                        await sample(processes, redis, driver, curves, now - t0)
                        next_sample += interval
                    n += 1
                    sessions.append(asyncio.create_task(one_session(driver, load, rng, n, hold)))
                    sessions = [s for s in sessions if not s.done()] + [
                        s for s in sessions if s.done() and s.exception() is not None
                    ]
                    await asyncio.sleep(rng.expovariate(args.rate))
                await sample(processes, redis, driver, curves, time.monotonic() - t0)
                print("soak: load stopped; settling the payments in flight", flush=True)
                # Bounded: a stuck browser or request is a finding to report, not a hang.
                done, stuck = await asyncio.wait([*background, *sessions], timeout=SETTLE_SECONDS)
                results = [t.exception() for t in done if not t.cancelled()]
                if stuck:
                    results.append(
                        TimeoutError(f"{len(stuck)} tasks still running after {SETTLE_SECONDS:g} s")
                    )
                errors = [r for r in results if isinstance(r, BaseException)]
                await settle(driver, timeout=90)
                await driver.close()
                report = await reconcile(driver, store, Report())
                report.problems.extend(f"session: {e!r}" for e in errors)
            finally:
                for task in [*background, *sessions]:
                    task.cancel()
                await driver.close()
                await redis.aclose()
                await store.client.close()
    return verdict(curves, load, report, duration, args)


def verdict(
    curves: Curves, load: Load, report: Report, duration: float, args: argparse.Namespace
) -> int:
    for name, samples in curves.by_process.items():
        print(f"\n{name}")
        step = max(1, -(-len(samples) // TABLE_ROWS))
        shown = samples[::step]
        if shown[-1] is not samples[-1]:
            shown.append(samples[-1])
        rows = [(f"{s.t:.0f}", f"{s.rss_kib / 1024:.1f}", s.fds) for s in shown]
        print(table(["time s", "RSS MiB", "fds"], rows))
    print("\nredis connected_clients / streams held")
    step = max(1, -(-len(curves.redis_clients) // TABLE_ROWS))
    held = dict(curves.streams)
    rows2 = [(f"{t:.0f}", c, held.get(t, "")) for t, c in curves.redis_clients[::step]]
    print(table(["time s", "clients", "streams"], rows2))

    failed: list[str] = []
    rows3 = []
    for name, samples in curves.by_process.items():
        rss = slope_per_minute(second_half([(s.t, s.rss_kib) for s in samples], duration))
        fds = slope_per_minute(second_half([(s.t, s.fds) for s in samples], duration))
        judged = name in JUDGED
        ok = not judged or (rss <= args.max_rss_slope and fds <= args.max_fd_slope)
        if not ok:
            failed.append(name)
        rows3.append(
            (name, f"{rss:+.0f}", f"{fds:+.1f}", ("ok" if ok else "GROWS") if judged else "info")
        )
    clients = slope_per_minute(second_half(curves.redis_clients, duration))
    clients_ok = clients <= args.max_fd_slope
    rows3.append(("redis clients", "", f"{clients:+.1f}", "ok" if clients_ok else "GROWS"))
    if not clients_ok:
        failed.append("redis clients")
    print(
        f"\nslopes over the second half (thresholds: RSS {args.max_rss_slope:g} KiB/min, "
        f"fds {args.max_fd_slope:g}/min)"
    )
    print(table(["process", "RSS KiB/min", "fds/min", "verdict"], rows3))
    print(
        f"\nload: sessions {load.sessions}, paid {load.paid}, abandoned {load.abandoned}, "
        f"polls {load.polls} (+{load.limit_checks} limit checks, {load.poll_errors} errors), "
        f"cleanups {load.cleanups} ({load.cleanup_errors} errors)"
    )
    print(f"payments: {report.summary()}")
    for problem in report.problems[:20]:
        print(f"  problem: {problem}")
    if report.problems or report.lost:
        failed.append("payments")
    print(f"\nverdict: {'FAIL: ' + ', '.join(failed) if failed else 'flat, nothing lost'}")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=4.0, help="new sessions per second")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples")
    parser.add_argument("--max-rss-slope", type=float, default=1024.0, help="KiB per minute")
    parser.add_argument("--max-fd-slope", type=float, default=30.0, help="descriptors per min")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0:
        parser.error("--minutes and --rate must be positive")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
