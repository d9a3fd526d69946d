"""Record batches that fail their CRC check on the wire: nothing is lost, nothing is skipped.

A fault proxy flips one bit of a record's bytes in the broker's fetch responses (the stored
log stays intact): a few times (a transient corruption, read again), or on every fetch (a
damaged copy: `CorruptBatchError`, naming where, after every record before it was returned).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord

from snapbus import CorruptBatchError, KafkaConfig, SnapshotPublisher, ViewError, replay
from snapbus.broker import EmbeddedBroker
from snapbus.reader import PartitionReader
from snapbus.view import SnapshotView
from tests.faultproxy import FaultProxy, proxied_broker
from tests.helpers import WAIT_S, make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_aiokafka")]


@pytest.fixture(scope="module")
async def network() -> AsyncIterator[tuple[FaultProxy, EmbeddedBroker]]:
    """This module's broker behind a fault proxy that forwards whole responses."""
    async with proxied_broker(frames=True) as pair:
        yield pair


@pytest.fixture
async def proxy(network: tuple[FaultProxy, EmbeddedBroker]) -> AsyncIterator[FaultProxy]:
    proxy, _ = network
    proxy.corrupt(b"", 0)
    yield proxy
    proxy.corrupt(b"", 0)


async def fill(config: KafkaConfig) -> tuple[bytes, list[int], int]:
    """Write 9 sessions one by one to a 1-partition topic, the 6th marked; return the marker,
    every offset, and the marked one's."""
    marker = f"corrupt-me-{uuid.uuid4().hex}".encode()
    offsets: list[int] = []
    async with SnapshotPublisher(config, partitions=1) as publisher:
        for i in range(9):
            intent = marker.decode() if i == 5 else f"intent {i}"
            offsets.append((await publisher.publish(make_snapshot(intent=intent))).offset)
    return marker, offsets, offsets[5]


async def read_all(reader: PartitionReader, offsets: list[int]) -> list[int]:
    """Read partition 0 until the reader's position passes the last offset."""
    got: list[int] = []
    for _ in range(1000):
        batches = await reader.read(timeout_ms=50)
        got += [record.offset for record in batches.get(0, [])]
        if reader.positions[0] > offsets[-1]:
            return got
    raise AssertionError(f"not caught up: read {got}, position {reader.positions}")


async def test_a_transiently_corrupt_batch_is_read_again_and_nothing_is_skipped(
        network: tuple[FaultProxy, EmbeddedBroker], proxy: FaultProxy, topic_name: str) -> None:
    config = KafkaConfig(proxy.address, topic_name)
    marker, offsets, _ = await fill(config)
    before = proxy.counters.corrupted
    proxy.corrupt(marker, times=2)
    reader = PartitionReader(config, fetch_max_wait_ms=50)
    await reader.open()
    try:
        assert await read_all(reader, offsets) == offsets
        # (a response corrupted while the partition rested is dropped unread, not counted)
        assert 1 <= reader.corrupt_fetches <= 2
    finally:
        await reader.close()
    assert proxy.counters.corrupted - before == 2


async def test_a_view_applies_every_session_around_a_transiently_corrupt_batch(
        network: tuple[FaultProxy, EmbeddedBroker], proxy: FaultProxy, topic_name: str) -> None:
    # before the fix, a view lost the records of the partitions drained in the same read as
    # the corrupt batch, and those of its own batches before it (Tansu's fetch responses
    # hold one batch: there the partitions show it)
    config = KafkaConfig(proxy.address, topic_name)
    marker = f"corrupt-me-{uuid.uuid4().hex}".encode()
    written = [make_snapshot(session_id=session_on(p)) for p in (0, 1, 0, 1, 0, 1)]
    written.insert(4, make_snapshot(session_id=session_on(1), intent=marker.decode()))
    async with SnapshotPublisher(config, partitions=2) as publisher:
        for snapshot in written:
            await publisher.publish(snapshot)
    before = proxy.counters.corrupted
    proxy.corrupt(marker, times=2)
    async with SnapshotView(config, fetch_max_wait_ms=50, start_timeout_s=WAIT_S) as view:
        assert view.status == "live"
        assert {s.session_id for s in view.snapshots()} == {s.session_id for s in written}
    assert proxy.counters.corrupted - before == 2


def session_on(partition: int, partitions: int = 2) -> uuid.UUID:
    """A new session id that the publisher's partitioner (murmur2) puts on `partition`."""
    while True:
        session_id = uuid.uuid4()
        if (murmur2(str(session_id).encode()) & 0x7FFFFFFF) % partitions == partition:
            return session_id


async def test_a_batch_corrupt_on_every_fetch_raises_after_returning_all_before_it(
        network: tuple[FaultProxy, EmbeddedBroker], proxy: FaultProxy, topic_name: str) -> None:
    config = KafkaConfig(proxy.address, topic_name)
    marker, offsets, bad = await fill(config)
    proxy.corrupt(marker, times=1_000_000)
    reader = PartitionReader(config, fetch_max_wait_ms=50)
    await reader.open()
    got: list[int] = []
    try:
        with pytest.raises(CorruptBatchError) as raised:
            await read_into(reader, got)
        assert reader.positions[0] == bad
    finally:
        await reader.close()
    assert got == offsets[:5]  # every record before it, once; none after it
    error = raised.value
    assert (error.topic, error.partition, error.offset) == (topic_name, 0, bad)
    assert not error.retriable
    assert str(error).startswith(
        f"the record batch at offset {bad} of {topic_name}[0] failed 3 fetches in a row "
        "(CRC mismatch)")
    assert "\n" not in str(error)

    events: list[int] = []
    with pytest.raises(CorruptBatchError, match=f"offset {bad} of {topic_name}"):
        await replay_into(config, events)
    assert events == offsets[:5]


async def test_a_view_fails_naming_a_batch_corrupt_on_every_fetch(
        network: tuple[FaultProxy, EmbeddedBroker], proxy: FaultProxy, topic_name: str) -> None:
    # (it does not skip it: pods would disagree; it does not retry it silently forever)
    config = KafkaConfig(proxy.address, topic_name)
    marker, _, bad = await fill(config)
    proxy.corrupt(marker, times=1_000_000)
    view = SnapshotView(config, fetch_max_wait_ms=50, start_timeout_s=WAIT_S)
    try:
        with pytest.raises(ViewError, match=rf"offset {bad} of {topic_name}\[0\] failed 3"):
            await view.start()
        assert view.status == "failed"
        assert isinstance(view._failure, CorruptBatchError)
    finally:
        await view.stop()


async def read_into(reader: PartitionReader, got: list[int]) -> None:
    for _ in range(1000):
        got += [r.offset for r in (await reader.read(timeout_ms=50)).get(0, [])]


async def replay_into(config: KafkaConfig, events: list[int]) -> None:
    async for event in replay(config):
        events.append(event.offset)


async def test_the_fast_path_reads_the_records_where_aiokafka_allows_it(
        broker: EmbeddedBroker, topic_name: str) -> None:
    # the raw fetch buffer is read with the aiokafka versions pyproject.toml allows: records
    # come as the batches hold them, never as ConsumerRecords (getmany's)
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config, partitions=1) as publisher:
        last = await publisher.publish(make_snapshot())
    reader = PartitionReader(config, fetch_max_wait_ms=50)
    await reader.open()
    try:
        assert reader._raw
        records = []
        for _ in range(1000):
            records += (await reader.read(timeout_ms=50)).get(0, [])
            if reader.positions[0] > last.offset:
                break
        assert [r.offset for r in records] == [last.offset]
        assert not isinstance(records[0], ConsumerRecord)
    finally:
        await reader.close()

