"""TTL expiry in the view, renewal by ``touch``, and the janitor, against the real broker.

TTLs are about a second. The views' clock is the test's (`Clock`): it stands still until a test
moves it past a record's expiry, so nothing waits for the TTL to pass. Record timestamps are the
publisher's wall clock, so where one record must be younger than another, the test waits (a
condition, about a millisecond) for the wall clock to pass the older one's timestamp. Only the
two-janitor test, which paces a live workspace's renewals, runs on the wall clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

import pytest

from snapbus.config import KafkaConfig
from snapbus.janitor import Janitor
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.view import Change, ChangeStream, SnapshotView
from tests.helpers import eventually, make_snapshot

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

TTL_S = 1.0
WAIT_S = 30.0


@pytest.fixture
def config(broker: BrokerAddress, topic_name: str) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)


class Clock:
    """A view's wall clock that moves only when told: it starts at this host's time."""

    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s

    def move_to(self, epoch_ms: float) -> None:
        """Move to `epoch_ms` (milliseconds since the epoch), never back."""
        self.now_s = max(self.now_s, epoch_ms / 1000)


def new_view(config: KafkaConfig, ttl_s: float | None = TTL_S,
             clock: Clock | None = None) -> SnapshotView:
    if clock is None:
        return SnapshotView(config, fetch_max_wait_ms=20, ttl_s=ttl_s)
    return SnapshotView(config, fetch_max_wait_ms=20, ttl_s=ttl_s, clock=clock)


async def wall_clock_past(epoch_ms: float) -> None:
    """Return once this host's clock is past `epoch_ms`, so that a record published then is
    younger (a condition wait: about a millisecond)."""
    await eventually(lambda: time.time() * 1000 > epoch_ms, what="the wall clock moved on")


def stamp_ms(receipt: Receipt) -> float:
    assert receipt.timestamp_ms >= 0, "the broker gave no record timestamp"
    return receipt.timestamp_ms


async def next_change(stream: ChangeStream, timeout: float = WAIT_S) -> Change:
    return await asyncio.wait_for(stream.__anext__(), timeout)


async def test_expired_sessions_are_hidden_from_every_read(config: KafkaConfig) -> None:
    repo = uuid.uuid4()
    snapshot = make_snapshot(repo_id=repo, agent_id="ttl-agent", state="ttl-state")
    clock = Clock()
    async with SnapshotPublisher(config) as publisher, new_view(config, clock=clock) as view:
        receipt = await publisher.publish(snapshot)
        await view.wait_for(receipt, timeout=WAIT_S)
        clock.move_to(stamp_ms(receipt) + TTL_S * 1000 - 1)  # not before its time
        await view.barrier(timeout=WAIT_S)  # (a read, and the sweep after it)
        assert view.get(snapshot.session_id) == snapshot
        assert list(view) == [snapshot.session_id]
        assert view.by_repo(repo) == view.by_agent("ttl-agent") == [snapshot]

        clock.move_to(stamp_ms(receipt) + TTL_S * 1000)
        await eventually(lambda: snapshot.session_id not in view)
        assert view.get(snapshot.session_id) is None
        with pytest.raises(KeyError):
            view[snapshot.session_id]
        assert len(view) == 0
        assert list(view) == []
        assert view.snapshots() == []
        assert view.by_repo(repo) == []
        assert view.by_agent("ttl-agent") == []
        assert view.by_state("ttl-state") == []
        assert view.stats.expired == 1
        assert view.stats.sessions == 0
        assert view.expired_sessions() == [snapshot.session_id]


async def test_touch_renews_a_session(config: KafkaConfig) -> None:
    ttl_s = 1.5
    renewed, left = make_snapshot(), make_snapshot()
    clock = Clock()
    async with SnapshotPublisher(config) as publisher, new_view(config, ttl_s, clock) as view:
        for snapshot in (renewed, left):
            last = await publisher.publish(snapshot)
            await view.wait_for(last, timeout=WAIT_S)
        await wall_clock_past(stamp_ms(last))  # (so that the touch is younger)
        touched = await publisher.touch(renewed)
        await view.wait_for(touched, timeout=WAIT_S)
        assert stamp_ms(touched) > stamp_ms(last)

        # the sweep (which counts an expired session and lists it for the janitor) follows
        # within a fetch wait
        clock.move_to(stamp_ms(last) + ttl_s * 1000)
        await eventually(lambda: left.session_id not in view)
        assert view.get(renewed.session_id) == renewed  # its age restarted at the touch
        await eventually(lambda: view.expired_sessions() == [left.session_id])

        clock.move_to(stamp_ms(touched) + ttl_s * 1000 - 1)
        await view.barrier(timeout=WAIT_S)
        assert view.get(renewed.session_id) == renewed  # not before its time
        clock.move_to(stamp_ms(touched) + ttl_s * 1000)
        await eventually(lambda: renewed.session_id not in view)
        await eventually(lambda: view.stats.expired == 2)

        # Touching an expired session brings it back, as publishing it again would.
        await wall_clock_past(stamp_ms(touched))  # (so that this touch is younger)
        await view.wait_for(await publisher.touch(left), timeout=WAIT_S)
        assert view.get(left.session_id) == left
        assert view.expired_sessions() == [renewed.session_id]


async def test_expiry_is_a_change(config: KafkaConfig) -> None:
    snapshot = make_snapshot()
    clock = Clock()
    async with (
        SnapshotPublisher(config) as publisher,
        new_view(config, clock=clock) as view,
        view.changes() as stream,
    ):
        receipt = await publisher.publish(snapshot)
        assert await next_change(stream) == (snapshot.session_id, None, snapshot)
        clock.move_to(stamp_ms(receipt) + TTL_S * 1000)
        expired = await next_change(stream)
        assert expired == Change(snapshot.session_id, snapshot, None)
        assert snapshot.session_id not in view


async def test_a_record_older_than_the_ttl_at_replay_is_hidden(config: KafkaConfig) -> None:
    ttl_s = 1.5
    old, fresh = make_snapshot(), make_snapshot()
    async with SnapshotPublisher(config) as publisher:
        receipt = await publisher.publish(old)
        await wall_clock_past(stamp_ms(receipt))  # (so that the other is younger)
        assert stamp_ms(await publisher.publish(fresh)) > stamp_ms(receipt)
    clock = Clock()
    clock.move_to(stamp_ms(receipt) + ttl_s * 1000)  # old is past the TTL, fresh is not
    async with new_view(config, ttl_s, clock) as view:
        assert old.session_id not in view
        assert view.get(fresh.session_id) == fresh
        assert len(view) == 1
        assert view.by_agent(old.agent_id) == [fresh]
        assert view.expired_sessions() == [old.session_id]
        assert view.stats.expired == 0  # never shown, so never expired while shown
    async with new_view(config, ttl_s=None) as plain:
        assert set(plain) == {old.session_id, fresh.session_id}  # still on the topic


async def test_janitor_deletes_expired_sessions_from_the_topic(config: KafkaConfig) -> None:
    old = make_snapshot()
    clock = Clock()
    async with SnapshotPublisher(config) as publisher, new_view(config, clock=clock) as view:
        receipt = await publisher.publish(old)
        await view.wait_for(receipt, timeout=WAIT_S)
        clock.move_to(stamp_ms(receipt) + TTL_S * 1000)
        await eventually(lambda: old.session_id in view.expired_sessions())
        await wall_clock_past(stamp_ms(receipt))  # (so that the next one is younger)
        live = make_snapshot()
        await view.wait_for(await publisher.publish(live), timeout=WAIT_S)

        janitor = Janitor(view, publisher, interval_s=60)
        assert await janitor.sweep() == 1
        assert janitor.evicted == 1
        assert await janitor.sweep() == 0  # its tombstone is applied: nothing left to do
        assert view.expired_sessions() == []
        assert view.stats.tombstones == 1
        assert view.get(live.session_id) == live

    async with new_view(config, ttl_s=None) as plain:
        assert old.session_id not in plain
        assert plain.get(live.session_id) == live
        assert plain.stats.tombstones == 1


async def test_two_janitors_at_once(config: KafkaConfig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="snapbus.janitor")
    doomed = [make_snapshot() for _ in range(3)]
    renewed = make_snapshot()
    changes: list[Change] = []

    async def collect(stream: ChangeStream) -> None:
        async for change in stream:
            changes.append(change)

    async with (
        SnapshotPublisher(config) as first_publisher,
        SnapshotPublisher(config) as second_publisher,
        new_view(config) as first_view,
        new_view(config) as second_view,
        new_view(config, ttl_s=None) as watcher,
        watcher.changes() as stream,
    ):
        collector = asyncio.create_task(collect(stream))

        async def keep_alive() -> None:
            """Renew one session as a live workspace would (pacing, not synchronisation)."""
            while True:
                await second_publisher.touch(renewed)
                await asyncio.sleep(TTL_S / 4)

        for snapshot in doomed:
            await first_publisher.publish(snapshot)
        keeper = asyncio.create_task(keep_alive())
        try:
            async with (
                Janitor(first_view, first_publisher, interval_s=0.1) as first,
                Janitor(second_view, second_publisher, interval_s=0.1) as second,
            ):
                await eventually(
                    lambda: len([c for c in changes if c.new is None]) >= len(doomed)
                    and all(s.session_id not in watcher for s in doomed),
                    timeout=TTL_S + WAIT_S,
                )
                # Sweeping at the same moment again finds nothing: the renewed session lives.
                assert list(await asyncio.gather(first.sweep(), second.sweep())) == [0, 0]
        finally:
            keeper.cancel()
        await watcher.barrier(timeout=WAIT_S)
        collector.cancel()

    assert len(doomed) <= first.evicted + second.evicted <= 2 * len(doomed)
    deleted = sorted(str(c.session_id) for c in changes if c.new is None)
    assert deleted == sorted(str(s.session_id) for s in doomed)  # each gone exactly once
    assert [c for c in changes if c.session_id == renewed.session_id] == [
        Change(renewed.session_id, None, renewed)]  # created, then never deleted
    assert [r.getMessage() for r in caplog.records if r.name == "snapbus.janitor"
            and r.levelno >= logging.WARNING] == []
