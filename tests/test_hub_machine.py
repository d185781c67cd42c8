"""The hub's interleavings, explored by hypothesis: a state machine over the real `Hub` with
links (tests/hub_model.py) that block, fail, confirm late or drop.

Rules: streams join, leave, or go away in the middle of their join; sessions change; the link
drops, fails to reconnect, stalls its writes, or processes SUBSCRIBEs late; time passes. After
each quiescence the invariants the gateway promises must hold:

- every live stream's channel is subscribed on the current link, and no other channel is;
- no listener survives its stream;
- every stream has the latest version of its session (a change made after it joined reaches
  it, or a newer one did);
- nothing is sent to or read from a closed link.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from shared.model import StatusEvent
from stream_gateway import hub as hub_module
from stream_gateway.hub import Hub, Listener
from stream_gateway.metrics import GatewayMetrics
from tests.hub_model import FakeReader, FakeRedis

UUIDS = ("s0", "s1", "s2")
# Short timers so that "time passes" is a few milliseconds of real time.
CONFIRM_TIMEOUT = 0.02
QUIESCE_SECONDS = 2.0


class Stream:
    """One browser's stream as the gateway's view drives it: join, read, then listen."""

    def __init__(self, hub: Hub, reader: FakeReader, uuid: str) -> None:
        self.uuid = uuid
        self.listener = Listener(uuid)
        self.versions: list[int] = []
        self.joined = False
        self._hub = hub
        self._reader = reader
        self.task = asyncio.create_task(self._run())

    async def _send(self, event: StatusEvent, pushed: bool) -> bool:
        self.versions.append(event.version)
        return False

    async def _run(self) -> None:
        # As the view: the hub must clean up after a join that never returns.
        await self._hub.join(self.listener)
        try:
            status = await self._reader.read(self.uuid)
            if status is not None:
                self.listener.offer(status)
            self.listener.attach(self._send)
            self.joined = True
            await asyncio.Event().wait()
        finally:
            self._hub.leave(self.listener)
            await self.listener.close()

    @property
    def last(self) -> int:
        return self.versions[-1] if self.versions else 0


class HubMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.server = FakeRedis()
        self.reader = FakeReader(self.server)
        self.streams: list[Stream] = []
        self.gone: list[Stream] = []
        self.hub = self._run(self._start())

    async def _start(self) -> Hub:
        hub = Hub(self.server.open_link, self.reader, GatewayMetrics.create(CollectorRegistry()))
        hub.start()
        return hub

    # -- driving the loop ------------------------------------------------------------------

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _spin(self, rounds: int = 30) -> None:
        async def spin() -> None:
            for _ in range(rounds):
                await asyncio.sleep(0)

        self._run(spin())

    def teardown(self) -> None:
        try:
            # Every example ends healed and checked, wherever its last step left it.
            self.quiesce()
        finally:
            self._stop()

    def _stop(self) -> None:
        async def stop() -> None:
            for s in self.streams:
                s.task.cancel()
            await asyncio.gather(*(s.task for s in self.streams), return_exceptions=True)
            await self.hub.stop()

        try:
            self._run(stop())
        finally:
            self.loop.close()

    # -- rules -----------------------------------------------------------------------------

    @rule(uuid=st.sampled_from(UUIDS))
    def join(self, uuid: str) -> None:
        async def open_stream() -> None:
            self.streams.append(Stream(self.hub, self.reader, uuid))

        self._run(open_stream())
        self._spin()

    @rule(uuids=st.lists(st.sampled_from(UUIDS), min_size=2, max_size=4))
    def join_many_at_once(self, uuids: list[str]) -> None:
        """A burst of browsers (a reconnect storm): one flush carries several batches."""

        async def open_streams() -> None:
            self.streams.extend(Stream(self.hub, self.reader, uuid) for uuid in uuids)

        self._run(open_streams())
        self._spin()

    @precondition(lambda self: bool(self.streams))
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(self.streams))
        self.streams.remove(stream)
        self.gone.append(stream)
        stream.task.cancel()
        self._spin()

    @rule(uuid=st.sampled_from(UUIDS))
    def join_and_leave_at_once(self, uuid: str) -> None:
        """A browser that goes while its SUBSCRIBE is not confirmed yet."""

        async def open_stream() -> Stream:
            stream = Stream(self.hub, self.reader, uuid)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            stream.task.cancel()
            return stream

        self.gone.append(self._run(open_stream()))
        self._spin()

    @rule(uuid=st.sampled_from(UUIDS))
    def publish(self, uuid: str) -> None:
        self.server.publish(uuid)
        self._spin()

    @rule(writes_vanish=st.booleans())
    def drop_link(self, writes_vanish: bool) -> None:
        link = self.server.current
        if link is not None:
            link.drop(writes_vanish=writes_vanish)
        self._spin()

    @rule(n=st.integers(min_value=1, max_value=3))
    def next_connects_fail(self, n: int) -> None:
        self.server.fail_opens = n

    @rule()
    def slow_confirmations(self) -> None:
        self.server.slow = True

    @rule()
    def confirm_late(self) -> None:
        self.server.slow = False
        for link in self.server.links:
            link.process_held()
        self._spin()

    @rule()
    def stall_writes(self) -> None:
        if self.server.stall is None:
            self.server.stall = asyncio.Event()

    @rule()
    def unstall_writes(self) -> None:
        if self.server.stall is not None:
            self.server.stall.set()
            self.server.stall = None
        self._spin()

    @rule()
    def time_passes(self) -> None:
        self._run(asyncio.sleep(CONFIRM_TIMEOUT * 1.5))
        self._spin()

    @rule()
    def quiesce(self) -> None:
        """Every fault healed: the invariants of a settled gateway must hold."""
        self.server.release()
        self.server.fail_opens = 0

        def settled() -> bool:
            link = self.server.current
            return (
                self.hub.connected
                and link is not None
                and not link.held
                and all(s.joined for s in self.streams)
                and all(s.last == self.server.versions.get(s.uuid, 0) for s in self.streams)
                and {s.uuid for s in self.streams} == link.subscribed
            )

        async def wait() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + QUIESCE_SECONDS
            while not settled() and loop.time() < deadline:
                await asyncio.sleep(0.001)
                for link in self.server.links:
                    link.process_held()

        self._run(wait())
        link = self.server.current
        assert self.hub.connected, "the hub did not reconnect"
        assert link is not None
        live = {s.uuid for s in self.streams}
        assert link.subscribed == live, (
            f"subscribed on the current link {sorted(link.subscribed)}, "
            f"live streams on {sorted(live)}"
        )
        for s in self.streams:
            assert s.joined, f"a stream on {s.uuid} never finished joining"
            latest = self.server.versions.get(s.uuid, 0)
            assert s.last == latest, f"a stream on {s.uuid} has v{s.last}, latest is v{latest}"

    # -- invariants after every step -------------------------------------------------------

    @invariant()
    def no_listener_survives_its_stream(self) -> None:
        for s in self.gone:
            if s.task.done():
                assert not self.hub.holds(s.listener), (
                    f"a gone stream's listener on {s.uuid} is still registered"
                )

    @invariant()
    def nothing_used_after_close(self) -> None:
        for link in self.server.links:
            assert not link.used_after_close, f"closed link used: {link.used_after_close}"


@contextlib.contextmanager
def short_timers() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub_module, "CONFIRM_TIMEOUT", CONFIRM_TIMEOUT)
        patch.setattr(hub_module, "BACKOFF_MIN", 0.0)
        patch.setattr(hub_module, "BACKOFF_MAX", 0.0)
        # One channel per command, so a burst of joins is several commands in one flush.
        patch.setattr(hub_module, "COMMAND_BATCH", 1)
        yield


def run_machine(max_examples: int, steps: int) -> None:
    """Explore `max_examples` runs of up to `steps` rules each."""
    with short_timers(), capture_logs():
        run_state_machine_as_test(
            HubMachine,
            settings=settings(
                max_examples=max_examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


def test_hub_state_machine_keeps_its_invariants(request: pytest.FixtureRequest) -> None:
    # Bounded here; `make faults` explores far more (tests/faults/test_hub_machine_long.py).
    run_machine(max_examples=int(request.config.getoption("--hub-machine-runs")), steps=30)


# -- the interleavings found on the code before the fixes, kept as named sequences ---------


def replay(*steps: tuple[str, dict[str, Any]]) -> None:
    """Run `steps` (rule name, arguments) on a fresh machine, then heal and check it."""
    with short_timers(), capture_logs():
        machine = HubMachine()
        try:
            for name, args in steps:
                getattr(machine, name)(**args)
                machine.no_listener_survives_its_stream()
                machine.nothing_used_after_close()
        finally:
            machine.teardown()


def test_a_stream_cancelled_during_its_join_leaves_no_listener() -> None:
    replay(("slow_confirmations", {}), ("join_and_leave_at_once", {"uuid": "s0"}))


def test_a_flusher_stalled_across_reconnects_resubscribes_every_stream_on_the_new_link() -> None:
    # The flusher is stuck writing on link 2 when link 3 replaces it; its write then
    # "succeeds" into the dead socket. It must neither mark what it sends next as told on
    # link 3 (that channel would never be subscribed there) nor send it on a closed link.
    replay(
        ("join", {"uuid": "s0"}),
        ("join", {"uuid": "s1"}),
        ("join", {"uuid": "s2"}),
        ("stall_writes", {}),
        ("drop_link", {"writes_vanish": False}),
        ("drop_link", {"writes_vanish": True}),
        ("unstall_writes", {}),
    )


def test_a_change_published_before_a_late_subscribe_lands_still_reaches_the_stream() -> None:
    replay(
        ("slow_confirmations", {}),
        ("join", {"uuid": "s2"}),
        ("time_passes", {}),
        ("publish", {"uuid": "s2"}),
    )


def test_a_change_while_the_link_is_down_reaches_the_stream_after_reconnecting() -> None:
    replay(
        ("join", {"uuid": "s0"}),
        ("next_connects_fail", {"n": 2}),
        ("drop_link", {"writes_vanish": False}),
        ("publish", {"uuid": "s0"}),
    )
