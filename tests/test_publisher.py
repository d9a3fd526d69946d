"""SnapshotPublisher against the real broker: receipts, keys, tombstones, validation, partitions."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from snapbus.codec import decode, default_codec, encode
from snapbus.config import KafkaConfig
from snapbus.errors import ConfigError, KafkaUnavailableError, PublishError, ValidationError
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.topic import DEFAULT_PARTITIONS, ensure_topic
from snapbus.view import SnapshotView
from tests.helpers import ENGINE, make_snapshot, topic_partitions

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress


async def read_topic(
    bootstrap_servers: str, topic: str, timeout: float = 20.0
) -> tuple[dict[int, int], list[ConsumerRecord[bytes, bytes]]]:
    """Read a topic to its end with a fresh raw consumer.

    Returns the high watermark of each partition, as reported by fetch responses (which are
    correct on every broker, unlike ListOffsets on some), and every record read.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    partitions = await topic_partitions(bootstrap_servers, topic)
    assert partitions, f"topic {topic} should exist before it is read"
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for batch in batches.values():
                records.extend(batch)
            highwater = {tp.partition: consumer.highwater(tp) for tp in tps}
            if all(hw is not None for hw in highwater.values()):
                positions = {tp.partition: await consumer.position(tp) for tp in tps}
                if all(positions[p] >= hw for p, hw in highwater.items()):
                    return {p: int(hw) for p, hw in highwater.items()}, records
            assert asyncio.get_running_loop().time() < deadline, "topic not read in time"
    finally:
        await consumer.stop()


def record_at(records: list[ConsumerRecord[bytes, bytes]], receipt: Receipt) -> Any:
    matches = [r for r in records if (r.partition, r.offset) == (receipt.partition, receipt.offset)]
    assert len(matches) == 1, f"no single record at {receipt.partition}@{receipt.offset}"
    return matches[0]


async def test_publish_returns_receipt(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshot = make_snapshot()
    before_ms = int(time.time() * 1000)

    async with SnapshotPublisher(config) as publisher:
        assert publisher.topic == topic_name
        receipt = await publisher.publish(snapshot)

    after_ms = int(time.time() * 1000)
    assert isinstance(receipt, Receipt)
    assert receipt.topic == topic_name
    assert 0 <= receipt.partition < DEFAULT_PARTITIONS
    assert receipt.offset >= 0
    assert receipt.session_id == snapshot.session_id
    assert receipt.tombstone is False
    # a wall-clock timestamp of this run (with slack for clock granularity), not a latency check
    assert before_ms - 5_000 <= receipt.timestamp_ms <= after_ms + 5_000
    assert receipt.timestamp is not None
    assert receipt.timestamp.tzinfo is not None

    _, records = await read_topic(broker.bootstrap_servers, topic_name)
    stored = record_at(records, receipt)
    assert stored.key == str(snapshot.session_id).encode("ascii")
    assert decode(stored.value) == snapshot


async def test_same_session_always_same_partition(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshot = make_snapshot()
    states = ["active", "submitted", "merged", "active", "abandoned", "active"]

    async with SnapshotPublisher(config) as publisher:
        receipts = [await publisher.publish(snapshot.replace(state=s)) for s in states]
        receipts.append(await publisher.touch(snapshot))
        receipts.append(await publisher.evict(str(snapshot.session_id).upper()))
        receipts.append(await publisher.publish(snapshot))

    assert len({r.partition for r in receipts}) == 1
    offsets = [r.offset for r in receipts]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == len(offsets)
    assert {r.session_id for r in receipts} == {snapshot.session_id}
    expected = DefaultPartitioner()(
        snapshot.key.encode("ascii"), list(range(DEFAULT_PARTITIONS)), []
    )
    assert receipts[0].partition == expected


async def test_evict_publishes_null_tombstone(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshot = make_snapshot()

    async with SnapshotPublisher(config) as publisher:
        published = await publisher.publish(snapshot)
        # any UUID spelling is accepted; the key is always the canonical lowercase form
        evicted = await publisher.evict("{" + str(snapshot.session_id).upper() + "}")
        evicted_by_uuid = await publisher.evict(snapshot.session_id)

    for receipt in (evicted, evicted_by_uuid):
        assert receipt.tombstone is True
        assert receipt.session_id == snapshot.session_id
        assert receipt.partition == published.partition
    assert published.offset < evicted.offset < evicted_by_uuid.offset

    _, records = await read_topic(broker.bootstrap_servers, topic_name)
    for receipt in (evicted, evicted_by_uuid):
        tombstone = record_at(records, receipt)
        assert tombstone.key == str(snapshot.session_id).encode("ascii")
        assert tombstone.key == tombstone.key.lower()
        assert tombstone.value is None
    assert decode(record_at(records, published).value) == snapshot


async def test_publish_many_returns_receipts_in_order(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    sessions = [make_snapshot(agent_name=f"agent-{i}") for i in range(10)]
    batch = [
        s.replace(intent=f"{s.agent_name} step {step}") for step in range(3) for s in sessions
    ]

    async with SnapshotPublisher(config) as publisher:
        receipts = await publisher.publish_many(batch)
        assert await publisher.publish_many([]) == []

    assert [r.session_id for r in receipts] == [s.session_id for s in batch]
    assert not any(r.tombstone for r in receipts)
    for session in sessions:
        mine = [r for r in receipts if r.session_id == session.session_id]
        assert len({r.partition for r in mine}) == 1
        assert [r.offset for r in mine] == sorted(r.offset for r in mine)

    _, records = await read_topic(broker.bootstrap_servers, topic_name)
    assert len(records) == len(batch)
    for snapshot, receipt in zip(batch, receipts, strict=True):
        stored = record_at(records, receipt)
        assert stored.key == snapshot.key.encode("ascii")
        assert decode(stored.value) == snapshot


async def test_invalid_input_is_rejected_before_sending(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    good = make_snapshot()
    oversized = make_snapshot(intent="x" * 5_000)
    other = make_snapshot()

    async with SnapshotPublisher(config, max_value_bytes=4_096) as publisher:
        stored = await publisher.publish(good)

        with pytest.raises(ValidationError, match="WorkspaceSnapshot"):
            await publisher.publish(good.to_dict())  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await publisher.publish(None)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="4096-byte limit") as too_big:
            await publisher.publish(oversized)
        assert too_big.value.field == "intent"
        with pytest.raises(ValidationError):
            await publisher.touch(oversized)
        for bad_id in ("not-a-uuid", "", "   ", 42, None):
            with pytest.raises(ValidationError):
                await publisher.evict(bad_id)  # type: ignore[arg-type]
        # one bad snapshot in a batch: nothing of the batch is sent
        with pytest.raises(ValidationError):
            await publisher.publish_many([other, oversized])
        with pytest.raises(ValidationError):
            await publisher.publish_many([other, "not a snapshot"])  # type: ignore[list-item]
        # the batch is checked by a size bound first: 2-byte characters are counted exactly
        # when the bound (4 bytes each) is over the limit
        with pytest.raises(ValidationError, match="4096-byte limit"):
            await publisher.publish_many([other, make_snapshot(intent="é" * 2_100)])
        fits = make_snapshot(intent="é" * 1_500)
        bound = default_codec().size_bound(fits)
        assert bound is not None
        assert len(encode(fits)) < 4_096 < bound
        stored_too = (await publisher.publish_many([fits]))[0]

    highwater, records = await read_topic(broker.bootstrap_servers, topic_name)
    assert sum(highwater.values()) == 2
    assert highwater[stored.partition] >= stored.offset + 1
    assert sorted((decode(r.value) for r in records), key=lambda s: s.key) == sorted(
        [good, fits], key=lambda s: s.key)
    assert stored_too.key == fits.key


async def test_publisher_not_running_raises_publish_error(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshot = make_snapshot()

    never_started = SnapshotPublisher(config)
    with pytest.raises(PublishError, match="not started"):
        await never_started.publish(snapshot)
    await never_started.stop()

    publisher = SnapshotPublisher(config)
    await publisher.start()
    await publisher.start()  # starting twice is harmless
    await publisher.publish(snapshot)
    await publisher.stop()
    await publisher.stop()  # stopping twice is harmless

    with pytest.raises(PublishError, match="stopped"):
        await publisher.publish(snapshot)
    with pytest.raises(PublishError, match="stopped"):
        await publisher.evict(snapshot.session_id)
    with pytest.raises(PublishError, match="stopped") as raised:
        await publisher.publish_many([snapshot])
    assert not raised.value.retriable  # (the same call fails the same way)
    # as a stopped view's start raises ViewError: the object's own error, not retriable
    with pytest.raises(PublishError, match="cannot be restarted") as raised:
        await publisher.start()
    assert not raised.value.retriable

    highwater, _ = await read_topic(broker.bootstrap_servers, topic_name)
    assert sum(highwater.values()) == 1


async def test_librdkafka_murmur2_producer_agrees_on_partitions(
    broker: BrokerAddress, topic_name: str
) -> None:
    """A producer in another language, set to murmur2, lands each key where snapbus does."""
    import confluent_kafka  # (the test extra installs it: a missing one fails, never skips)
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    firsts = [make_snapshot(agent_name=f"agent-{i}") for i in range(24)]
    seconds = [s.replace(state="submitted", intent=f"from librdkafka {i}")
               for i, s in enumerate(firsts)]
    all_partitions = list(range(DEFAULT_PARTITIONS))

    async with SnapshotPublisher(config) as publisher, SnapshotView(
        config, fetch_max_wait_ms=20
    ) as view:
        receipts = await publisher.publish_many(firsts)

        delivered: list[tuple[Any, bytes, int, int]] = []

        def on_delivery(err: Any, msg: Any) -> None:
            delivered.append((err, msg.key(), msg.partition(), msg.offset()))

        producer = confluent_kafka.Producer(
            {
                "bootstrap.servers": broker.bootstrap_servers,
                "partitioner": "murmur2_random",
                "acks": "all",
                "enable.idempotence": False,
            }
        )
        for snapshot in seconds:
            producer.produce(
                topic_name, key=snapshot.key.encode("ascii"), value=encode(snapshot),
                on_delivery=on_delivery,
            )
        assert await asyncio.to_thread(producer.flush, 30) == 0

        assert [err for err, *_ in delivered] == [None] * len(seconds)
        chosen = {key: partition for _, key, partition, _ in delivered}
        for snapshot, receipt in zip(firsts, receipts, strict=True):
            key = snapshot.key.encode("ascii")
            assert chosen[key] == receipt.partition
            assert chosen[key] == DefaultPartitioner()(key, all_partitions, all_partitions)
        assert len(set(chosen.values())) > 1  # the keys really spread over partitions

        await view.barrier(timeout=20)
        for snapshot in seconds:
            assert view.get(snapshot.session_id) == snapshot
        assert view.stats.decode_errors == 0


async def test_publisher_ensures_topic_on_start(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    async with SnapshotPublisher(config, partitions=3) as publisher:
        receipt = await publisher.publish(make_snapshot())

    info = await ensure_topic(config)
    assert info.compacted is True
    assert info.partitions == 3
    assert info.created is False
    assert 0 <= receipt.partition < 3


@pytest.mark.parametrize("ensure", [True, False])
async def test_unreachable_cluster_raises_unavailable(ensure: bool) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = KafkaConfig(f"127.0.0.1:{port}", "whatever", connect_timeout_s=1.0)
    publisher = SnapshotPublisher(config, ensure_topic=ensure)

    # the bound is generous: the point is that start gives up instead of hanging
    with pytest.raises(KafkaUnavailableError):
        await asyncio.wait_for(publisher.start(), timeout=15)
    with pytest.raises(PublishError, match="not started"):
        await publisher.publish(make_snapshot())
    await publisher.stop()


def test_the_cached_partitioner_is_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    from snapbus.publisher import _MurmurPartitioner

    cached = _MurmurPartitioner(size=64)  # small: the cache is cleared and refilled too
    default = DefaultPartitioner()
    keys = [make_snapshot().key.encode() for _ in range(300)]
    for partitions in (1, 3, 12, 50):
        all_partitions = list(range(partitions))
        for key in keys + keys[:50]:  # hits and misses
            assert cached(key, all_partitions, all_partitions) == default(
                key, all_partitions, all_partitions)
    assert cached(None, [0, 1], [1]) == 1  # no key: an available partition, like the default


async def test_idempotent_where_the_broker_allows_it(
    broker: BrokerAddress, topic_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # idempotence=None (the default): on with Apache Kafka; Tansu refuses InitProducerId
    # (UnknownError) and gets a plain producer, with one warning
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    with caplog.at_level(logging.WARNING, logger="snapbus.publisher"):
        async with SnapshotPublisher(config) as publisher:
            snapshot = make_snapshot()
            receipt = await publisher.publish(snapshot)
            assert publisher.idempotent == (ENGINE == "kafka")
    refusals = [r for r in caplog.records if "refused the idempotent producer" in r.message]
    assert len(refusals) == (0 if ENGINE == "kafka" else 1)
    _, records = await read_topic(broker.bootstrap_servers, topic_name)
    assert [(r.partition, r.offset, decode(r.value)) for r in records] == [
        (receipt.partition, receipt.offset, snapshot)]


async def test_idempotence_required_or_off(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config, idempotence=False) as publisher:
        assert not publisher.idempotent
        await publisher.publish(make_snapshot())
    required = SnapshotPublisher(config, idempotence=True)
    if ENGINE == "kafka":
        async with required:
            assert required.idempotent
    else:
        with pytest.raises(KafkaUnavailableError, match="refused the idempotent producer"):
            await required.start()
        await required.stop()


def test_idempotence_needs_acks_all() -> None:
    config = KafkaConfig("localhost:9", "t")
    with pytest.raises(ConfigError, match="acks='all'"):
        SnapshotPublisher(config, acks=1, idempotence=True)
    assert SnapshotPublisher(config, acks=1)._producer_kwargs["enable_idempotence"] is False
