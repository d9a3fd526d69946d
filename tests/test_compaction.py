"""Compaction for real, tombstone retention, and topic changes under running views.

The tests marked ``kafka`` run on Apache Kafka, whose log cleaner really removes records: the
topics here roll a segment every 200 ms and are cleaned as soon as anything is dirty (the test
brokers look for cleaning work every 500 ms, `tests.helpers.KAFKA_TEST_CONFIG`). Compaction
runs only on closed segments, so the waits keep publishing a filler session: each record
after ``segment.ms`` rolls the active segment, which the cleaner may then clean.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from snapbus import KafkaConfig, SnapshotPublisher, SnapshotView, WorkspaceSnapshot
from snapbus.errors import TopicError, ViewError
from snapbus.replay import history, rebuild, replay
from snapbus.topic import ensure_topic
from tests.conftest import BrokerAddress
from tests.helpers import eventually, make_snapshot, topic_partitions

FETCH_WAIT_MS = 20
COMPACTION_WAIT_S = 90.0


def fast_compaction(delete_retention_ms: int) -> dict[str, str]:
    """Topic configs that make Kafka's cleaner compact within about a second."""
    return {
        "segment.ms": "200",
        "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": str(delete_retention_ms),
    }


Raw = dict[int, list[tuple[int, bytes | None, bytes | None]]]
"""Per partition: (offset, key, value) of every record the broker still has."""


async def raw_log(bootstrap_servers: str, topic: str) -> Raw:
    """Every record the topic holds now, read by a plain aiokafka consumer."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p)
                      for p in await topic_partitions(bootstrap_servers, topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)  # (right on Kafka: these tests' broker)
        found: Raw = {tp.partition: [] for tp in partitions}
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                found[tp.partition].extend((r.offset, r.key, r.value) for r in records)
        return found
    finally:
        await consumer.stop()


def holes(raw: Raw) -> int:
    """Offsets missing below the last record of each partition (removed by the cleaner)."""
    return sum(records[-1][0] + 1 - len(records) for records in raw.values() if records)


def records_of(raw: Raw, session: WorkspaceSnapshot) -> list[bytes | None]:
    """The values the log still holds for one session (None: a tombstone)."""
    key = session.key.encode()
    return [value for records in raw.values() for _, k, value in records if k == key]


async def compact_until(config: KafkaConfig, done: object, what: str) -> Raw:
    """Publish a filler record to every partition at a time (rolling each one's active
    segment, which only a record arriving after ``segment.ms`` does) until `done(raw)`."""
    found: list[Raw] = []
    async with SnapshotPublisher(config) as publisher:
        fillers: dict[int, WorkspaceSnapshot] = {}
        partitions = len(await topic_partitions(config.bootstrap_servers, config.topic))
        while len(fillers) < partitions:  # (one session per partition)
            filler = make_snapshot(agent_name="filler")
            fillers.setdefault((await publisher.publish(filler)).partition, filler)

        async def compacted() -> bool:
            await publisher.publish_many([filler.replace(intent=str(time.monotonic()))
                                          for filler in fillers.values()])
            raw = await raw_log(config.bootstrap_servers, config.topic)
            found[:] = [raw]
            return bool(done(raw))  # type: ignore[operator]

        await eventually(compacted, timeout=COMPACTION_WAIT_S, what=what)
    return found[0]


def state(view: SnapshotView) -> dict[str, WorkspaceSnapshot]:
    return {s.key: s for s in view.snapshots() if s.agent_name != "filler"}


def without_filler(sessions: dict[uuid.UUID, WorkspaceSnapshot]) -> dict[str, WorkspaceSnapshot]:
    return {str(k): s for k, s in sessions.items() if s.agent_name != "filler"}


def pause_reading(view: SnapshotView) -> None:
    """Stop the view's consumer fetching (a view that falls behind: a stopped pod, a long GC
    pause, a network partition), with aiokafka's own pause."""
    consumer = view._reader._consumer
    consumer.pause(*consumer.assignment())


def resume_reading(view: SnapshotView) -> None:
    consumer = view._reader._consumer
    consumer.resume(*consumer.assignment())


# ---------------------------------------------------------------------- 1. compaction for real


@pytest.mark.kafka
async def test_views_replay_rebuild_and_history_after_real_compaction(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=3, extra_configs=fast_compaction(1000))
    sessions = [make_snapshot(agent_name=f"s{i}") for i in range(12)]
    deleted, updated, untouched = sessions[:4], sessions[4:8], sessions[8:]
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS) as live, \
            SnapshotPublisher(config) as publisher:
        # phase 1: ten versions of every session
        for version in range(10):
            receipts = await publisher.publish_many(
                [s.replace(intent=f"v{version}") for s in sessions])
        phase1 = {s.key: s.replace(intent="v9") for s in sessions}
        t_mid = max(r.timestamp_ms for r in receipts)
        await eventually(lambda: time.time() * 1000 > t_mid + 1, what="the next millisecond")
        # phase 2: delete a third, five more versions of another third
        for s in deleted:
            await publisher.evict(s.session_id)
        for version in range(10, 15):
            await publisher.publish_many([s.replace(intent=f"v{version}") for s in updated])
        expected = {s.key: s.replace(intent="v14") for s in updated}
        expected.update((s.key, phase1[s.key]) for s in untouched)

        # until the cleaner kept only each session's latest record and dropped the tombstones
        raw = await compact_until(config, lambda raw: all(
            len(records_of(raw, s)) == (0 if s in deleted else 1) for s in sessions),
            "compaction of every superseded record and tombstone")
        assert holes(raw) >= len(sessions) * 9 + len(updated) * 5
        await live.barrier(timeout=30)
        live_state = state(live)

    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS) as lazy, \
            SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, decode="eager") as eager:
        assert state(lazy) == state(eager) == live_state == expected
        assert not any(s.session_id in lazy for s in deleted)

    # replay: offset order per partition, with the holes compaction left; no deleted session
    events = [e async for e in replay(config)]
    by_partition: dict[int, list[int]] = defaultdict(list)
    for event in events:
        by_partition[event.partition].append(event.offset)
    assert all(offsets == sorted(set(offsets)) for offsets in by_partition.values())
    assert sum(o[-1] + 1 - len(o) for o in by_partition.values()) >= holes(raw)
    replayed: dict[str, WorkspaceSnapshot | None] = {}
    for event in events:
        replayed[event.key] = event.snapshot
    assert {k: v for k, v in replayed.items() if v is not None and v.agent_name != "filler"
            } == expected
    assert not {s.key for s in deleted} & replayed.keys()

    # rebuild: exact now; at the instant between the phases, only what is left of it (the
    # sessions not written since: compaction removed the earlier versions of the others)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert without_filler(await rebuild(config, as_of=now)) == expected
    mid = datetime.datetime.fromtimestamp(t_mid / 1000, tz=datetime.timezone.utc)
    assert without_filler(await rebuild(config, as_of=mid)) == {
        s.key: phase1[s.key] for s in untouched}

    # history: what the log still holds of a session, its latest record alone
    for s in updated + untouched:
        events_of = await history(config, s.session_id)
        assert [e.snapshot for e in events_of] == [expected[s.key]]
    for s in deleted:
        assert await history(config, s.session_id) == []


# ---------------------------------------------------------------------- 2. tombstone retention


@pytest.mark.kafka
async def test_a_checkpoint_older_than_the_tombstone_retention_is_not_trusted(
    broker: BrokerAddress, topic_name: str, tmp_path: Path
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=1, extra_configs=fast_compaction(1000))
    path = tmp_path / "view.ckpt"
    kept, gone = make_snapshot(agent_name="kept"), make_snapshot(agent_name="gone")
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many([kept, gone])
        async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                                checkpoint_path=path) as view:
            assert gone.session_id in view
        await publisher.evict(gone.session_id)
    # the cleaner removes the session, then (delete.retention.ms later) its tombstone
    await compact_until(config, lambda raw: not records_of(raw, gone),
                        "removal of the session's records and tombstone")

    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            checkpoint_path=path) as restarted:
        assert gone.session_id not in restarted
        assert restarted.stats.checkpoint_sessions is None  # replayed the log instead
        assert restarted.get(kept.session_id) == kept


@pytest.mark.kafka
async def test_a_live_view_that_lagged_past_the_tombstone_retention_resyncs(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=1, extra_configs=fast_compaction(1000))
    kept, gone = make_snapshot(agent_name="kept"), make_snapshot(agent_name="gone")
    async with SnapshotPublisher(config) as publisher, \
            SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS) as view:
        await publisher.publish_many([kept, gone])
        await view.barrier(timeout=30)
        assert gone.session_id in view
        pause_reading(view)
        await publisher.evict(gone.session_id)
        await compact_until(config, lambda raw: not records_of(raw, gone),
                            "removal of the session's records and tombstone")
        resume_reading(view)
        await view.barrier(timeout=30)
        await eventually(lambda: view.status == "live", what="the view live again")
        assert gone.session_id not in view
        assert view.stats.resyncs >= 1
        assert view.get(kept.session_id) == kept


class Clock:
    """A wall clock the test moves forward."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead_s


async def test_a_view_behind_for_longer_than_the_retention_rereads_the_log(
    broker: BrokerAddress, topic_name: str
) -> None:
    # on any broker: the topic keeps tombstones 24 h (the default); the view's clock says
    # 25 h passed while it was not reading
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=2)
    clock = Clock()
    kept, gone = make_snapshot(agent_name="kept"), make_snapshot(agent_name="gone")
    async with SnapshotPublisher(config) as publisher, \
            SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, clock=clock) as view:
        await publisher.publish_many([kept, gone])
        await view.barrier(timeout=30)
        clock.ahead_s = 3600.0  # an hour later, caught up all along: nothing to re-read
        await view.barrier(timeout=30)
        assert view.stats.resyncs == 0
        pause_reading(view)
        await publisher.evict(gone.session_id)
        clock.ahead_s += 25 * 3600
        resume_reading(view)
        await view.barrier(timeout=30)
        await eventually(lambda: view.status == "live", what="the view live again")
        assert view.stats.resyncs == 1
        assert gone.session_id not in view
        assert view.get(kept.session_id) == kept


class JumpingClock(Clock):
    """A wall clock that jumps `jump_s` ahead at its `at`-th reading (None: at every one)."""

    def __init__(self, jump_s: float, at: int | None = None) -> None:
        super().__init__()
        self.jump_s, self.at, self.readings = jump_s, at, 0

    def __call__(self) -> float:
        self.readings += 1
        if self.at is None or self.readings == self.at:
            self.ahead_s += self.jump_s
        return super().__call__()


DAY_AND_HOUR_S = 25 * 3600.0  # longer than the default delete.retention.ms (24 h)


async def deleted_and_kept(config: KafkaConfig) -> tuple[WorkspaceSnapshot, WorkspaceSnapshot]:
    """A topic (one partition, default retention) with a session kept and one deleted by a
    tombstone: three records, in three batches."""
    await ensure_topic(config, partitions=1)
    kept, gone = make_snapshot(agent_name="kept"), make_snapshot(agent_name="gone")
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish(gone)
        await publisher.publish(kept)
        await publisher.evict(gone.session_id)
    return kept, gone


ONE_BATCH_A_FETCH = {"max_partition_fetch_bytes": 1, "fetch_max_bytes": 1}
"""A view's consumer options that make a read of the log take a fetch per batch."""


async def test_a_first_read_slower_than_the_retention_is_read_again(
    broker: BrokerAddress, topic_name: str
) -> None:
    # on any broker: the view's clock says its first read of the whole log took 25 h (from
    # opening to its first check), so a value it read early may have lost its tombstone
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    kept, gone = await deleted_and_kept(config)
    clock = JumpingClock(DAY_AND_HOUR_S, at=2)  # (reading 1: the read began; 2: a check)
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, clock=clock,
                            consumer_options=ONE_BATCH_A_FETCH) as view:
        assert view.stats.resyncs == 1
        assert view.status == "live"
        assert gone.session_id not in view
        assert view.get(kept.session_id) == kept
        assert len(view) == 1


async def test_a_view_that_can_never_read_the_log_in_time_fails_saying_why(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await deleted_and_kept(config)
    view = SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, consumer_options=ONE_BATCH_A_FETCH,
                        clock=JumpingClock(DAY_AND_HOUR_S))  # (every fetch 25 h after the last)
    with pytest.raises(ViewError, match=r"3 reads of the whole log in a row took that long: "
                                        r"raise the topic's delete\.retention\.ms"):
        await view.start()
    assert view.status in ("failed", "stopped")


async def test_a_replay_slower_than_the_retention_raises_and_rebuild_reads_again(
    broker: BrokerAddress, topic_name: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    kept, gone = await deleted_and_kept(config)
    # (a replay takes more than one fetch: more than the reader's 4 MB per partition and fetch)
    filler = [make_snapshot(agent_name="filler", intent="x" * 1000) for _ in range(5000)]
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many(filler)
    flying = JumpingClock(DAY_AND_HOUR_S)
    replay_module = importlib.import_module("snapbus.replay")  # (snapbus.replay: the function)
    monkeypatch.setattr(replay_module, "_clock", flying)
    with pytest.raises(TopicError, match=r"delete\.retention\.ms") as caught:
        [event async for event in replay(config)]
    assert caught.value.retriable
    with pytest.raises(TopicError, match=r"delete\.retention\.ms"):
        await rebuild(config)
    with pytest.raises(TopicError, match=r"delete\.retention\.ms"):
        await history(config, gone.session_id)

    # a first read that took too long, a second that did not: the state of the second
    once = JumpingClock(DAY_AND_HOUR_S, at=2)  # (readings 1, 2: the first two fetches)
    monkeypatch.setattr(replay_module, "_clock", once)
    with caplog.at_level(logging.WARNING, logger="snapbus.replay"):
        rebuilt = await rebuild(config)
    assert rebuilt == {kept.session_id: kept, **{s.session_id: s for s in filler}}
    assert "reading it again (attempt 2 of 3)" in caplog.text


# ---------------------------------------------------------------------- 3. topic guardrails


@pytest.mark.kafka
async def test_partitions_added_or_policy_changed_under_a_running_view_are_reported(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=2)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                                topic_check_s=0.1) as view:
            assert view.status == "live"
            await admin.alter_configs([ConfigResource(
                ConfigResourceType.TOPIC, topic_name, {"cleanup.policy": "delete"})])
            await eventually(lambda: view.status == "degraded", what="a degraded view")
            assert "cleanup.policy=delete" in (view.status_reason or "")
            assert not view.health().ready
            await admin.alter_configs([ConfigResource(
                ConfigResourceType.TOPIC, topic_name, {"cleanup.policy": "compact"})])
            await eventually(lambda: view.status == "live", what="the view live again")

            await admin.create_partitions({topic_name: NewPartitions(total_count=3)})
            await eventually(lambda: view.status == "degraded", what="a degraded view")
            reason = view.status_reason or ""
            assert "now has 3 partitions, the view reads 2" in reason
            async with SnapshotPublisher(config) as publisher:  # still follows what it reads
                receipt = await publisher.publish(make_snapshot())
            if receipt.partition < 2:
                await view.wait_for(receipt, timeout=30)
            assert view.status == "degraded"
            assert view.status_reason == reason
    finally:
        await admin.close()


@pytest.mark.kafka
async def test_a_compacted_hole_near_the_log_end_is_passed_after_a_moment(
    broker: BrokerAddress, topic_name: str
) -> None:
    # The reader holds at a gap near the log end for a moment (Tansu opens such gaps while a
    # write is half done: docs/demo-convergence.md). A gap the cleaner made is permanent: the
    # reader must go on past it, returning every record the log still has, once and in order.
    from snapbus.reader import PartitionReader

    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=1, extra_configs=fast_compaction(60_000))
    session = make_snapshot()
    async with SnapshotPublisher(config) as publisher:
        for i in range(5):
            await publisher.publish(session.replace(intent=f"version {i}"))
    raw = await compact_until(config, lambda raw: len(records_of(raw, session)) == 1,
                              "the older versions of the session removed")
    expected = [offset for offset, _, _ in raw[0]]
    assert expected[0] > 0  # (a hole at the start of the log, within reach of the log end)
    # The cleaner keeps running while the reader reads: it may still remove an older filler
    # record, but never the latest record of a key.
    latest = sorted({key: offset for offset, key, _ in raw[0]}.values())

    reader = PartitionReader(config, fetch_max_wait_ms=FETCH_WAIT_MS)
    await reader.open()
    seen: list[int] = []
    try:
        async def read_all() -> bool:
            for records in (await reader.read(timeout_ms=50)).values():
                seen.extend(r.offset for r in records)
            return reader.positions.get(0, 0) > expected[-1]

        await eventually(read_all, what="the compacted log read to its end")
    finally:
        await reader.close()
    assert seen == sorted(set(seen)), "every record once, in order"
    assert set(latest) <= set(seen) <= set(expected)
    assert reader._holes_ok_below  # it held at the hole, then passed it
