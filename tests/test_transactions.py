"""Transactions in the log: a view applies committed records only, and an open transaction
does not hang it.

The unit tests build record batches as a broker returns them (transactional batches, control
batches holding commit and abort markers) and check snapbus's fast path against aiokafka's own
`PartitionRecords` reading the same bytes. The integration tests (Apache Kafka only: Tansu has
no transactions) write with aiokafka's transactional producer.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED, READ_UNCOMMITTED, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c

from snapbus._aiokafka import batch_records
from snapbus.codec import encode
from snapbus.config import KafkaConfig
from snapbus.errors import ConfigError
from snapbus.publisher import SnapshotPublisher
from snapbus.reader import PartitionReader
from snapbus.replay import replay
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import Change, SnapshotView
from tests.helpers import WAIT_S, eventually, make_snapshot

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

TP = TopicPartition("t", 0)

# ------------------------------------------------------------------ synthetic record batches

_ATTRIBUTES_AT, _CRC_AT, _CONTROL_BIT = 21, 17, 0x20


def batch(base_offset: int, values: Sequence[bytes], *, producer_id: int = -1,
          transactional: bool = False) -> bytes:
    """A v2 record batch of `values` (keys k0, k1, ...) at `base_offset`."""
    idempotent = producer_id >= 0
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=transactional, producer_id=producer_id,
        producer_epoch=0 if idempotent else -1, base_sequence=0 if idempotent else -1,
        batch_size=1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=1_000 + i, key=b"k%d" % i, value=value, headers=[])
    buffer = bytearray(builder.build())
    struct.pack_into(">q", buffer, 0, base_offset)
    return bytes(buffer)


def marker(offset: int, producer_id: int, *, commit: bool) -> bytes:
    """A control batch with one commit or abort marker, as the transaction coordinator
    writes it."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=True, producer_id=producer_id,
        producer_epoch=0, base_sequence=-1, batch_size=1 << 20)
    builder.append(0, timestamp=2_000, key=struct.pack(">hh", 0, 1 if commit else 0),
                   value=struct.pack(">hi", 0, 0), headers=[])
    buffer = bytearray(builder.build())
    struct.pack_into(">q", buffer, 0, offset)
    attributes = struct.unpack_from(">h", buffer, _ATTRIBUTES_AT)[0] | _CONTROL_BIT
    struct.pack_into(">h", buffer, _ATTRIBUTES_AT, attributes)
    struct.pack_into(">I", buffer, _CRC_AT, calc_crc32c(bytes(buffer[_ATTRIBUTES_AT:])))
    return bytes(buffer)


def read_fast(batches: Sequence[bytes], fetch_offset: int,
              aborted: list[tuple[int, int]] | None) -> tuple[list[tuple[int, bytes]], int]:
    records, next_offset, failure = batch_records(TP, MemoryRecords(b"".join(batches)),
                                                   fetch_offset, aborted, True)
    assert failure is None
    return [(r.offset, r.value or b"") for r in records], next_offset


def read_aiokafka(batches: Sequence[bytes], fetch_offset: int,
                  aborted: list[tuple[int, int]] | None) -> tuple[list[tuple[int, bytes]], int]:
    """What aiokafka's own fetcher returns for the same bytes."""
    isolation = READ_UNCOMMITTED if aborted is None else READ_COMMITTED
    records = PartitionRecords(TP, MemoryRecords(b"".join(batches)), aborted, fetch_offset,
                               None, None, True, isolation)
    found = [(r.offset, r.value) for r in records]
    return found, records.next_fetch_offset


# One partition's log: producer 7's transaction commits, producer 8's aborts (its batches
# interleaved with 7's and with a plain producer's), then 8's next transaction commits.
LOG = [
    batch(0, [b"plain-0", b"plain-1"]),                                  # 0-1
    batch(2, [b"p7-a", b"p7-b"], producer_id=7, transactional=True),     # 2-3
    batch(4, [b"p8-aborted-a"], producer_id=8, transactional=True),      # 4
    batch(5, [b"plain-2"]),                                              # 5
    batch(6, [b"p8-aborted-b", b"p8-aborted-c"], producer_id=8, transactional=True),  # 6-7
    marker(8, 7, commit=True),                                           # 8
    marker(9, 8, commit=False),                                          # 9
    batch(10, [b"p8-c"], producer_id=8, transactional=True),             # 10
    batch(11, [b"idempotent"], producer_id=9),                           # 11
    marker(12, 8, commit=True),                                          # 12
]
ABORTED = [(8, 4)]  # what the broker reports with a read_committed fetch of this range
COMMITTED = [(0, b"plain-0"), (1, b"plain-1"), (2, b"p7-a"), (3, b"p7-b"), (5, b"plain-2"),
             (10, b"p8-c"), (11, b"idempotent")]


def test_fast_path_skips_aborted_transactions_and_markers() -> None:
    assert read_fast(LOG, 0, ABORTED) == (COMMITTED, 13)
    assert read_fast(LOG, 0, ABORTED) == read_aiokafka(LOG, 0, list(ABORTED))


def test_fast_path_without_aborted_list_skips_only_markers() -> None:
    # read_uncommitted: the broker sends no aborted list, every data batch is returned
    everything = [(o, v) for o, v in read_aiokafka(LOG, 0, None)[0]]
    assert read_fast(LOG, 0, None) == (everything, 13)
    assert len(everything) == 10


def test_fast_path_positions_past_trailing_markers() -> None:
    # a fetch holding only markers and aborted batches returns nothing but moves on
    tail = LOG[4:7]  # p8-aborted-b/c, commit of 7, abort of 8
    assert read_fast(tail, 6, ABORTED) == ([], 10)
    assert read_fast(tail, 6, ABORTED) == read_aiokafka(tail, 6, list(ABORTED))
    assert read_fast([marker(3, 5, commit=True)], 3, []) == ([], 4)


def test_fast_path_abort_starts_where_the_list_says() -> None:
    # producer 8 committed once before the transaction it later aborted: only batches from
    # the aborted transaction's first offset on are skipped
    log = [
        batch(0, [b"p8-first"], producer_id=8, transactional=True),
        marker(1, 8, commit=True),
        batch(2, [b"p8-aborted"], producer_id=8, transactional=True),
        marker(3, 8, commit=False),
        batch(4, [b"after"]),
    ]
    expected = [(0, b"p8-first"), (4, b"after")]
    assert read_fast(log, 0, [(8, 2)]) == (expected, 5)
    assert read_fast(log, 0, [(8, 2)]) == read_aiokafka(log, 0, [(8, 2)])
    # from inside the log, after a seek: the aborted list still applies
    assert read_fast(log[2:], 2, [(8, 2)]) == ([(4, b"after")], 5)


def test_fast_path_from_inside_a_batch() -> None:
    assert read_fast(LOG[:2], 1, []) == ([(1, b"plain-1"), (2, b"p7-a"), (3, b"p7-b")], 4)


def test_reader_reads_committed_only() -> None:
    config = KafkaConfig("localhost:9", "t")
    assert PartitionReader(config)._options["isolation_level"] == "read_committed"
    with pytest.raises(ConfigError, match="read_uncommitted"):
        PartitionReader(config, consumer_options={"isolation_level": "read_uncommitted"})
    with pytest.raises(ConfigError, match="only committed records"):
        SnapshotView(config, consumer_options={"isolation_level": "read_uncommitted"})


# ------------------------------------------------------------------ on Apache Kafka

@pytest.fixture
async def one_partition(broker: BrokerAddress, topic_name: str) -> KafkaConfig:
    """A one-partition topic (so transactional and plain records share a log), with one
    plain record in it."""
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config, partitions=1) as publisher:
        await publisher.publish(make_snapshot(agent_name="first"))
    return config


@pytest.fixture
async def txn_producer(broker: BrokerAddress) -> AsyncIterator[AIOKafkaProducer]:
    """Another client's transactional producer."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers,
                                transactional_id=f"txn-{uuid.uuid4().hex[:8]}")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def write(producer: AIOKafkaProducer, topic: str, snapshots: Sequence[WorkspaceSnapshot],
                *, commit: bool | None) -> None:
    """Write `snapshots` in one transaction: committed, aborted, or (None) left open."""
    await producer.begin_transaction()
    for snapshot in snapshots:
        await (await producer.send(topic, encode(snapshot), key=snapshot.key.encode()))
    if commit is True:
        await producer.commit_transaction()
    elif commit is False:
        await producer.abort_transaction()


def sessions(view: SnapshotView) -> dict[str, WorkspaceSnapshot]:
    return {s.key: s for s in view.snapshots()}


def log_end(view: SnapshotView) -> int:
    """The partition's high watermark as the view's latest fetch reported it."""
    return view._reader.highwater(0) or -1


@pytest.mark.kafka
@pytest.mark.parametrize("decode", ["lazy", "eager"])
async def test_fresh_view_applies_committed_never_aborted(
    one_partition: KafkaConfig, txn_producer: AIOKafkaProducer, decode: Any
) -> None:
    config = one_partition
    kept = [make_snapshot(agent_name=f"kept-{i}") for i in range(5)]
    committed = [make_snapshot(agent_name=f"committed-{i}") for i in range(5)]
    await write(txn_producer, config.topic, kept + committed, commit=True)
    # the aborted transaction overwrites the committed sessions, deletes none, adds new ones
    overwrites = [s.replace(intent="aborted") for s in committed]
    new = [make_snapshot(agent_name=f"aborted-{i}") for i in range(5)]
    await write(txn_producer, config.topic, overwrites + new, commit=False)
    async with SnapshotPublisher(config) as publisher:
        last = await publisher.publish(make_snapshot(agent_name="last"))
    async with SnapshotView(config, decode=decode, fetch_max_wait_ms=20) as view:
        assert view.status == "live"
        await view.wait_for(last, timeout=WAIT_S)
        found = sessions(view)
        for snapshot in kept + committed:
            assert found[snapshot.key] == snapshot
        assert not any(s.key in found for s in new)
        assert len(found) == 1 + 10 + 1
        assert view.stats.decode_errors == 0
        assert view._applied[0] == last.offset + 1 == log_end(view)


@pytest.mark.kafka
async def test_live_view_never_applies_aborted(
    one_partition: KafkaConfig, txn_producer: AIOKafkaProducer
) -> None:
    config = one_partition
    async with SnapshotView(config, fetch_max_wait_ms=20) as view, \
            SnapshotPublisher(config) as publisher:
        stream = view.changes()
        committed = [make_snapshot(agent_name=f"committed-{i}") for i in range(4)]
        await write(txn_producer, config.topic, committed, commit=True)
        # (Kafka answers the commit once the coordinator logged it, and writes the markers to
        # the partitions after: a barrier right then may still find the records unstable)
        await eventually(lambda: all(view.get(s.session_id) == s for s in committed),
                         what="the committed transaction visible")
        overwrites = [s.replace(intent="aborted") for s in committed]
        new = [make_snapshot(agent_name=f"aborted-{i}") for i in range(4)]
        await write(txn_producer, config.topic, overwrites + new, commit=False)
        after_snapshot = make_snapshot(agent_name="after the abort")
        after = await publisher.publish(after_snapshot)
        await view.wait_for(after, timeout=WAIT_S)
        assert all(view.get(s.session_id) == s for s in committed)
        assert not any(s.session_id in view for s in new)
        changes: list[Change] = []
        while not changes or changes[-1].session_id != after.session_id:
            changes.append(await stream.__anext__())
        assert [c.new for c in changes] == [*committed, after_snapshot]
        # the view's position is the log's end, past the abort marker, wherever that lies:
        # the coordinator answers the abort once it has logged it and writes the marker to the
        # partition after that, so a record published at once can land before the marker.
        # aiokafka 0.11 sends an idle producer's first batch at once: `after` came first in 9
        # of 12 runs; 0.14 holds a new batch for linger_ms (the publisher's 5 ms): 0 of 12
        # (1 of 6 with linger_ms=0)
        await view.barrier(timeout=WAIT_S)
        assert view._applied[0] == log_end(view)
        assert log_end(view) in (after.offset + 1, after.offset + 2)  # (+2: the marker after)
        assert len(view) == 1 + len(committed) + 1


@pytest.mark.kafka
@pytest.mark.parametrize("commit", [True, False])
async def test_open_transaction_does_not_hang_start(
    one_partition: KafkaConfig, txn_producer: AIOKafkaProducer, commit: bool
) -> None:
    # KAFKA-6190: a read_committed reader whose catch-up target is the high watermark hangs
    # while a transaction is open. The view's target is the last stable offset: start returns
    # at once with what is stable; what lies behind the open transaction (even plain records)
    # shows when it ends
    config = one_partition
    before = make_snapshot(agent_name="before")
    async with SnapshotPublisher(config) as publisher:
        before_receipt = await publisher.publish(before)
        pending = [make_snapshot(agent_name=f"pending-{i}") for i in range(3)]
        await write(txn_producer, config.topic, pending, commit=None)
        behind = make_snapshot(agent_name="behind the open transaction")
        behind_receipt = await publisher.publish(behind)
        began = time.monotonic()
        async with SnapshotView(config, fetch_max_wait_ms=20, start_timeout_s=WAIT_S) as view:
            assert view.status == "live", view.status_reason
            assert time.monotonic() - began < WAIT_S / 2
            assert view.get(before.session_id) == before
            assert view._applied[0] == before_receipt.offset + 1  # the LSO
            await view.barrier(timeout=WAIT_S)  # returns: the stable records are all in
            assert behind.session_id not in view
            assert not any(s.session_id in view for s in pending)
            assert view.stats.lag == {0: 0}
            if commit:
                await txn_producer.commit_transaction()
            else:
                await txn_producer.abort_transaction()
            await view.wait_for(behind_receipt, timeout=WAIT_S)
            assert view.get(behind.session_id) == behind
            assert all((s.session_id in view) == commit for s in pending)
            await view.barrier(timeout=WAIT_S)
            assert view._applied[0] == log_end(view)  # past the marker


@pytest.mark.kafka
async def test_markers_do_not_break_positions(
    one_partition: KafkaConfig, txn_producer: AIOKafkaProducer, tmp_path: Any
) -> None:
    # every transaction leaves a marker at an offset no record has: positions, wait_for,
    # checkpoints and replay's end must step over them
    config = one_partition
    written: list[WorkspaceSnapshot] = []
    for i in range(6):
        batch_ = [make_snapshot(agent_name=f"txn-{i}-{j}") for j in range(2)]
        await write(txn_producer, config.topic, batch_, commit=i % 3 != 2)
        if i % 3 != 2:
            written += batch_
    path = tmp_path / "view.ckpt"
    async with SnapshotView(config, fetch_max_wait_ms=20, checkpoint_path=path) as view:
        end = log_end(view)
        assert view._applied[0] == end  # the last marker counted
        assert view.stats.lag == {0: 0}
        assert all(view.get(s.session_id) == s for s in written)
        expected = sessions(view)
    assert len(expected) == 1 + len(written)
    async with SnapshotPublisher(config) as publisher:
        more = make_snapshot(agent_name="after the markers")
        receipt = await publisher.publish(more)
    async with SnapshotView(config, fetch_max_wait_ms=20, checkpoint_path=path) as view:
        assert view.stats.checkpoint_sessions == len(expected)
        await view.wait_for(receipt, timeout=WAIT_S)
        assert sessions(view) == {**expected, more.key: more}
    replayed = [event.snapshot async for event in replay(config, use_history=False)]
    assert sorted(s.key for s in replayed if s is not None) == sorted(
        [*expected, more.key])




@pytest.mark.kafka
async def test_transaction_left_open_ends_at_its_timeout(
    broker: BrokerAddress, one_partition: KafkaConfig
) -> None:
    # a writer that dies with its transaction open: the coordinator aborts it after the
    # transaction timeout (checked every 10 s by default), and the view moves on
    config = one_partition
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers,
                                transactional_id=f"txn-{uuid.uuid4().hex[:8]}",
                                transaction_timeout_ms=1000)
    await producer.start()
    try:
        pending = [make_snapshot(agent_name=f"pending-{i}") for i in range(3)]
        await write(producer, config.topic, pending, commit=None)
        async with SnapshotView(config, fetch_max_wait_ms=20) as view, \
                SnapshotPublisher(config) as publisher:
            assert view.status == "live"
            behind = await publisher.publish(make_snapshot(agent_name="behind"))
            await view.wait_for(behind, timeout=WAIT_S)
            assert not any(s.session_id in view for s in pending)
    finally:
        await producer.stop()
