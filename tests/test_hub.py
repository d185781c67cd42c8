"""The hub's parts one at a time, over the pub/sub model of tests/hub_model.py: a stream's
inbox (`Listener`), batching of commands and re-reads, and what a bad event does.

The interleavings of all of them together are tests/test_hub_machine.py's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence

import pytest
from prometheus_client import CollectorRegistry
from pymongo.errors import PyMongoError

from shared.model import StatusEvent
from shared.tasks import Supervisor
from stream_gateway import hub as hub_module
from stream_gateway.hub import Hub, Listener
from stream_gateway.links import Message
from stream_gateway.metrics import GatewayMetrics
from tests.hub_model import FakeLink, FakeReader, FakeRedis, event


class Inbox:
    """What a listener wrote, as (version, pushed); `end_at` ends the stream at that version."""

    def __init__(self, end_at: int | None = None) -> None:
        self.sent: list[tuple[int, bool]] = []
        self.end_at = end_at
        self.gate: asyncio.Event | None = None

    async def send(self, ev: StatusEvent, pushed: bool) -> bool:
        if self.gate is not None:
            await self.gate.wait()
        self.sent.append((ev.version, pushed))
        return ev.version == self.end_at


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_listener_queues_only_versions_newer_than_it_has() -> None:
    listener = Listener("s0", after_version=2)
    assert listener.offer(event("s0", 2)) is False
    assert listener.offer(event("s0", 3)) is True
    assert listener.offer(event("s0", 3)) is False
    assert listener.offer(event("s0", 1)) is False
    assert listener.pending == 1


async def test_a_listener_keeps_the_newest_events_up_to_its_queue_size() -> None:
    listener = Listener("s0")
    for version in range(1, hub_module.QUEUE_SIZE + 5):
        listener.offer(event("s0", version), pushed=True)
    assert listener.pending == hub_module.QUEUE_SIZE == 8
    inbox = Inbox()
    listener.attach(inbox.send)
    await settle()
    assert inbox.sent == [(v, True) for v in range(5, 13)]
    assert listener.pending == 0


async def test_a_pushed_event_also_read_before_it_was_written_counts_as_read() -> None:
    listener = Listener("s0")
    listener.offer(event("s0", 1), pushed=True)
    listener.offer(event("s0", 2), pushed=True)
    listener.offer(event("s0", 2))  # the read's answer: the same version as the newest queued
    inbox = Inbox()
    listener.attach(inbox.send)
    await settle()
    assert inbox.sent == [(1, True), (2, False)]


async def test_reading_an_older_version_leaves_the_queued_push_a_push() -> None:
    listener = Listener("s0")
    listener.offer(event("s0", 1), pushed=True)
    listener.offer(event("s0", 2), pushed=True)
    listener.offer(event("s0", 1))  # older than the newest queued: changes nothing
    inbox = Inbox()
    listener.attach(inbox.send)
    await settle()
    assert inbox.sent == [(1, True), (2, True)]


async def test_a_listener_writes_in_order_and_stops_when_the_stream_ends() -> None:
    listener = Listener("s0")
    inbox = Inbox(end_at=2)
    listener.attach(inbox.send)
    for version in (1, 2, 3):
        listener.offer(event("s0", version))
    await settle()
    assert inbox.sent == [(1, False), (2, False)]
    assert listener.offer(event("s0", 4)) is False
    await settle()
    assert inbox.sent == [(1, False), (2, False)]


async def test_closing_a_listener_stops_its_write_and_refuses_more() -> None:
    listener = Listener("s0")
    inbox = Inbox()
    inbox.gate = asyncio.Event()
    listener.attach(inbox.send)
    listener.offer(event("s0", 1))
    await settle()
    await listener.close()
    inbox.gate.set()
    await settle()
    assert inbox.sent == []
    assert listener.offer(event("s0", 2)) is False


async def test_closing_a_listener_returns_once_its_write_has_stopped() -> None:
    listener = Listener("s0")
    stopped = asyncio.Event()

    async def send(ev: StatusEvent, pushed: bool) -> bool:
        try:
            await asyncio.Event().wait()  # a client that reads nothing
        finally:
            stopped.set()
        return False

    listener.attach(send)
    listener.offer(event("s0", 1))
    await settle()
    await listener.close()
    assert stopped.is_set()


async def test_a_listener_closed_from_its_own_write_does_not_wait_for_itself() -> None:
    listener = Listener("s0")

    written: list[int] = []

    async def send(ev: StatusEvent, pushed: bool) -> bool:
        written.append(ev.version)
        await listener.close()
        return False

    listener.attach(send)
    listener.offer(event("s0", 1))
    listener.offer(event("s0", 2))
    await asyncio.wait_for(settle(), 1)
    assert written == [1]  # the second was never written...
    assert listener.pending == 0  # ...and closing dropped it (a closed stream holds nothing)


async def test_a_stream_writes_what_is_queued_in_its_own_task_then_what_comes_later() -> None:
    listener = Listener("s0")
    listener.offer(event("s0", 1))
    listener.offer(event("s0", 2), pushed=True)
    inbox = Inbox()
    await listener.start(inbox.send)
    # Written before start returned: by the stream's handler, no task of its own.
    assert inbox.sent == [(1, False), (2, True)]
    assert listener.pending == 0
    listener.offer(event("s0", 3), pushed=True)
    await settle()
    assert inbox.sent == [(1, False), (2, True), (3, True)]


async def test_a_stream_that_ends_while_writing_its_queue_writes_nothing_after() -> None:
    listener = Listener("s0")
    for version in (1, 2, 3):
        listener.offer(event("s0", version))
    inbox = Inbox(end_at=1)
    await listener.start(inbox.send)
    await settle()
    assert inbox.sent == [(1, False)]
    assert listener.offer(event("s0", 4)) is False


async def test_a_listener_that_never_wrote_closes_at_once() -> None:
    listener = Listener("s0")
    listener.offer(event("s0", 1))
    await asyncio.wait_for(listener.close(), 1)
    assert listener.pending == 0
    assert listener.offer(event("s0", 2)) is False


async def test_a_hub_never_started_stops_cleanly() -> None:
    """An app whose start-up failed before the hub started still runs its cleanup."""
    rig = Rig()
    await asyncio.wait_for(rig.hub.stop(), 1)
    assert rig.hub.subscription_count == 0


class CountingLink(FakeLink):
    def __init__(self, server: FakeRedis, commands: list[tuple[str, int]]) -> None:
        super().__init__(server)
        self.commands = commands

    async def subscribe(self, uuids: Iterable[str]) -> None:
        batch = list(uuids)
        self.commands.append(("subscribe", len(batch)))
        await super().subscribe(batch)

    async def unsubscribe(self, uuids: Iterable[str]) -> None:
        batch = list(uuids)
        self.commands.append(("unsubscribe", len(batch)))
        await super().unsubscribe(batch)


class BatchReader(FakeReader):
    """Records each batch; `gate` holds reads; `fail` makes that many reads fail."""

    def __init__(self, server: FakeRedis) -> None:
        super().__init__(server)
        self.batches: list[int] = []
        self.gate: asyncio.Event | None = None
        self.fail = 0
        self.inflight = 0
        self.most_inflight = 0

    async def read_fresh(self, uuids: Sequence[str]) -> dict[str, StatusEvent]:
        self.batches.append(len(uuids))
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail > 0:
                self.fail -= 1
                raise PyMongoError("MongoDB unavailable")
            return await super().read_fresh(uuids)
        finally:
            self.inflight -= 1


class Rig:
    def __init__(
        self,
        link_class: type[CountingLink] = CountingLink,
        reader_class: type[BatchReader] = BatchReader,
    ) -> None:
        self.link_class = link_class
        self.server = FakeRedis()
        self.commands: list[tuple[str, int]] = []
        self.reader = reader_class(self.server)
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics.create(self.registry)
        self.supervisor = Supervisor(self.registry)
        self.hub = Hub(self.open_link, self.reader, self.metrics, self.supervisor)

    def restarts(self) -> float:
        """Deaths of the hub's tasks: a lost link is the reader's to handle, not a death."""
        return sum(
            sample.value
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == "paypush_task_restarts_total"
        )

    def open_link(self) -> FakeLink:
        link = self.link_class(self.server, self.commands)
        self.server.links.append(link)
        return link

    async def until(self, check: object, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():  # type: ignore[operator]
                await asyncio.sleep(0.005)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig()
    rig.hub.start()
    await rig.until(lambda: rig.hub.connected)
    yield rig
    await rig.hub.stop()
    assert rig.restarts() == 0


async def test_many_streams_at_once_are_subscribed_in_commands_of_500(rig: Rig) -> None:
    listeners = [Listener(f"u{i}") for i in range(1_001)]
    await asyncio.gather(*(rig.hub.join(listener) for listener in listeners))
    assert rig.hub.subscription_count == 1_001
    assert sorted(n for kind, n in rig.commands if kind == "subscribe") == [1, 500, 500]
    for listener in listeners:
        rig.hub.leave(listener)
    await rig.until(lambda: sum(n for k, n in rig.commands if k == "unsubscribe") == 1_001)
    assert sorted(n for kind, n in rig.commands if kind == "unsubscribe") == [1, 500, 500]
    assert rig.hub.subscription_count == 0


async def test_streams_joining_one_after_another_share_the_next_command(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect storm's streams arrive a few per loop turn: after a command the flusher
    lets the next ones gather, so they go out together, not ~3 per SUBSCRIBE."""
    monkeypatch.setattr(hub_module, "FLUSH_GATHER_SECONDS", 0.2)
    first = asyncio.create_task(rig.hub.join(Listener("first")))
    joins = []
    for i in range(9):
        await asyncio.sleep(0)  # each in a loop turn of its own
        joins.append(asyncio.create_task(rig.hub.join(Listener(f"next{i}"))))
    await asyncio.gather(first, *joins)
    assert rig.commands == [("subscribe", 1), ("subscribe", 9)]


async def test_a_lone_stream_is_subscribed_at_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gathering follows a command, never precedes one: after a quiet moment, a join's
    SUBSCRIBE goes out within a few loop turns, not after a pause."""
    monkeypatch.setattr(hub_module, "FLUSH_GATHER_SECONDS", 0.2)
    await rig.hub.join(Listener("earlier"))
    await asyncio.sleep(0.3)  # the gathering after the earlier command is over
    rig.commands.clear()
    join = asyncio.create_task(rig.hub.join(Listener("lone")))
    await settle()
    assert rig.commands == [("subscribe", 1)]
    assert join.done()


async def test_after_a_reconnect_every_stream_is_read_again_in_batches_of_500(rig: Rig) -> None:
    listeners = [Listener(f"u{i}") for i in range(1_001)]
    await asyncio.gather(*(rig.hub.join(listener) for listener in listeners))
    rig.reader.batches.clear()
    assert rig.server.current is not None
    rig.server.current.drop()
    await rig.until(
        lambda: (rig.registry.get_sample_value("paypush_stream_resync_reads_total") or 0) >= 1_001
    )
    assert sorted(rig.reader.batches) == [1, 500, 500]


async def test_a_bad_event_on_the_link_is_skipped_and_the_next_one_delivered(rig: Rig) -> None:
    listener = Listener("s0")
    inbox = Inbox()
    listener.attach(inbox.send)
    await rig.hub.join(listener)
    link = rig.server.current
    assert link is not None
    link.inbox.put_nowait(Message("message", "s0", b"not json"))
    rig.server.publish("s0")
    await rig.until(lambda: inbox.sent)
    assert inbox.sent == [(1, True)]


async def test_a_stream_that_leaves_is_no_longer_held(rig: Rig) -> None:
    listener, other = Listener("s0"), Listener("s0")
    await rig.hub.join(listener)
    await rig.hub.join(other)
    assert rig.hub.holds(listener) and rig.hub.subscription_count == 1
    rig.hub.leave(listener)
    rig.hub.leave(listener)  # twice: nothing more happens
    assert not rig.hub.holds(listener) and rig.hub.holds(other)
    assert rig.hub.subscription_count == 1
    rig.hub.leave(other)
    assert rig.hub.subscription_count == 0


async def test_a_link_that_fails_to_open_is_retried_with_a_doubling_jittered_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bounds: list[float] = []

    class Jitter:
        """Records each backoff's bound and waits nothing (full jitter: uniform(0, bound))."""

        @staticmethod
        def uniform(low: float, high: float) -> float:
            assert low == 0
            bounds.append(high)
            return 0.0

    monkeypatch.setattr(hub_module, "random", Jitter)
    rig = Rig()
    rig.server.fail_opens = 9
    rig.hub.start()
    try:
        await rig.until(lambda: rig.hub.connected)
        assert bounds == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
        # A link that lived shorter than STABLE_LINK_SECONDS: the backoff goes on growing.
        link = rig.server.current
        assert link is not None
        link.drop()
        await rig.until(lambda: rig.hub.connected and rig.server.current not in (None, link))
        assert bounds[9:] == [5.0]
    finally:
        await rig.hub.stop()
    assert rig.restarts() == 0


async def test_a_reconnect_reads_again_at_most_four_batches_at_a_time(rig: Rig) -> None:
    await asyncio.gather(*(rig.hub.join(Listener(f"u{i}")) for i in range(2_100)))
    rig.reader.gate = asyncio.Event()
    rig.reader.batches.clear()
    assert rig.server.current is not None
    rig.server.current.drop()
    await rig.until(lambda: rig.reader.inflight == 4)
    await settle()
    assert rig.reader.most_inflight == 4
    rig.reader.gate.set()
    await rig.until(lambda: sum(rig.reader.batches) >= 2_100)
    assert sorted(rig.reader.batches) == [100, 500, 500, 500, 500]


async def test_a_failed_re_read_is_tried_again(rig: Rig) -> None:
    listener = Listener("s0")
    inbox = Inbox()
    listener.attach(inbox.send)
    await rig.hub.join(listener)
    rig.server.versions["s0"] = 3  # changed while the link was down: only a read tells
    rig.reader.fail = 1
    assert rig.server.current is not None
    rig.server.current.drop()
    await rig.until(lambda: inbox.sent, timeout=10)
    assert inbox.sent == [(3, False)]
    assert rig.reader.fail == 0


async def test_a_failing_re_read_is_retried_after_a_pause_not_in_a_busy_loop(
    rig: Rig,
) -> None:
    await rig.hub.join(Listener("s0"))
    rig.reader.batches.clear()
    rig.reader.fail = 1_000_000  # MongoDB away
    assert rig.server.current is not None
    rig.server.current.drop()
    await rig.until(lambda: rig.reader.batches)
    # A fifth of REREAD_RETRY_SECONDS (1 s): a busy loop would have read hundreds of times.
    await asyncio.sleep(0.2)
    assert rig.reader.batches == [1]
    rig.reader.fail = 0
    await rig.until(lambda: len(rig.reader.batches) == 2, timeout=5)


async def test_the_hub_says_whether_it_is_connected_and_counts_its_connections(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "BACKOFF_MAX", 0.05)  # retry quickly while Redis is away

    def connects() -> float:
        return rig.registry.get_sample_value("paypush_stream_pubsub_connects_total") or 0

    assert rig.hub.connected and connects() == 1
    rig.server.fail_opens = 1_000_000
    link = rig.server.current
    assert link is not None
    link.drop()
    await rig.until(lambda: not rig.hub.connected)
    rig.server.fail_opens = 0
    await rig.until(lambda: rig.hub.connected)
    assert connects() == 2


async def come_and_go_unconfirmed(rig: Rig, link: FakeLink, uuid: str = "s0") -> None:
    """A stream joins and leaves before Redis processed its SUBSCRIBE (the server is slow):
    its SUBSCRIBE and UNSUBSCRIBE are both in flight."""
    held = len(link.held)
    brief = asyncio.create_task(rig.hub.join(Listener(uuid)))
    await rig.until(lambda: len(link.held) == held + 1)
    brief.cancel()  # the browser left during its join
    await asyncio.gather(brief, return_exceptions=True)
    await rig.until(lambda: len(link.held) == held + 2)


@pytest.mark.parametrize("rounds", [1, 2], ids=["three commands", "five commands"])
async def test_a_join_waits_for_the_last_of_the_commands_in_flight_for_its_channel(
    rig: Rig, rounds: int
) -> None:
    # SUBSCRIBE and UNSUBSCRIBE for each stream that came and went, then the SUBSCRIBE of
    # the one that stays, all in flight: its join returns only once Redis has processed the
    # last of them.
    link = rig.server.current
    assert link is not None
    rig.server.slow = True
    for _ in range(rounds):
        await come_and_go_unconfirmed(rig, link)
    commands = 2 * rounds + 1
    staying = asyncio.create_task(rig.hub.join(Listener("s0")))
    await rig.until(lambda: len(link.held) == commands)
    for _ in range(commands - 1):
        link._process(*link.held.pop(0))
        await settle()
        assert not staying.done()
    link._process(*link.held.pop(0))
    await asyncio.wait_for(staying, 1)
    assert link.subscribed == {"s0"}


async def test_a_stream_joining_a_channel_already_subscribed_does_not_wait(rig: Rig) -> None:
    await rig.hub.join(Listener("s0"))
    rig.server.slow = True  # nothing more would be confirmed: the join must not need to be
    await asyncio.wait_for(rig.hub.join(Listener("s0")), 0.5)


async def test_a_join_waiting_on_a_link_that_ends_returns_at_once(rig: Rig) -> None:
    # The next link re-reads every stream: waiting out the confirmation timeout (2 s) for a
    # link that is gone would only delay the stream's first read.
    link = rig.server.current
    assert link is not None
    rig.server.slow = True
    joining = asyncio.create_task(rig.hub.join(Listener("s0")))
    await rig.until(lambda: len(link.held) == 1)
    link.drop()
    await asyncio.wait_for(joining, 1.0)


async def test_the_hub_runs_its_three_tasks_under_the_names_health_reports(rig: Rig) -> None:
    # Operators read these names in /healthz and in paypush_task_restarts_total.
    assert rig.supervisor.states() == {
        "hub-reader": "running",
        "hub-flusher": "running",
        "hub-reread": "running",
    }


async def test_a_stopped_hub_says_it_is_closing() -> None:
    rig = Rig()
    rig.hub.start()
    await rig.until(lambda: rig.hub.connected)
    assert not rig.hub.closing
    await rig.hub.stop()
    assert rig.hub.closing


async def test_the_last_stream_of_a_session_leaving_twice_changes_nothing(rig: Rig) -> None:
    listener = Listener("s0")
    await rig.hub.join(listener)
    rig.hub.leave(listener)
    rig.hub.leave(listener)
    assert rig.hub.subscription_count == 0 and not rig.hub.holds(listener)
    await rig.until(lambda: rig.commands.count(("unsubscribe", 1)) == 1)
    await settle()
    assert rig.commands == [("subscribe", 1), ("unsubscribe", 1)]


async def test_a_stream_that_comes_and_goes_before_the_flusher_runs_costs_no_command(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "CONFIRM_TIMEOUT", 0.1)
    told = Listener("told")
    await rig.hub.join(told)
    rig.commands.clear()
    # The flusher is busy (a SUBSCRIBE stuck in a full socket buffer) while one stream leaves
    # and another comes back on a channel already subscribed, and a stream joins and leaves a
    # new one: once free, it has nothing more to say.
    rig.server.stall = asyncio.Event()
    busy = asyncio.create_task(rig.hub.join(Listener("busy")))
    await rig.until(lambda: rig.commands == [("subscribe", 1)])
    rig.hub.leave(told)
    await rig.hub.join(Listener("told"))
    gone = Listener("never")
    brief = asyncio.create_task(rig.hub.join(gone))
    await rig.until(lambda: rig.hub.subscription_count == 3)
    rig.hub.leave(gone)
    rig.server.release()
    await asyncio.gather(busy, brief)
    await settle()
    assert rig.commands == [("subscribe", 1)]
    assert rig.server.current is not None
    assert rig.server.current.subscribed == {"told", "busy"}


async def test_once_closing_the_hub_sends_no_command(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "CONFIRM_TIMEOUT", 0.1)
    listener = Listener("s0")
    await rig.hub.join(listener)
    rig.commands.clear()
    rig.hub.closing = True  # what the app does first on shutdown
    rig.hub.leave(listener)
    await asyncio.wait_for(rig.hub.join(Listener("s1")), 1)
    await settle()
    assert rig.commands == []


async def test_a_join_while_redis_is_unreachable_returns_at_once(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing can be confirmed while there is no link: the next link re-reads the stream, so
    # waiting out the confirmation timeout would only delay its first read.
    monkeypatch.setattr(hub_module, "BACKOFF_MIN", 10.0)
    monkeypatch.setattr(hub_module, "BACKOFF_MAX", 10.0)
    rig.server.fail_opens = 1_000_000
    link = rig.server.current
    assert link is not None
    link.drop()
    await rig.until(lambda: not rig.hub.connected)
    await asyncio.wait_for(rig.hub.join(Listener("s0")), 0.5)
    assert rig.hub.subscription_count == 1


async def test_a_stream_joining_a_channel_just_unsubscribed_waits_for_its_new_subscription(
    rig: Rig,
) -> None:
    first = Listener("s0")
    await rig.hub.join(first)
    rig.hub.leave(first)
    await rig.until(lambda: rig.commands.count(("unsubscribe", 1)) == 1)
    await settle()
    link = rig.server.current
    assert link is not None and link.subscribed == set()
    rig.server.slow = True
    joining = asyncio.create_task(rig.hub.join(Listener("s0")))
    await rig.until(lambda: len(link.held) == 1)
    await settle()
    assert not joining.done()  # a publish now would reach nobody: the read must wait
    link.process_held()
    await asyncio.wait_for(joining, 1)
    assert link.subscribed == {"s0"}


async def test_a_stream_confirmed_late_is_read_again_when_the_confirmation_comes(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "CONFIRM_TIMEOUT", 0.05)
    link = rig.server.current
    assert link is not None
    listener = Listener("s0")
    inbox = Inbox()
    listener.attach(inbox.send)
    rig.server.slow = True
    await asyncio.wait_for(rig.hub.join(listener), 1)  # gave up waiting: read on its own
    assert rig.hub._conn is not None and rig.hub._conn.waiters == {}
    # Published while the SUBSCRIBE was not processed yet: lost on the link.
    rig.server.publish("s0")
    await settle()
    assert inbox.sent == [] and rig.reader.batches == []
    link.process_held()
    await rig.until(lambda: inbox.sent)
    assert inbox.sent == [(1, False)]
    assert rig.reader.batches == [1]
    # Confirmed once: a later publish is pushed, and nothing is read again.
    rig.server.publish("s0")
    await rig.until(lambda: len(inbox.sent) == 2)
    assert inbox.sent[1] == (2, True) and rig.reader.batches == [1]
    # Nor after its stream left and came back (confirmed in time, then).
    rig.server.release()
    rig.hub.leave(listener)
    await rig.until(lambda: "s0" not in link.subscribed)
    await rig.hub.join(Listener("s0"))
    await settle()
    assert rig.reader.batches == [1]


async def test_a_stream_confirmed_in_time_is_not_read_again(rig: Rig) -> None:
    listener = Listener("s0")
    await rig.hub.join(listener)
    rig.server.publish("s0")
    await settle()
    assert rig.reader.batches == []


async def test_a_cancelled_join_leaves_no_waiter_behind(rig: Rig) -> None:
    link = rig.server.current
    assert link is not None
    rig.server.slow = True
    joining = asyncio.create_task(rig.hub.join(Listener("s0")))
    await rig.until(lambda: len(link.held) == 1)
    joining.cancel()
    await asyncio.gather(joining, return_exceptions=True)
    assert rig.hub._conn is not None and rig.hub._conn.waiters == {}
    assert rig.hub.subscription_count == 0


class FailingLink(CountingLink):
    """Once `fail_next` is set, its next SUBSCRIBE fails while the connection still reads (a
    command timing out)."""

    fail_next = False

    async def subscribe(self, uuids: Iterable[str]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise TimeoutError("subscribe timed out")
        await super().subscribe(uuids)


async def test_a_failed_command_ends_the_link_and_the_next_one_subscribes_every_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub_module, "IDLE_PING_SECONDS", 0.05)
    rig = Rig(FailingLink)
    rig.hub.start()
    try:
        await rig.until(lambda: rig.hub.connected)
        first = rig.server.current
        assert isinstance(first, FailingLink)
        await rig.hub.join(Listener("s0"))
        first.fail_next = True
        await asyncio.wait_for(rig.hub.join(Listener("s1")), 5)
        await rig.until(lambda: rig.server.current not in (None, first))
        assert first is not None and first.closed
        new = rig.server.current
        assert new is not None
        await rig.until(lambda: new.subscribed == {"s0", "s1"})
    finally:
        await rig.hub.stop()
    assert rig.restarts() == 0


async def test_a_link_that_lived_long_enough_starts_the_backoff_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bounds: list[float] = []

    class Jitter:
        @staticmethod
        def uniform(low: float, high: float) -> float:
            bounds.append(high)
            return 0.0

    monkeypatch.setattr(hub_module, "random", Jitter)
    monkeypatch.setattr(hub_module, "STABLE_LINK_SECONDS", 0.1)
    rig = Rig()
    rig.server.fail_opens = 3
    rig.hub.start()
    try:
        await rig.until(lambda: rig.hub.connected)
        assert bounds == [0.05, 0.1, 0.2]
        link = rig.server.current
        assert link is not None
        await asyncio.sleep(0.15)  # longer than STABLE_LINK_SECONDS
        rig.server.fail_opens = 1
        link.drop()
        await rig.until(lambda: rig.hub.connected and rig.server.current not in (None, link))
        assert bounds[3:] == [0.05, 0.1]
        assert link.closed and all(old.closed for old in rig.server.links[:-1])
    finally:
        await rig.hub.stop()


async def test_an_idle_link_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # An idle read returns nothing now and then (the loop's turn to see a failed command);
    # that is not a lost link.
    monkeypatch.setattr(hub_module, "IDLE_PING_SECONDS", 0.01)
    rig = Rig()
    rig.hub.start()
    try:
        await rig.until(lambda: rig.hub.connected)
        await rig.hub.join(Listener("s0"))
        await asyncio.sleep(0.2)
        assert len(rig.server.links) == 1 and rig.hub.connected
        assert rig.registry.get_sample_value("paypush_stream_pubsub_connects_total") == 1
    finally:
        await rig.hub.stop()


async def test_a_stream_joining_while_its_channel_is_being_unsubscribed_waits_for_the_resubscribe(
    rig: Rig,
) -> None:
    # The SUBSCRIBE confirmed, the UNSUBSCRIBE after it not yet: the channel is on its way
    # out, so a read now could miss a publish.
    link = rig.server.current
    assert link is not None
    rig.server.slow = True
    await come_and_go_unconfirmed(rig, link)
    link._process(*link.held.pop(0))  # the SUBSCRIBE
    await settle()
    joining = asyncio.create_task(rig.hub.join(Listener("s0")))
    await rig.until(lambda: len(link.held) == 2)
    await settle()
    assert not joining.done()
    link.process_held()
    await asyncio.wait_for(joining, 1)
    assert link.subscribed == {"s0"}


class SwallowingLink(CountingLink):
    """Its UNSUBSCRIBE and reads swallow a cancellation, as redis-py 8.1's pub/sub does: the
    call returns normally and the task's `cancelling()` stays set."""

    async def unsubscribe(self, uuids: Iterable[str]) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await super().unsubscribe(uuids)

    async def read(self, *, idle: float) -> Message | None:
        with contextlib.suppress(asyncio.CancelledError):
            return await super().read(idle=idle)
        return None


class SwallowingReader(BatchReader):
    """A status read that swallows the cancellations that land in it (PyMongo's cursor can):
    both of a stopping supervisor's, here."""

    async def read_fresh(self, uuids: Sequence[str]) -> dict[str, StatusEvent]:
        for _ in range(2):
            with contextlib.suppress(asyncio.CancelledError):
                return await super().read_fresh(uuids)
        return {}


async def test_a_cancellation_a_command_swallows_still_stops_the_hub() -> None:
    rig = Rig(SwallowingLink)
    rig.hub.start()
    try:
        await rig.until(lambda: rig.hub.connected)
        listener = Listener("s0")
        await rig.hub.join(listener)
        rig.server.stall = asyncio.Event()  # the UNSUBSCRIBE waits on a full socket buffer
        rig.hub.leave(listener)
        await rig.until(lambda: rig.commands[-1] == ("unsubscribe", 1))
    finally:
        await rig.hub.stop()
    # Nothing left running past the app's shutdown, on clients about to close.
    assert all(t.task is None or t.task.done() for t in rig.hub._tasks)


async def test_a_cancellation_a_status_read_swallows_still_stops_the_hub() -> None:
    rig = Rig(reader_class=SwallowingReader)
    rig.hub.start()
    try:
        await rig.until(lambda: rig.hub.connected)
        await rig.hub.join(Listener("s0"))
        rig.reader.gate = asyncio.Event()  # MongoDB slow: the re-read is in flight
        link = rig.server.current
        assert link is not None
        link.drop()
        await rig.until(lambda: rig.reader.inflight == 1)
    finally:
        await rig.hub.stop()
    assert all(t.task is None or t.task.done() for t in rig.hub._tasks)
