"""A reusable harness for fault and soak runs: the system as processes, browsers, payments, audit.

- `running_system()` starts webhook-ingest, two stream-gateways and session-api as processes
  (`devstack.system`: each can be killed and restarted on its own port) and the PayOS
  simulator, either in this process (short redelivery delays, for fault tests) or as a
  process of its own (the soak).
- `Watcher` is a browser's EventSource: it reconnects when its stream ends or breaks, after
  the server's `retry:` hint, sending `Last-Event-ID`, to the next gateway when one is gone;
  an HTTP 204 means "final, stop".
- `Driver` makes payments as people do: a session through session-api, one or two watchers
  waiting on it, then the bank transfer through the simulator's `POST /sim/pay`.
- `reconcile()` checks the outcome against MongoDB, the simulator's deliveries, the watchers
  and the polling endpoint, and lists every broken promise.
- For crowds of thousands of browsers (`tests.faults.crowd`): `crowd_sessions()` stores and
  caches sessions in bulk, `payable()` gives one a PayOS link the driver can pay, and
  `leftovers()` counts what is left once the browsers are gone: streams and subscriptions in
  the gateways, session channels in Redis, and Redis connections per process
  (`redis_connections()`, each connection traced to the process holding it through /proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from httpx_sse import aconnect_sse
from redis.asyncio import Redis, RedisCluster

from devstack.payos_simulator.app import create_app as create_simulator
from devstack.seed import store_pending_sessions
from devstack.servers import Process
from devstack.system import ALL, System, plan, plan_backends
from shared import keys
from shared.cache import StatusCache
from shared.model import StatusEvent
from shared.mongo import Doc, Store
from shared.settings import Settings
from shared.signing import sign_payment_request

STREAM = "/api/webhooks/stream"
# Redeliveries of the in-process simulator: quick at first, then once a second for ~40 s.
FAST_RETRY_DELAYS: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8) + (1.0,) * 40
# Answers that mean "try again" to a client of session-api.
RETRYABLE = frozenset({429, 500, 502, 503, 504})


# -- the system ------------------------------------------------------------------------------


async def start(*processes: Process) -> None:
    """Start processes in parallel (each waits for its /healthz), off the event loop."""
    await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))


async def kill(process: Process) -> None:
    """kill -9, and wait until its port is free."""
    await asyncio.to_thread(process.kill)


async def stop(process: Process) -> None:
    await asyncio.to_thread(process.stop)


@contextlib.asynccontextmanager
async def _simulator_in_process(
    settings: Settings, retry_delays: Sequence[float]
) -> AsyncIterator[None]:
    runner = web.AppRunner(create_simulator(settings, retry_delays=retry_delays), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", settings.payos_simulator_port)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_system(
    settings: Settings,
    dir: Path,
    *,
    gateways: int = 2,
    simulator_in_process: bool = True,
    retry_delays: Sequence[float] = FAST_RETRY_DELAYS,
) -> AsyncIterator[System]:
    """The whole system on free local ports (`devstack.system`), on `settings`' Redis and
    MongoDB, its logs in `dir`/logs; `gateways` stream-gateways, each on a port of its own."""
    backends = plan_backends(dir, redis_url=settings.redis_url, mongodb_url=settings.mongodb_url)
    services = [s for s in ALL if not (simulator_in_process and s == "payos-simulator")]
    system = plan(settings, backends, services=services, replicas={"stream-gateway": gateways})
    async with contextlib.AsyncExitStack() as stack:
        if simulator_in_process:
            await stack.enter_async_context(_simulator_in_process(system.settings, retry_delays))
        try:
            await asyncio.to_thread(system.start)
            yield system
        finally:
            await asyncio.to_thread(system.stop)


def http_client(base_url: str = "", *, connections: int = 1000) -> httpx.AsyncClient:
    """A client for many concurrent streams: no read timeout, no idle connection kept."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(10, read=None),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=0),
    )


# -- browsers --------------------------------------------------------------------------------


@dataclass
class Seen:
    """One event a watcher received."""

    version: int
    status: str
    amount: int
    amount_paid: int
    gateway: int


@dataclass
class Watcher:
    """A browser's EventSource on one session, reconnecting as EventSource does."""

    uuid: str
    gateway_urls: Sequence[str]
    http: httpx.AsyncClient
    gateway: int = 0  # where it connects first
    retry_ms: int = 300  # until the server sends a `retry:` hint
    events: list[Seen] = field(default_factory=list)
    connects: int = 0
    errors: list[str] = field(default_factory=list)
    final: bool = False  # answered 204: the session is final and every event was seen
    gave_up: str | None = None
    last_id: str | None = None
    first_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, deadline: float) -> None:
        """Listen until a 204, a fatal answer, cancellation, or the monotonic `deadline`."""
        while time.monotonic() < deadline:
            ended_cleanly = await self._connect_once()
            if self.final or self.gave_up:
                return
            if not ended_cleanly:
                # A load balancer sends the next connection to a live backend.
                self.gateway = (self.gateway + 1) % len(self.gateway_urls)
            # EventSource waits `retry` ms before it reconnects.
            pause = self.retry_ms / 1000 * random.uniform(0.8, 1.2)
            await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        self.gave_up = self.gave_up or "deadline"

    async def _connect_once(self) -> bool:
        """One connection; True when the server ended the stream (not an error)."""
        url = self.gateway_urls[self.gateway] + STREAM
        headers = {"Last-Event-ID": self.last_id} if self.last_id is not None else {}
        self.connects += 1
        try:
            async with aconnect_sse(
                self.http, "GET", url, params={"uuid": self.uuid}, headers=headers
            ) as source:
                status = source.response.status_code
                if status == 204:
                    self.final = True
                    return True
                if status != 200:
                    body = (await source.response.aread())[:200].decode(errors="replace")
                    self.errors.append(f"gateway {self.gateway}: HTTP {status} {body}")
                    if status not in RETRYABLE:
                        self.gave_up = f"HTTP {status}"
                    return False
                async for sse in source.aiter_sse():
                    if sse.retry is not None:
                        self.retry_ms = sse.retry
                    if not sse.data:
                        continue  # keep-alive or a bare `retry:`: EventSource dispatches nothing
                    self.last_id = sse.id or self.last_id
                    self._seen(json.loads(sse.data))
            return True
        except (httpx.HTTPError, OSError) as exc:
            self.errors.append(f"gateway {self.gateway}: {type(exc).__name__}")
            return False

    def _seen(self, data: dict[str, Any]) -> None:
        self.events.append(
            Seen(
                int(data["version"]),
                str(data["status"]),
                int(data["amount"]),
                int(data.get("amountPaid", 0)),
                self.gateway,
            )
        )
        self.first_event.set()

    @property
    def statuses(self) -> list[str]:
        return [e.status for e in self.events]


# -- payments --------------------------------------------------------------------------------


@dataclass
class Payment:
    """A session created through session-api, its watchers, and (when paid) its transfer."""

    uuid: str
    order_code: int
    amount: int
    account: str
    watchers: list[Watcher] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    paid: bool = False
    reference: str | None = None
    copies: int = 1
    paid_at: float | None = None


@dataclass
class Driver:
    """Creates sessions, starts their watchers and pays them through the simulator."""

    system: System
    http: httpx.AsyncClient
    watch_timeout: float = 90.0
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    payments: list[Payment] = field(default_factory=list)
    create_retries: int = 0
    errors: list[str] = field(default_factory=list)
    _next_gateway: int = 0

    @property
    def paid(self) -> list[Payment]:
        return [p for p in self.payments if p.paid]

    @property
    def unpaid(self) -> list[Payment]:
        return [p for p in self.payments if not p.paid]

    async def create(self, timeout: float = 30.0) -> Payment:
        """A new session, retried while session-api answers "try again" (a fault is on)."""
        account = "9" + "".join(self.rng.choice("0123456789") for _ in range(9))
        amount = self.rng.randrange(10, 500) * 1000
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = await self.http.post(
                    f"{self.system.api_url}/api/sessions",
                    json={"accountNumber": account, "amount": amount},
                )
                if resp.status_code == 201:
                    body = resp.json()
                    payment = Payment(body["uuid"], int(body["orderCode"]), amount, account)
                    self.payments.append(payment)
                    return payment
                problem = f"HTTP {resp.status_code} {resp.text[:200]}"
                if resp.status_code not in RETRYABLE:
                    raise AssertionError(f"session creation refused: {problem}")
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if time.monotonic() > deadline:
                raise AssertionError(f"no session created within {timeout} s: {problem}")
            self.create_retries += 1
            await asyncio.sleep(0.2)

    def watch(self, payment: Payment, count: int = 1, gateway: int | None = None) -> None:
        """Open `count` browsers on `payment`, spread over the gateways unless one is given."""
        for _ in range(count):
            if gateway is None:
                first = self._next_gateway % len(self.system.gateways)
                self._next_gateway += 1
            else:
                first = gateway
            watcher = Watcher(
                payment.uuid,
                self.system.gateway_urls,
                self.http,
                gateway=first,
                retry_ms=self.system.settings.sse_retry_ms,
            )
            payment.watchers.append(watcher)
            deadline = time.monotonic() + self.watch_timeout
            payment.tasks.append(asyncio.create_task(watcher.run(deadline)))

    async def waiting(self, payment: Payment, timeout: float = 5.0) -> None:
        """Until every watcher of `payment` has its first event (or `timeout`: a fault is on)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(w.first_event.wait() for w in payment.watchers))

    async def pay(self, payment: Payment, *, copies: int = 1) -> dict[str, Any]:
        """The bank transfer: PayOS (the simulator) sends the webhook, and redelivers it."""
        started = time.monotonic()
        resp = await self.http.post(
            f"{self.system.sim_url}/sim/pay/{payment.order_code}", json={"copies": copies}
        )
        if resp.status_code != 200:
            raise AssertionError(f"simulator refused to pay: {resp.status_code} {resp.text}")
        body: dict[str, Any] = resp.json()
        payment.paid, payment.reference, payment.copies = True, body["reference"], copies
        payment.paid_at = started
        return body

    async def one(
        self,
        *,
        watchers: int = 1,
        pay: bool = True,
        settle: float = 0.0,
        copies: int = 1,
        gateway: int | None = None,
    ) -> Payment:
        """A whole payment: create, watch, wait for the browsers, (wait `settle` s,) pay."""
        payment = await self.create()
        self.watch(payment, watchers, gateway)
        await self.waiting(payment)
        if settle:
            await asyncio.sleep(settle)
        if pay:
            await self.pay(payment, copies=copies)
        return payment

    async def flow(
        self,
        *,
        rate: float,
        duration: float,
        unpaid_every: int = 7,
        duplicate_every: int = 5,
    ) -> None:
        """Payments started at `rate` per second for `duration` s; waits for all to be paid.

        Every `unpaid_every`-th session is never paid (its watcher must never see `done`),
        every `duplicate_every`-th transfer is delivered twice at once (PayOS retries can).
        """
        started: list[asyncio.Task[Payment]] = []
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < duration:
            n += 1
            started.append(
                asyncio.create_task(
                    self.one(
                        watchers=1 + (n % 3 == 0),
                        pay=n % unpaid_every != 0,
                        settle=self.rng.uniform(0, 0.3),
                        copies=2 if n % duplicate_every == 0 else 1,
                    )
                )
            )
            await asyncio.sleep(1 / rate)
        for result in await asyncio.gather(*started, return_exceptions=True):
            if isinstance(result, BaseException):
                self.errors.append(f"{type(result).__name__}: {result}")

    async def close(self) -> None:
        """Stop every watcher still running (those of unpaid sessions wait forever)."""
        tasks = [t for p in self.payments for t in p.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the audit -------------------------------------------------------------------------------


@dataclass
class Report:
    """What a run did, and every promise it found broken (`problems`)."""

    payments: int = 0  # transfers made
    completed: int = 0  # of those, completed once in MongoDB, with their one webhook record
    lost: int = 0  # transfers not (or not exactly once) in MongoDB
    unnotified: int = 0  # paid sessions whose browsers or pollers were not told `done`
    unpaid_sessions: int = 0
    deliveries: int = 0
    delivery_attempts: int = 0
    failed_attempts: int = 0
    webhook_records: int = 0
    watchers: int = 0
    reconnects: int = 0
    faults: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    known_bug: str | None = None  # set by a test marked xfail: kept out of the totals
    figures: dict[str, float | int] = field(default_factory=dict)  # what the test measured

    def summary(self) -> str:
        d = dataclasses.asdict(self)
        d["faults"] = len(self.faults)
        d["problems"] = len(self.problems)
        del d["known_bug"], d["figures"]
        figures = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.figures.items()}
        return " ".join(f"{k}={v}" for k, v in (d | figures).items())


async def deliveries(http: httpx.AsyncClient, sim_url: str) -> dict[int, list[dict[str, Any]]]:
    """The simulator's webhook deliveries, by orderCode."""
    resp = await http.get(f"{sim_url}/sim/deliveries")
    resp.raise_for_status()
    out: dict[int, list[dict[str, Any]]] = {}
    for d in resp.json():
        out.setdefault(int(d["body"]["data"]["orderCode"]), []).append(d)
    return out


async def settle(driver: Driver, timeout: float = 60.0) -> None:
    """Until the simulator has every transfer acknowledged and every paid watcher stopped."""
    codes = {p.order_code for p in driver.paid}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        by_code = await deliveries(driver.http, driver.system.sim_url)
        if all(d["delivered"] for c in codes for d in by_code.get(c, [])):
            break
        await asyncio.sleep(0.2)
    tasks = [t for p in driver.paid for t in p.tasks]
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.1, deadline - time.monotonic()))


async def reconcile(driver: Driver, store: Store, report: Report | None = None) -> Report:
    """Check every promise for every payment the driver made; the problems are listed."""
    report = report or Report()
    problems = report.problems
    problems.extend(f"driver: {e}" for e in driver.errors)
    by_code = await deliveries(driver.http, driver.system.sim_url)
    report.payments = len(driver.paid)
    report.unpaid_sessions = len(driver.unpaid)
    for payment in driver.payments:
        report.watchers += len(payment.watchers)
        report.reconnects += sum(max(0, w.connects - 1) for w in payment.watchers)
        sent = by_code.get(payment.order_code, [])
        report.deliveries += len(sent)
        for d in sent:
            report.delivery_attempts += len(d["attempts"])
            report.failed_attempts += sum(1 for s in d["attempts"] if not 200 <= s < 300)
        if payment.paid:
            stored, told = await _check_paid(driver, store, payment, sent, problems)
            report.completed += stored
            report.unnotified += not told
        else:
            await _check_unpaid(store, payment, sent, problems)
    report.lost = report.payments - report.completed
    codes = [p.order_code for p in driver.payments]
    # An equality find, not count_documents: the stand-in counts by scanning the collection.
    report.webhook_records = sum(
        [len(await store.webhooks.find({"orderCode": c}, {"_id": 1}).to_list()) for c in codes]
    )
    delivered = sum(1 for c in codes for d in by_code.get(c, []) if d["delivered"])
    if delivered != report.webhook_records:
        problems.append(
            f"counts: simulator delivered {delivered} webhooks, "
            f"MongoDB holds {report.webhook_records}"
        )
    return report


async def _check_paid(
    driver: Driver,
    store: Store,
    p: Payment,
    sent: list[dict[str, Any]],
    problems: list[str],
) -> tuple[bool, bool]:
    """One paid session: completed once, with one webhook record; every watcher got `done`.

    Returns (stored exactly once, everyone told).
    """
    tag = f"order {p.order_code}"
    before = len(problems)
    if len(sent) != 1 or not sent[0]["delivered"]:
        attempts = [d["attempts"] for d in sent]
        problems.append(f"{tag}: simulator deliveries {attempts}, want one acknowledged")
    doc = await store.sessions.find_one({"orderCode": p.order_code})
    if doc is None:
        problems.append(f"{tag}: session missing from MongoDB")
    else:
        got = (doc["status"], doc.get("amountPaid"), doc.get("references"), doc.get("version"))
        # pending (version 1) → completed (version 2) by the one update that counts it.
        want = ("completed", p.amount, [p.reference], 2)
        if got != want:
            problems.append(f"{tag}: session (status, amountPaid, references, version) {got}")
    records = await store.webhooks.find({"orderCode": p.order_code}).to_list()
    if [(r["reference"], r["amount"]) for r in records] != [(p.reference, p.amount)]:
        seen = [(r["reference"], r["amount"]) for r in records]
        problems.append(f"{tag}: webhook records {seen}, want one for {p.reference}")
    stored = len(problems) == before
    for i, w in enumerate(p.watchers):
        problems.extend(f"{tag} watcher {i}: {e}" for e in _watcher_problems(w, p))
    # The polling fallback tells the same story (from Redis, or MongoDB refilling it).
    resp = await driver.http.get(f"{driver.system.api_url}/api/webhooks", params={"uuid": p.uuid})
    if resp.status_code != 200 or resp.json().get("status") != "done":
        problems.append(f"{tag}: polling answers {resp.status_code} {resp.text[:120]}")
    return stored, stored and len(problems) == before


def _watcher_problems(w: Watcher, p: Payment) -> list[str]:
    out = []
    versions = [e.version for e in w.events]
    if any(b <= a for a, b in itertools.pairwise(versions)):
        out.append(f"versions not increasing: {versions}")
    done = [e for e in w.events if e.status == "done"]
    if len(done) != 1:
        out.append(f"{len(done)} `done` events: {w.statuses} (errors {w.errors[-3:]})")
    elif (done[0].amount, done[0].amount_paid) != (p.amount, p.amount):
        out.append(f"`done` with amount {done[0].amount}, paid {done[0].amount_paid}")
    if w.events and w.events[-1].status != "done":
        out.append(f"last event is {w.events[-1].status}")
    if not w.final:
        out.append(f"no 204 after `done` (gave up: {w.gave_up}, errors {w.errors[-3:]})")
    return out


async def _check_unpaid(
    store: Store, p: Payment, sent: list[dict[str, Any]], problems: list[str]
) -> None:
    """Nobody let in: a session never paid stays pending and nobody was told `done`."""
    tag = f"unpaid order {p.order_code}"
    if sent:
        problems.append(f"{tag}: the simulator delivered {len(sent)} webhooks")
    doc = await store.sessions.find_one({"orderCode": p.order_code})
    if doc is None or (doc["status"], doc.get("version")) != ("pending", 1):
        problems.append(f"{tag}: session is {doc and (doc['status'], doc.get('version'))}")
    for i, w in enumerate(p.watchers):
        if set(w.statuses) - {"pending"}:
            problems.append(f"{tag} watcher {i}: saw {w.statuses}")


# -- gateways, from their own endpoints ------------------------------------------------------


async def metric(http: httpx.AsyncClient, url: str, name: str) -> float:
    """A service's metric from /metrics, summed over its labels (0 when not exposed yet)."""
    text = (await http.get(f"{url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith(f"{name}_created")
    )


async def subscribed(http: httpx.AsyncClient, url: str) -> bool:
    """The gateway's /readyz says its pub/sub link is up (False while it is down or away)."""
    try:
        resp = await http.get(f"{url}/readyz", timeout=2)
    except httpx.HTTPError:
        return False
    return bool(resp.json()["checks"].get("pubsub") == "ok")


# -- crowds: thousands of browsers at once, and what they leave behind ------------------------


async def crowd_sessions(store: Store, redis: Redis, n: int, *, amount: int) -> list[Doc]:
    """`n` pending sessions stored in bulk (session-api would take minutes on the MongoDB
    stand-in) and cached, as session-api caches a session it creates."""
    docs = await store_pending_sessions(store, n, amount=amount)
    await StatusCache(redis).put_many(StatusEvent.from_session(d) for d in docs)
    return docs


async def payable(driver: Driver, doc: Doc) -> Payment:
    """A PayOS link in the simulator for a session stored without session-api, so the driver
    can pay it; the payment is the driver's (the audit checks it) with no watcher of its own."""
    settings = driver.system.settings
    body: dict[str, Any] = {
        "orderCode": doc["orderCode"],
        "amount": doc["amount"],
        "description": doc["description"],
        "cancelUrl": f"{settings.site_public_url}/",
        "returnUrl": f"{settings.site_public_url}/",
    }
    body["signature"] = sign_payment_request(body, settings.payos_checksum_key)
    resp = await driver.http.post(
        f"{driver.system.sim_url}/v2/payment-requests",
        json=body,
        headers={"x-client-id": settings.payos_client_id, "x-api-key": settings.payos_api_key},
    )
    if resp.status_code != 200 or resp.json().get("code") != "00":
        raise AssertionError(f"simulator refused the link: {resp.status_code} {resp.text[:200]}")
    payment = Payment(doc["uuid"], doc["orderCode"], doc["amount"], doc["accountNumber"])
    driver.payments.append(payment)
    return payment


def _socket_owners(processes: Sequence[Process]) -> dict[int, str]:
    """The inode of every socket one of `processes` holds → that process's name."""
    owners = {}
    for proc in processes:
        if not proc.running:
            continue
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        owners[int(target[8:-1])] = proc.name
    return owners


def _inodes_by_local_port(remote_port: int) -> dict[int, int]:
    """The local TCP port of every IPv4 socket connected to `remote_port` → its inode."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, inode = int(fields[2].rsplit(":", 1)[1], 16), int(fields[9])
        if remote == remote_port and inode:
            out[int(fields[1].rsplit(":", 1)[1], 16)] = inode
    return out


def _owners_of(
    clients: Sequence[dict[str, Any]], port: int, owners: dict[int, str], ignore: str
) -> Counter[str]:
    inodes = _inodes_by_local_port(port)
    counts: Counter[str] = Counter()
    for client in clients:
        if ignore and client.get("name") == ignore:
            continue
        local = int(str(client["addr"]).rsplit(":", 1)[1])
        counts[owners.get(inodes.get(local, -1), "?")] += 1
    return counts


async def redis_connections(
    redis: Redis | RedisCluster, system: System, *, ignore: str = ""
) -> Counter[str]:
    """Redis's CLIENT LIST counted by the process holding each connection (`Process.name`,
    the same across a restart; `?` for any other), leaving out connections named `ignore`.
    On a cluster, the sum over its primaries."""
    owners = _socket_owners(system.processes)
    if isinstance(redis, RedisCluster):
        counts: Counter[str] = Counter()
        for node in redis.get_primaries():
            clients = await redis.client_list(target_nodes=node)
            counts += _owners_of(clients, int(node.port), owners, ignore)
        return counts
    port = int(redis.connection_pool.connection_kwargs["port"])
    return _owners_of(await redis.client_list(), port, owners, ignore)


async def _subscriptions(redis: Redis | RedisCluster, uuids: Sequence[str]) -> tuple[int, int]:
    """(subscribers of the sessions' channels, session channels Redis lists), on a cluster
    summed over the primaries (sharded pub/sub: each counts its own shard's channels)."""
    pattern = f"{keys.CHANNEL_PREFIX}*"
    channels = [keys.status_channel(u) for u in uuids]
    if isinstance(redis, RedisCluster):
        subscribers = listed = 0
        for node in redis.get_primaries():
            mine = [
                c for c in channels if getattr(redis.get_node_from_key(c), "name", "") == node.name
            ]
            for i in range(0, len(mine), 1000):
                counts = await redis.pubsub_shardnumsub(*mine[i : i + 1000], target_nodes=node)
                subscribers += sum(int(n) for _, n in counts)
            listed += len(await redis.pubsub_shardchannels(pattern, target_nodes=node))
        return subscribers, listed
    subscribers = 0
    for i in range(0, len(channels), 1000):
        counts = await redis.pubsub_numsub(*channels[i : i + 1000])
        subscribers += sum(int(n) for _, n in counts)
    return subscribers, len(await redis.pubsub_channels(pattern))


async def leftovers(
    driver: Driver,
    redis: Redis | RedisCluster,
    uuids: Sequence[str],
    baseline: Counter[str] | None,
    *,
    ignore: str = "",
    more: Mapping[str, int] | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """Once every browser is gone: no stream, listener or subscription left anywhere, and no
    process holds more Redis connections than it held before (`baseline`, from
    `redis_connections`; None: not compared); `more` names processes allowed so many more.

    Waits up to `timeout` for the counts to settle; returns what is still left.
    """
    deadline = time.monotonic() + timeout
    more = more or {}
    while True:
        problems = []
        for i, url in enumerate(driver.system.gateway_urls):
            stats = (await driver.http.get(f"{url}/api/stats")).json()
            held = (stats["connectionCount"], stats["activeSubscriptions"])
            if held != (0, 0):
                problems.append(f"gateway {i}: {held[0]} streams, {held[1]} subscriptions")
        subscribers, listed = await _subscriptions(redis, uuids)
        if subscribers:
            problems.append(f"redis: {subscribers} subscribers of the sessions' channels")
        if listed:
            problems.append(f"redis: {listed} session channels listed by PUBSUB CHANNELS")
        if baseline is not None:
            connections = await redis_connections(redis, driver.system, ignore=ignore)
            for name in sorted(set(connections) | set(baseline)):
                now, before = connections[name], baseline[name]
                if now > before + more.get(name, 0):
                    problems.append(f"redis: {name} holds {now} connections, {before} before")
        if not problems or time.monotonic() > deadline:
            return problems
        await asyncio.sleep(0.2)
