"""Issue 21: views following several concurrent writers see every acknowledged record.

Tansu 0.6 raises a partition's high watermark before it stores the batch; a fetch in that
moment returns the records after the missing batch, and a consumer that took them moved past
an acknowledged record for good (docs/demo-convergence.md). These tests write from several
publishers at once to one partition while views follow it: on Tansu they failed before the
reader held its position at such a hole; on Apache Kafka there are no such holes.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from snapbus.codec import encode
from snapbus.config import KafkaConfig
from snapbus.demo import _prime_partitions, run_demo
from snapbus.publisher import SnapshotPublisher
from snapbus.reader import PartitionReader
from snapbus.topic import ensure_topic
from snapbus.view import SnapshotView
from tests.conftest import BrokerAddress
from tests.helpers import WAIT_S, eventually, make_snapshot

WRITE_S = 4.0
"""How long the publishers write: a Tansu tail skipped a record about every 2.5 s."""


async def _write(publisher: SnapshotPublisher, until: float, acked: set[uuid.UUID]) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        snapshot = make_snapshot(session_id=uuid.uuid4())
        await publisher.publish(snapshot)
        acked.add(snapshot.session_id)


async def test_views_following_concurrent_writers_show_every_acknowledged_session(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=1)
    await _prime_partitions(config)  # (the other Tansu problem: a fresh partition's first)
    acked: set[uuid.UUID] = set()
    async with contextlib.AsyncExitStack() as stack:
        views = [await stack.enter_async_context(SnapshotView(config, fetch_max_wait_ms=20))
                 for _ in range(4)]
        publishers = [await stack.enter_async_context(SnapshotPublisher(config, linger_ms=0))
                      for _ in range(3)]
        until = asyncio.get_running_loop().time() + WRITE_S
        await asyncio.gather(*(_write(p, until, acked) for p in publishers))
        for view in views:
            await view.barrier(timeout=WAIT_S)
        missing = [len(acked - {s.session_id for s in view.snapshots()}) for view in views]
        assert missing == [0] * len(views), f"sessions missing per view, of {len(acked)}"


async def test_a_reader_waits_at_a_hole_and_takes_the_records_once_it_filled(
    broker: BrokerAddress, topic_name: str
) -> None:
    # Offsets read by a reader are the log's, in order, each once, even while writers race
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=1)
    await _prime_partitions(config)
    reader = PartitionReader(config, fetch_max_wait_ms=20)
    await reader.open()
    seen: list[int] = []
    stop = asyncio.Event()

    async def follow() -> None:
        while not stop.is_set():
            for records in (await reader.read(timeout_ms=50)).values():
                seen.extend(r.offset for r in records)

    follower = asyncio.create_task(follow())
    try:
        acked: set[uuid.UUID] = set()
        async with contextlib.AsyncExitStack() as stack:
            publishers = [await stack.enter_async_context(
                SnapshotPublisher(config, linger_ms=0)) for _ in range(3)]
            until = asyncio.get_running_loop().time() + WRITE_S
            await asyncio.gather(*(_write(p, until, acked) for p in publishers))
            end = (await publishers[0].publish(make_snapshot())).offset + 1
        await eventually(lambda: reader.positions.get(0, 0) >= end, what="the reader at the end")
    finally:
        stop.set()
        await follower
        await reader.close()
    assert seen == list(range(end)), [o for o in range(end) if o not in set(seen)][:10]


async def test_priming_records_are_no_misplaced_records(
    broker: BrokerAddress, topic_name: str
) -> None:
    # one tombstone per partition, each keyed to belong there: views apply them (deletes of
    # absent sessions), never count, log or dead-letter them as misplaced
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=12)
    await _prime_partitions(config)
    async with SnapshotView(config, fetch_max_wait_ms=20) as view:
        await view.barrier(timeout=WAIT_S)
        stats = view.stats
    assert stats.misplaced == 0
    assert stats.records_applied == 12
    assert stats.sessions == 0


@pytest.mark.parametrize("pods", [3])
async def test_the_demo_converges_with_pods_writing_at_full_speed(
    broker: BrokerAddress, topic_name: str, pods: int
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config)
    await _prime_partitions(config)
    result = await run_demo(config, pods=pods, duration_s=2.0, rate=0)
    assert result.converged, result.mismatches


async def _read_until(reader: PartitionReader, end: int) -> list[int]:
    seen: list[int] = []
    while reader.positions.get(0, 0) < end:
        for records in (await reader.read(timeout_ms=50)).values():
            seen.extend(r.offset for r in records)
        assert not reader._holes, "a transaction marker was taken for a hole"
    return seen


async def write_transactions(config: KafkaConfig, commits: list[bool]) -> None:
    """One transaction of one record per entry, committed (True) or aborted (False)."""
    producer = AIOKafkaProducer(transactional_id=f"t-{config.topic}", **config.client_kwargs())
    await producer.start()
    try:
        for commit in commits:
            await producer.begin_transaction()
            await producer.send_and_wait(config.topic, encode(make_snapshot()), key=b"k")
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_transaction_markers_are_no_hole(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=1)
    await write_transactions(config, commits=[True, True])
    async with SnapshotPublisher(config) as publisher:
        receipt = await publisher.publish(make_snapshot())
    reader = PartitionReader(config, fetch_max_wait_ms=20)
    await reader.open()
    try:
        seen = await asyncio.wait_for(_read_until(reader, receipt.offset + 1), WAIT_S)
    finally:
        await reader.close()
    assert seen == [0, 2, receipt.offset]  # (1 and 3: commit markers)


@pytest.mark.kafka
async def test_aborted_records_are_no_hole(
    broker: BrokerAddress, topic_name: str
) -> None:
    # A read_committed fetch skips an aborted transaction's records and its marker: the reader
    # knows them, so it goes on at once (no hold, nothing passed as a real gap)
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config, partitions=1)
    await write_transactions(config, commits=[False])
    async with SnapshotPublisher(config) as publisher:
        receipt = await publisher.publish(make_snapshot())
    reader = PartitionReader(config, fetch_max_wait_ms=20)
    await reader.open()
    seen: list[int] = []
    try:
        async def follow() -> None:
            while reader.positions.get(0, 0) <= receipt.offset:
                for records in (await reader.read(timeout_ms=50)).values():
                    seen.extend(r.offset for r in records)

        await asyncio.wait_for(follow(), WAIT_S)
    finally:
        await reader.close()
    assert seen == [receipt.offset]
    assert reader._holes == {}
    assert reader._holes_ok_below == {}  # never held
