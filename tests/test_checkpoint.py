"""Checkpoints: a view saves its state and offsets, and restarts from them."""

from __future__ import annotations

import dataclasses
import json
import marshal
import struct
import time
import zlib
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from snapbus import KafkaConfig, SnapshotPublisher, SnapshotView, WorkspaceSnapshot
from snapbus.checkpoint import (
    FORMAT_VERSION,
    MAGIC,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    read_offsets,
    write_checkpoint,
)
from snapbus.codec import default_codec, encode
from snapbus.topic import ensure_topic
from tests.conftest import BrokerAddress
from tests.helpers import make_snapshot

FETCH_WAIT_MS = 20


def checkpoint_of(topic: str, partitions: int, offsets: dict[int, int],
                  snapshots: list[WorkspaceSnapshot], created_ms: int) -> Checkpoint:
    """A checkpoint holding `snapshots`: the first one encoded, the others as fields."""
    codec = default_codec()
    sessions: dict[str, bytes | tuple[str, ...]] = {
        s.key: codec.compact(encode(s)) if i == 0 else tuple(s.to_dict().values())
        for i, s in enumerate(snapshots)}
    indexes: tuple[dict[str, set[str]], ...] = ({}, {}, {})
    for s in snapshots:
        for index, value in zip(indexes, (s.repo_key, s.agent_id, s.state), strict=True):
            index.setdefault(value, set()).add(s.key)
    stamps = {s.key: created_ms - i for i, s in enumerate(snapshots)}
    return Checkpoint(topic, partitions, offsets, sessions, indexes, stamps,  # type: ignore[arg-type]
                      created_ms, codec.compact_prefix, synced_ms=created_ms)


def sample(path: Path, topic: str = "sessions", partitions: int = 3) -> Checkpoint:
    checkpoint = checkpoint_of(topic, partitions, {0: 5, 1: 0, 2: 7},
                               [make_snapshot() for _ in range(4)], 1_700_000_000_000)
    write_checkpoint(path, checkpoint)
    return checkpoint


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "view.ckpt"
    written = sample(path)
    assert read_checkpoint(path, topic="sessions", partitions=3) == written
    unknown = dataclasses.replace(written, synced_ms=None)
    write_checkpoint(path, unknown)
    assert read_checkpoint(path, topic="sessions", partitions=3) == unknown
    assert [p.name for p in path.parent.iterdir()] == ["view.ckpt"]  # no temporary left


def test_format_5_files_are_still_read(tmp_path: Path) -> None:
    # format 6 changed only the shape of small index groups (tuples): a file of the previous
    # format, with list groups, loads as it is
    path = tmp_path / "view.ckpt"
    written = sample(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, len(MAGIC), 5)
    path.write_bytes(bytes(data))
    assert FORMAT_VERSION == 6
    assert read_checkpoint(path, topic="sessions", partitions=3) == written


def test_corrupt_truncated_foreign_and_other_versions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "view.ckpt"
    sample(path)
    data = path.read_bytes()

    flipped = bytearray(data)
    flipped[-3] ^= 0x40
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"ckpt is corrupt \("):
        read_checkpoint(path, topic="sessions", partitions=3)

    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"ckpt is corrupt \("):
        read_checkpoint(path, topic="sessions", partitions=3)

    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="for topic 'sessions' with 3 partitions"):
        read_checkpoint(path, topic="other", partitions=3)
    with pytest.raises(CheckpointError, match="not 'sessions' with 12"):
        read_checkpoint(path, topic="sessions", partitions=12)

    path.write_bytes(MAGIC + struct.pack(">II", 99, 2) + b"{}")
    with pytest.raises(CheckpointError, match="format 99"):
        read_checkpoint(path, topic="sessions", partitions=3)

    for alien in (b"PK\x03\x04 a zip file", b""):
        path.write_bytes(alien)
        with pytest.raises(CheckpointError, match="not a snapbus checkpoint"):
            read_checkpoint(path, topic="sessions", partitions=3)

    header_len = struct.unpack_from(">II", data, len(MAGIC))[1]
    start = len(MAGIC) + 8
    header = json.loads(data[start:start + header_len])
    del header["crc32"]
    broken = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack(">II", FORMAT_VERSION, len(broken)) + broken
                     + data[start + header_len:])
    with pytest.raises(CheckpointError, match=r"ckpt is corrupt \("):
        read_checkpoint(path, topic="sessions", partitions=3)

    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "missing.ckpt", topic="sessions", partitions=3)

    # an intact file whose body is not what this format holds (format 4's shape)
    body = marshal.dumps(([], [], ({}, {}, {}), {}))
    header["crc32"], header["sessions"] = zlib.crc32(body), 0
    other = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack(">II", FORMAT_VERSION, len(other)) + other + body)
    with pytest.raises(CheckpointError, match="unexpected contents"):
        read_checkpoint(path, topic="sessions", partitions=3)


def test_offsets_are_read_from_the_header_alone(tmp_path: Path) -> None:
    path = tmp_path / "view.ckpt"
    written = sample(path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # (the body is not read, so not checked)
    assert read_offsets(path, topic="sessions", partitions=3) == written.offsets
    assert read_offsets(path, topic="other", partitions=3) is None
    assert read_offsets(path, topic="sessions", partitions=12) is None
    path.write_bytes(MAGIC + struct.pack(">II", 99, 2) + b"{}")
    assert read_offsets(path, topic="sessions", partitions=3) is None
    path.write_bytes(data[:len(MAGIC) + 20])  # a header cut short
    assert read_offsets(path, topic="sessions", partitions=3) is None
    assert read_offsets(tmp_path / "missing.ckpt", topic="sessions", partitions=3) is None


async def test_restart_from_a_checkpoint_reads_only_the_tail(
    broker: BrokerAddress, topic_name: str, tmp_path: Path
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    path = tmp_path / "view.ckpt"
    first = [make_snapshot(agent_name=f"agent-{i}") for i in range(40)]
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many(first)
        async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                                checkpoint_path=path) as view:
            assert view.stats.checkpoint_sessions is None  # no file yet: a full replay
            await view.barrier(timeout=30)
            for snapshot in first[::3]:  # read these: saved decoded, the others as read
                assert view.get(snapshot.session_id) == snapshot
        assert path.exists()  # saved on stop

        tail = [first[0].replace(state="merged"), make_snapshot(agent_name="late")]
        await publisher.publish_many(tail)
        await publisher.evict(first[1].session_id)

    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            checkpoint_path=path) as restarted, \
            SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS) as full:
        stats = restarted.stats
        assert stats.checkpoint_sessions == len(first)
        assert stats.records_applied + stats.records_superseded == len(tail) + 1
        assert {s.key: s for s in restarted.snapshots()} == {s.key: s for s in full.snapshots()}
        assert restarted.by_state("merged") == [tail[0]]
        assert first[1].session_id not in restarted
        for mine, theirs in zip(restarted._store.indexes(), full._store.indexes(), strict=True):
            assert {v: set(keys) for v, keys in mine.items()} == {
                v: set(keys) for v, keys in theirs.items()}


async def test_bad_or_stale_checkpoints_fall_back_to_the_log(
    broker: BrokerAddress, topic_name: str, tmp_path: Path
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshots = [make_snapshot() for _ in range(10)]
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many(snapshots)
    expected = {s.key: s for s in snapshots}

    other_partitions = tmp_path / "other-partitions.ckpt"
    write_checkpoint(other_partitions, checkpoint_of(topic_name, 3, dict.fromkeys(range(3), 0),
                                                     [make_snapshot()], 0))
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            checkpoint_path=other_partitions) as view:
        assert view.stats.checkpoint_sessions is None
        assert {s.key: s for s in view.snapshots()} == expected

    # encoded sessions are kept without their schema header: a checkpoint written by a
    # process whose current schema was another cannot be expanded, so it is not used
    other_schema = tmp_path / "other-schema.ckpt"
    saved = checkpoint_of(topic_name, 12, dict.fromkeys(range(12), 0), [make_snapshot()], 0)
    write_checkpoint(other_schema, dataclasses.replace(
        saved, compact_prefix=b"\xc3\x01" + b"\x01" * 8))
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            checkpoint_path=other_schema) as view:
        assert view.stats.checkpoint_sessions is None
        assert {s.key: s for s in view.snapshots()} == expected

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(MAGIC + b"garbage")
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            checkpoint_path=corrupt) as view:
        assert view.stats.checkpoint_sessions is None
        assert {s.key: s for s in view.snapshots()} == expected

    # a checkpoint whose offsets lie beyond the log (the topic was re-created since), holding
    # a session the log does not have: the view notices and re-reads the whole log
    stale = tmp_path / "stale.ckpt"
    ghost = make_snapshot(agent_name="ghost")
    write_checkpoint(stale, checkpoint_of(topic_name, 12, dict.fromkeys(range(12), 10_000),
                                          [ghost], int(time.time() * 1000)))
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            checkpoint_path=stale) as view:
        assert view.stats.checkpoint_sessions == 1
        await view.barrier(timeout=30)
        assert view.stats.resyncs >= 1
        assert {s.key: s for s in view.snapshots()} == expected
        assert view.status == "live"

    # a checkpoint whose header is fine but whose body is damaged: the view starts fetching
    # from the header's offsets while the body loads, then falls back to offset 0
    more = [make_snapshot() for _ in range(50)]
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many(more)
    expected.update((s.key, s) for s in more)
    damaged = tmp_path / "damaged.ckpt"
    write_checkpoint(damaged, checkpoint_of(topic_name, 12, dict.fromkeys(range(12), 1),
                                            [ghost], 0))
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x40
    damaged.write_bytes(bytes(data))
    assert read_offsets(damaged, topic=topic_name, partitions=12) == dict.fromkeys(range(12), 1)
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            checkpoint_path=damaged) as view:
        assert view.stats.checkpoint_sessions is None
        assert {s.key: s for s in view.snapshots()} == expected


async def test_ttl_applies_to_every_session_of_a_checkpoint(
    broker: BrokerAddress, topic_name: str, tmp_path: Path
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    path = tmp_path / "view.ckpt"
    read, unread = make_snapshot(agent_name="read"), make_snapshot(agent_name="unread")
    ten_minutes_ago = int(time.time() * 1000) - 600_000
    await ensure_topic(config)
    raw = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    await raw.start()
    try:
        for snapshot in (read, unread):
            await raw.send_and_wait(topic_name, encode(snapshot), key=snapshot.key.encode(),
                                    timestamp_ms=ten_minutes_ago)
    finally:
        await raw.stop()
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, ttl_s=3600,
                            checkpoint_path=path) as view:
        # a view with a TTL decodes every session at start (it needs each record's time), so
        # both are saved decoded: the sessions a TTL check on load once skipped
        assert view.get(read.session_id) == read
        assert len(view) == 2
    # ten minutes old, against a five-minute TTL: both expired, however they were saved
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, ttl_s=300,
                            checkpoint_path=path) as view:
        assert view.stats.checkpoint_sessions == 0
        assert len(view) == 0
        assert sorted(view.expired_sessions()) == sorted([read.session_id, unread.session_id])


class Clock:
    """A wall clock the test moves forward."""

    def __init__(self) -> None:
        self.ahead_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead_s


async def test_a_checkpoint_older_than_the_tombstone_retention_is_replayed_instead(
    broker: BrokerAddress, topic_name: str, tmp_path: Path
) -> None:
    # the topic keeps tombstones 24 h (Kafka's default); the clock says how old the file is.
    # (tests/test_compaction.py shows the session coming back on Kafka without this rule)
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    path = tmp_path / "view.ckpt"
    kept, gone = make_snapshot(agent_name="kept"), make_snapshot(agent_name="gone")
    clock = Clock()
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many([kept, gone])
        async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, checkpoint_path=path,
                                clock=clock) as view:
            await view.barrier(timeout=30)
        await publisher.evict(gone.session_id)
    synced_ms = read_checkpoint(path, topic=topic_name).synced_ms
    assert synced_ms is not None
    assert abs(synced_ms - time.time() * 1000) < 60_000

    clock.ahead_s = 21 * 3600  # within 24 h less the margin (a tenth, at most 1 h): trusted
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, checkpoint_path=path,
                            clock=clock) as view:
        assert view.stats.checkpoint_sessions == 2
        assert gone.session_id not in view  # (its tombstone is still in the log)
    clock.ahead_s += 24 * 3600  # the file saved just now is a day old: a full replay
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, checkpoint_path=path,
                            clock=clock) as view:
        assert view.stats.checkpoint_sessions is None
        assert {s.key for s in view.snapshots()} == {kept.key}

    # a file that does not say when its state was complete (an older snapbus) is not used
    write_checkpoint(path, dataclasses.replace(read_checkpoint(path, topic=topic_name),
                                               synced_ms=None))
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            checkpoint_path=path) as view:
        assert view.stats.checkpoint_sessions is None
        assert {s.key for s in view.snapshots()} == {kept.key}
