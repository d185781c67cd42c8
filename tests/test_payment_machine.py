"""The counting core's interleavings, explored by hypothesis: a state machine over the real
`Payments` (shared.payments), the cleanup's expiry (session_api.cleanup) and the cancel's
close (session_api.cancel), on the MongoDB stand-in through the real driver.

Rules: a new transaction (made in time, late, with no readable time, or in another
currency), a redelivery of one seen before, several of them and a cancel or a cleanup run at
once (asyncio.gather), a session's expiry passing, the cleanup run, the shopper's cancel
(PayOS's answer lists what it took), and a process that dies at a chosen database call
(before it or right after it took effect) — its transaction is delivered again later, its
cancel closed again (the reconciler). After each step:

- amountPaid is the sum of the distinct counted transactions (each reference once, only
  transactions of this order, in VND), and the session is completed iff it is paid in full;
- version is 1 + the state changes, each with one outbox event whose version is the next;
  at most one payment.completed / session.cancelled / session.expired per session;
- a transaction counted while the session was cancelled has a paid_after_cancel item, one
  counted while it was expired was made within the grace;
- every transaction whose delivery finished is counted or is a ledger item (late, currency,
  overpaid, paid_after_cancel), and none is both counted and late or currency; the excess of
  every counted transaction beyond the amount is an overpaid item with exactly that excess;
- one ledger item per (kind, orderCode, reference), each with its needs_attention event;
- after a cleanup run, an expired or cancelled session holding part of its amount has its
  partial item.

A sequential delivery's outcome is also checked against the model's prediction from the
session as stored right before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from payos import AsyncPayOS
from payos.types import PaymentLink
from payos.types import Transaction as PayOSTransaction
from pymongo.asynchronous.collection import AsyncCollection
from redis.asyncio import Redis
from structlog.testing import capture_logs

from session_api.cancel import Cancellations
from session_api.cleanup import PARTIAL_ITEM, PARTIAL_KINDS, run_cleanup
from shared import outbox
from shared.cache import StatusCache
from shared.ledger import SESSION_REFERENCE, IssueKind, Ledger
from shared.model import SessionStatus, new_session, utcnow
from shared.mongo import Doc, Store, mongo_client
from shared.payments import VIETNAM, Outcome, Payments, Transaction
from shared.settings import Settings

GRACE = timedelta(seconds=900)
AMOUNTS = (10_000, 25_000)
# A transaction's amount as a share of its session's: a part, the rest of it, the whole, more.
SHARES = ("quarter", "half", "whole", "one_over", "over")
# When a transaction was made: now, just before the session's expiry, or unreadable.
TIMINGS = ("now", "before_expiry", "unreadable")
# How a transaction names its currency: VND, or not at all (a link is in VND), or another one.
CURRENCIES = ("VND", "", None, "USD")
# How far in the past a session's expiry is moved: within the grace, or beyond it.
PAST_EXPIRY = (timedelta(minutes=5), timedelta(hours=1))
# Database calls a crash may land on (two points each: before the call, after it).
CRASH_POINTS = 16
COUNTED = (Outcome.COMPLETED, Outcome.PARTIAL)
UNKNOWN_ORDER_CODE = 9_999


class Crash(BaseException):
    """The process dies here (BaseException: nothing in the code under test catches it)."""


class CrashPlan:
    """Where the next crash lands: at the `at`-th crossing of a database call's edges."""

    def __init__(self) -> None:
        self.at: int | None = None
        self.crossed = 0

    def arm(self, at: int) -> None:
        self.at, self.crossed = at, 0

    def disarm(self) -> None:
        self.at = None

    def cross(self) -> None:
        if self.at is None:
            return
        if self.crossed == self.at:
            self.at = None
            raise Crash
        self.crossed += 1


class CrashingCollection:
    """A collection whose calls may crash just before they are sent or right after they took
    effect (the answer lost): what a process dying between two awaits leaves behind."""

    CALLS = frozenset({"find_one", "find_one_and_update", "update_one", "insert_one"})

    def __init__(self, real: AsyncCollection[Doc], plan: CrashPlan) -> None:
        self._real = real
        self._plan = plan

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name not in self.CALLS:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self._plan.cross()
            result = await attr(*args, **kwargs)
            self._plan.cross()
            return result

        return call


def crashing_store(store: Store, plan: CrashPlan) -> Store:
    """The same database, its calls subject to `plan`."""
    crashing = Store(store.client)
    crashing.sessions = cast(AsyncCollection[Doc], CrashingCollection(store.sessions, plan))
    crashing.issues = cast(AsyncCollection[Doc], CrashingCollection(store.issues, plan))
    return crashing


@dataclass
class Tx:
    """A transaction the model knows of."""

    session: int
    tx: Transaction
    made_at: datetime | None
    vnd: bool
    # Delivered, and its last delivery finished (not cut short by a crash).
    settled: bool = False

    @property
    def reference(self) -> str:
        return self.tx.reference

    @property
    def amount(self) -> int:
        return self.tx.amount


@dataclass
class Session:
    order_code: int
    uuid: str
    amount: int
    txs: list[Tx] = field(default_factory=list)


@dataclass
class Context:
    """What every example shares: one loop, one client, one Redis (state cleared per example)."""

    loop: asyncio.AbstractEventLoop
    store: Store
    redis: Redis
    payos: AsyncPayOS


def predict(doc: Doc, tx: Tx, now: datetime) -> Outcome:
    """What delivering `tx` alone does to the session `doc` (the model, from the rules)."""
    if tx.reference in doc.get("references", ()):
        return Outcome.DUPLICATE
    if not tx.vnd:
        return Outcome.CURRENCY
    status = doc["status"]
    if status == SessionStatus.COMPLETED:
        return Outcome.OVERPAID
    live = status == SessionStatus.PENDING and doc["expiresAt"] > now
    made_late = tx.made_at is None or tx.made_at > doc["expiresAt"] + GRACE
    if status in (SessionStatus.PENDING, SessionStatus.EXPIRED) and not live and made_late:
        return Outcome.LATE
    paid = int(doc.get("amountPaid", 0)) + tx.amount
    return Outcome.COMPLETED if paid >= doc["amount"] else Outcome.PARTIAL


class PaymentMachine(RuleBasedStateMachine):
    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx
        self.store = ctx.store
        self.plan = CrashPlan()
        crashing = crashing_store(ctx.store, self.plan)
        self.cache = StatusCache(ctx.redis)
        self.payments = Payments(crashing, Ledger(crashing), grace_seconds=GRACE.total_seconds())
        self.cancels = Cancellations(
            crashing, self.cache, ctx.payos, self.payments, payos_timeout=1.0
        )
        self.sessions: list[Session] = []
        self.txs: list[Tx] = []
        self.by_reference: dict[str, Tx] = {}
        self.txs_unknown: list[str] = []
        # Cancels whose process died: PayOS cancelled the link; the reconciler closes again.
        self.unfinished_closes: list[tuple[int, PaymentLink]] = []
        self._run(self._start())

    # -- driving the loop ------------------------------------------------------------------

    def _run(self, coro: Awaitable[Any]) -> Any:
        return self.ctx.loop.run_until_complete(coro)

    async def _start(self) -> None:
        for coll in (self.store.sessions, self.store.issues):
            await coll.delete_many({})
        now = utcnow()
        for i, amount in enumerate(AMOUNTS):
            doc = new_session(
                uuid=str(uuidlib.uuid4()),
                order_code=1_000 + i,
                account_number="0001112223",
                amount=amount,
                description="NAPTIEN",
                now=now,
                ttl_seconds=86_400,
                checkout_url="https://pay.example/web/x",
            )
            await self.store.sessions.insert_one(doc)
            self.sessions.append(Session(doc["orderCode"], doc["uuid"], amount))

    def teardown(self) -> None:
        try:
            # Every example ends healed and checked: what crashed is delivered (or closed)
            # again, and a cleanup run makes its items.
            self.plan.disarm()
            for tx in self.txs:
                if not tx.settled:
                    self._run(self._deliver(tx))
            for i, link in self.unfinished_closes:
                self._run(self._close(i, link))
            self._run(run_cleanup(self.store, self.cache))
            self._run(self._check(partials=True))
        finally:
            self.plan.disarm()

    # -- the model's transactions ----------------------------------------------------------

    async def _session(self, i: int) -> Doc:
        doc = await self.store.sessions.find_one({"orderCode": self.sessions[i].order_code})
        assert doc is not None, "a session was deleted within its lifetime"
        return doc

    async def _new_tx(
        self, i: int, share: str, timing: str, vnd: bool, currency: str | None = "VND"
    ) -> Tx:
        session = self.sessions[i]
        doc = await self._session(i)
        amount = {
            "quarter": session.amount // 4,
            "half": session.amount // 2,
            "whole": session.amount,
            "one_over": session.amount + 1,
            "over": session.amount + 1_000,
        }[share]
        now = utcnow().replace(microsecond=0)
        made_at: datetime | None = {
            "now": now,
            "before_expiry": min(now, doc["expiresAt"] - timedelta(seconds=60)),
            "unreadable": None,
        }[timing]
        reference = f"FT{len(self.txs):04d}"
        data: dict[str, Any] = {
            "orderCode": session.order_code,
            "amount": amount,
            "description": "NAPTIEN",
            "accountNumber": "0123456789",
            "reference": reference,
            "transactionDateTime": (
                made_at.astimezone(VIETNAM).strftime("%Y-%m-%d %H:%M:%S") if made_at else ""
            ),
        }
        if not vnd:
            data["currency"] = "USD"
        elif currency is not None:
            data["currency"] = currency
        tx = Tx(i, Transaction(session.order_code, reference, amount, data), made_at, vnd)
        self.txs.append(tx)
        self.by_reference[reference] = tx
        session.txs.append(tx)
        return tx

    async def _deliver(self, tx: Tx) -> Outcome:
        tx.settled = False
        applied = await self.payments.apply(tx.tx)
        tx.settled = True
        return applied.outcome

    async def _close(self, i: int, link: PaymentLink) -> Doc:
        """The cancel's close (or the reconciler's, after a cancel that died)."""
        entry = (i, link)
        if entry not in self.unfinished_closes:
            self.unfinished_closes.append(entry)
        closed = await self.cancels.close(await self._session(i), link)
        self.unfinished_closes.remove(entry)
        # What PayOS listed was delivered: counted, or an item.
        for t in link.transactions:
            self.by_reference[t.reference].settled = True
        # Cancelled, or paid; or expired meanwhile, when a cancel that died is closed later.
        assert closed["status"] != SessionStatus.PENDING, closed
        return closed

    async def _cancel_link(self, i: int, data: st.DataObject) -> PaymentLink | None:
        """PayOS's answer to the cancel of a session still live (None: not cancellable): the
        link CANCELLED with what PayOS took on it — some of the session's transfers, perhaps
        one whose webhook has not come yet."""
        doc = await self._session(i)
        took = [t for t in self.sessions[i].txs if t.vnd]
        listed = (
            data.draw(st.lists(st.sampled_from(took), unique_by=lambda t: t.reference))
            if took
            else []
        )
        if data.draw(st.booleans(), label="a transfer PayOS took whose webhook is yet to come"):
            listed.append(await self._new_tx(i, data.draw(st.sampled_from(SHARES)), "now", True))
        if doc["status"] != SessionStatus.PENDING or doc["expiresAt"] <= utcnow():
            return None
        for t in listed:
            t.settled = False
        return PaymentLink(
            id="link",
            order_code=self.sessions[i].order_code,
            amount=self.sessions[i].amount,
            amount_paid=0,
            amount_remaining=self.sessions[i].amount,
            status="CANCELLED",
            created_at=utcnow().isoformat(),
            transactions=[
                PayOSTransaction(
                    reference=t.reference,
                    amount=t.amount,
                    account_number="0123456789",
                    description="NAPTIEN",
                    transaction_date_time=t.tx.data["transactionDateTime"],
                )
                for t in listed
            ],
        )

    # -- rules -----------------------------------------------------------------------------

    @rule(
        i=st.integers(0, len(AMOUNTS) - 1),
        share=st.sampled_from(SHARES),
        timing=st.sampled_from(TIMINGS),
        currency=st.sampled_from(CURRENCIES),
    )
    def pay(self, i: int, share: str, timing: str, currency: str | None) -> None:
        async def go() -> None:
            tx = await self._new_tx(i, share, timing, currency != "USD", currency)
            await self._deliver_predicted(tx)

        self._run(go())

    @rule()
    def pay_for_no_session(self) -> None:
        """A transfer whose orderCode no session has: an unknown_order item, nothing else."""

        async def go() -> None:
            reference = f"FT{len(self.txs):04d}-unknown"
            self.txs_unknown.append(reference)
            tx = Transaction(UNKNOWN_ORDER_CODE, reference, 5_000, {"reference": reference})
            applied = await self.payments.apply(tx)
            assert (applied.outcome, applied.session, applied.changed) == (
                "unknown_order",
                None,
                False,
            )
            again = await self.payments.apply(tx)
            assert again.outcome == "unknown_order"

        self._run(go())

    @rule(data=st.data())
    def deliver_again(self, data: st.DataObject) -> None:
        if not self.txs:
            return
        tx = data.draw(st.sampled_from(self.txs))
        self._run(self._deliver_predicted(tx))

    async def _deliver_predicted(self, tx: Tx) -> None:
        before = await self._session(tx.session)
        now = utcnow()
        tx.settled = False
        applied = await self.payments.apply(tx.tx, now=now)
        tx.settled = True
        expected = predict(before, tx, now)
        # By value: what the ingest answers PayOS and counts in its metrics.
        assert applied.outcome == expected.value, (tx.reference, before, applied.outcome)
        assert applied.session is not None and applied.session["_id"] == before["_id"]
        after = await self._session(tx.session)
        counted = applied.outcome in COUNTED
        assert applied.changed is counted
        assert after["amountPaid"] == before["amountPaid"] + (tx.amount if counted else 0)
        assert after["version"] == before["version"] + (1 if counted else 0)

    @rule(data=st.data(), n=st.integers(2, 4))
    def at_once(self, data: st.DataObject, n: int) -> None:
        """Several deliveries, and perhaps a cancel or a cleanup run, at the same time."""

        async def go() -> None:
            # What to start, decided first: nothing is started that a failed draw would leave
            # unawaited.
            jobs: list[Callable[[], Awaitable[Any]]] = []
            for _ in range(n):
                kind = data.draw(st.sampled_from(("new", "again", "again", "cancel", "cleanup")))
                i = data.draw(st.integers(0, len(AMOUNTS) - 1))
                if kind == "new" or (kind == "again" and not self.txs):
                    share = data.draw(st.sampled_from(SHARES))
                    timing = data.draw(st.sampled_from(TIMINGS))
                    jobs.append(partial(self._deliver, await self._new_tx(i, share, timing, True)))
                elif kind == "again":
                    jobs.append(partial(self._deliver, data.draw(st.sampled_from(self.txs))))
                elif kind == "cancel":
                    link = await self._cancel_link(i, data)
                    if link is not None:
                        jobs.append(partial(self._close, i, link))
                else:
                    jobs.append(partial(run_cleanup, self.store, self.cache))
            await asyncio.gather(*(job() for job in jobs))

        self._run(go())

    @rule(i=st.integers(0, len(AMOUNTS) - 1), past=st.sampled_from(PAST_EXPIRY))
    def expiry_passes(self, i: int, past: timedelta) -> None:
        """The session's expiry is now in the past (the whole document replaced: the stand-in
        stores a `$set` datetime as text, shared.mongo)."""

        async def go() -> None:
            doc = await self._session(i)
            now = utcnow()
            # Once: moving a past expiry further back would make a payment counted in time
            # (within the grace of the expiry it had then) look late, which no clock does.
            if now < doc["expiresAt"]:
                when = now - past
                await self.store.sessions.replace_one(
                    {"_id": doc["_id"], "version": doc["version"]}, {**doc, "expiresAt": when}
                )

        self._run(go())

    @rule()
    def cleanup_runs(self) -> None:
        self._run(run_cleanup(self.store, self.cache))
        self._run(self._check(partials=True))

    @rule(i=st.integers(0, len(AMOUNTS) - 1), data=st.data())
    def cancel(self, i: int, data: st.DataObject) -> None:
        async def go() -> None:
            link = await self._cancel_link(i, data)
            if link is not None:
                await self._close(i, link)

        self._run(go())

    @rule(data=st.data(), at=st.integers(0, CRASH_POINTS - 1))
    def crash(self, data: st.DataObject, at: int) -> None:
        """A delivery, or a cancel's close, whose process dies at its `at`-th crossing of a
        database call: before it is sent (even), or after it took effect (odd)."""

        async def go() -> None:
            what = data.draw(st.sampled_from(("new", "again", "cancel")))
            i = data.draw(st.integers(0, len(AMOUNTS) - 1))
            job: Callable[[], Awaitable[Any]]
            if what == "cancel":
                link = await self._cancel_link(i, data)
                if link is None:
                    return
                job = partial(self._close, i, link)
            elif what == "again" and self.txs:
                job = partial(self._deliver, data.draw(st.sampled_from(self.txs)))
            else:
                share = data.draw(st.sampled_from(SHARES))
                timing = data.draw(st.sampled_from(TIMINGS))
                job = partial(self._deliver, await self._new_tx(i, share, timing, True))
            self.plan.arm(at)
            try:
                await job()
            except Crash:
                pass
            finally:
                self.plan.disarm()

        self._run(go())

    @rule(data=st.data())
    def reconciler_closes(self, data: st.DataObject) -> None:
        """The reconciler finds a link PayOS cancelled whose cancel died, and closes it."""
        if not self.unfinished_closes:
            return
        i, link = data.draw(st.sampled_from(self.unfinished_closes))
        self._run(self._close(i, link))

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        self._run(self._check(partials=False))

    async def _check(self, *, partials: bool) -> None:
        items = [doc async for doc in self.store.issues.find({})]
        keys = Counter((d["kind"], d["orderCode"], d["reference"]) for d in items)
        assert all(n == 1 for n in keys.values()), f"ledger items twice: {keys}"
        by_key = {(d["kind"], d["orderCode"], d["reference"]): d for d in items}
        for d in items:
            events = [outbox.parse(e) for e in d.get(outbox.OUTBOX, ())]
            assert [(e["type"], e["data"]["kind"]) for e in events] == [
                (outbox.EventType.NEEDS_ATTENTION.value, d["kind"])
            ], d
        unknown = {r for (kind, oc, r) in keys if oc == UNKNOWN_ORDER_CODE}
        assert unknown == set(self.txs_unknown), unknown
        for d in items:
            self._check_item(d)
        for i, session in enumerate(self.sessions):
            doc = await self._session(i)
            self._check_session(session, doc, by_key, partials=partials)

    def _check_item(self, d: Doc) -> None:
        """Each item is justified by the session as it was when the item was made."""
        kind, snapshot = d["kind"], d["session"]
        if kind == IssueKind.UNKNOWN_ORDER:
            assert (snapshot, d["uuid"], d["source"]) == (None, None, "webhook"), d
            return
        session = self.sessions[d["orderCode"] - 1_000]
        assert d["uuid"] == snapshot["uuid"] == session.uuid, d
        if kind in (IssueKind.PARTIAL_EXPIRED, IssueKind.PARTIAL_CANCELLED):
            assert d["source"] in ("cancel", "cleanup"), d
            closed_as = {
                IssueKind.PARTIAL_EXPIRED: SessionStatus.EXPIRED,
                IssueKind.PARTIAL_CANCELLED: SessionStatus.CANCELLED,
            }
            assert snapshot["status"] == closed_as[kind], d
            assert 0 < d["amount"] == snapshot["amountPaid"] < snapshot["amount"], d
            return
        tx = self.by_reference[d["reference"]]
        assert d["source"] in ("webhook", "cancel"), d
        assert d["amount"] == tx.amount, d
        if d["source"] == "webhook":
            assert d["data"] == tx.tx.data, d
        if kind == IssueKind.CURRENCY:
            assert not tx.vnd, d
        elif kind == IssueKind.LATE:
            assert tx.vnd and snapshot["status"] in ("pending", "expired"), d
            assert tx.made_at is None or tx.made_at > snapshot["expiresAt"] + GRACE, d
        elif kind == IssueKind.PAID_AFTER_CANCEL:
            assert tx.vnd and snapshot["status"] == SessionStatus.CANCELLED, d
        else:
            assert kind == IssueKind.OVERPAID and tx.vnd, d
            assert 0 < d["excess"] <= tx.amount, d

    def _check_session(
        self,
        session: Session,
        doc: Doc,
        by_key: dict[tuple[str, int, str], Doc],
        *,
        partials: bool,
    ) -> None:
        oc = session.order_code

        def item(kind: IssueKind, reference: str) -> Doc | None:
            return by_key.get((kind.value, oc, reference))

        refs: list[str] = list(doc.get("references", ()))
        assert len(refs) == len(set(refs)), f"a reference counted twice: {refs}"
        for r in refs:
            tx = self.by_reference[r]
            assert tx.tx.order_code == oc and tx.vnd, f"{r} counted on the wrong session"
        amounts = [self.by_reference[r].amount for r in refs]
        assert doc["amountPaid"] == sum(amounts), doc
        assert list(doc.get("paidAmounts", ())) == amounts, doc
        paid_in_full = doc["amountPaid"] >= doc["amount"]
        assert (doc["status"] == SessionStatus.COMPLETED) is paid_in_full, doc

        # The outbox: one event per state change, versions 2, 3, ... in order.
        events = [outbox.parse(e) for e in doc.get(outbox.OUTBOX, ())]
        assert doc.get(outbox.OUTBOX_PENDING, 0) == len(events)
        assert [e["data"]["version"] for e in events] == list(range(2, doc["version"] + 1))
        types = Counter(e["type"] for e in events)
        for once in (
            outbox.EventType.COMPLETED,
            outbox.EventType.CANCELLED,
            outbox.EventType.EXPIRED,
        ):
            assert types[once.value] <= 1, f"{once} twice: {events}"
        assert len({e["id"] for e in events}) == len(events)
        status, closed_with = SessionStatus.PENDING.value, 0
        seen: list[str] = []
        for e in events:
            data = e["data"]
            assert data["references"][: len(seen)] == seen, events
            new = data["references"][len(seen) :]
            assert data["amountPaid"] == sum(
                self.by_reference[r].amount for r in data["references"]
            )
            if e["type"] == outbox.EventType.PARTIAL:
                assert len(new) == 1 and data["reference"] == new[0]
                assert data["status"] == status and data["amountPaid"] < doc["amount"]
            elif e["type"] == outbox.EventType.COMPLETED:
                assert len(new) <= 1 and data["status"] == SessionStatus.COMPLETED
            else:
                assert new == [] and status == SessionStatus.PENDING, events
            for r in new:
                tx = self.by_reference[r]
                if status == SessionStatus.CANCELLED:
                    assert item(IssueKind.PAID_AFTER_CANCEL, r), f"{r}: paid after cancel, no item"
                if status == SessionStatus.EXPIRED:
                    assert tx.made_at is not None
                    assert tx.made_at <= doc["expiresAt"] + GRACE, f"{r} counted late"
            if e["type"] in (outbox.EventType.CANCELLED, outbox.EventType.EXPIRED):
                closed_with = data["amountPaid"]
            status, seen = data["status"], data["references"]
        assert (status, seen) == (doc["status"], refs), (events, doc)

        # Money never forgotten: each delivered transaction is counted or an item, and what a
        # counted one paid beyond the amount is an overpaid item with that excess.
        total = 0
        for r in refs:
            before, total = total, total + self.by_reference[r].amount
            excess = max(0, total - max(before, doc["amount"]))
            over = item(IssueKind.OVERPAID, r)
            if excess == 0:
                assert over is None, (r, over)
            elif self.by_reference[r].settled:
                assert over is not None and over["excess"] == excess, (r, over, excess)
            for kind in (IssueKind.LATE, IssueKind.CURRENCY):
                assert item(kind, r) is None, f"{r} counted and a {kind} item"
        for tx in session.txs:
            if tx.settled and tx.reference not in refs:
                kinds = [
                    kind
                    for kind in (
                        IssueKind.LATE,
                        IssueKind.CURRENCY,
                        IssueKind.OVERPAID,
                        IssueKind.PAID_AFTER_CANCEL,
                    )
                    if item(kind, tx.reference)
                ]
                assert kinds, f"{tx.reference} neither counted nor an item"

        # Closed unpaid with money on it: the shopper's money is an item. What was paid
        # before the close is a partial item; what a cancelled session took after it is a
        # paid_after_cancel item each (above); what an expired one took within the grace
        # leaves it expired with money on it, a partial item as well.
        closed = doc["status"] in PARTIAL_KINDS and doc["amountPaid"] < doc["amount"]
        if partials and closed and doc["amountPaid"] > 0:
            paid_before_close = closed_with > 0
            if paid_before_close or doc["status"] == SessionStatus.EXPIRED:
                kind = PARTIAL_KINDS[doc["status"]]
                assert item(kind, SESSION_REFERENCE), f"{doc['status']} with money, no item: {doc}"
                assert doc.get(PARTIAL_ITEM), doc


@contextlib.contextmanager
def context(test_settings: Settings) -> Iterator[Context]:
    loop = asyncio.new_event_loop()
    store = Store(mongo_client(test_settings))
    redis = Redis.from_url(test_settings.redis_url)
    payos = AsyncPayOS("client", "key", "checksum", base_url="http://127.0.0.1:9", max_retries=0)
    try:
        loop.run_until_complete(store.ensure_indexes())
        yield Context(loop, store, redis, payos)
    finally:
        # What a failing or crashed example left running (a sibling of a failed gather, a
        # cancel's close) ends before the clients close: no connection outlives the loop.
        leftover = asyncio.all_tasks(loop)
        for task in leftover:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.run_until_complete(store.client.drop_database(store.db.name))
        loop.run_until_complete(store.client.close())
        loop.run_until_complete(redis.aclose())
        loop.run_until_complete(payos.aclose())
        loop.close()


def run_machine(test_settings: Settings, max_examples: int, steps: int) -> None:
    """Explore `max_examples` runs of up to `steps` rules each."""
    with context(test_settings) as ctx, capture_logs():
        run_state_machine_as_test(
            # A factory, as hypothesis allows (its annotation says a class).
            lambda: PaymentMachine(ctx),  # type: ignore[arg-type]
            settings=settings(
                max_examples=max_examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


@pytest.mark.timeout(600)
def test_the_counting_core_keeps_its_invariants(
    settings: Settings, request: pytest.FixtureRequest
) -> None:
    # Bounded here; `make faults` explores far more (tests/faults/test_payment_machine_long.py).
    runs = int(request.config.getoption("--payment-machine-runs"))
    run_machine(settings, max_examples=runs, steps=20)
