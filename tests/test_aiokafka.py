"""`snapbus._aiokafka`, the one module that touches aiokafka's internals, broker-free.

The version check is pinned to pyproject.toml's range, and `read_buffer` (the reader's fast
path) runs on a real, unstarted `AIOKafkaConsumer` whose fetch buffer is filled by hand with
real v2 batches (`tests/test_reader_batches.py` has the batches and the buffer, and tests
`drain` and `batch_records`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiokafka
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import ConsumerStoppedError, TopicAuthorizationFailedError

from snapbus import KafkaConfig, SnapshotPublisher, _aiokafka
from snapbus.reader import PartitionReader
from tests.helpers import eventually, make_snapshot
from tests.test_reader_batches import Buffer, batch

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_the_verified_versions_are_the_range_pyproject_allows() -> None:
    # a range widened in pyproject.toml without checking the internals again fails here
    found = re.search(r'"aiokafka>=0\.(\d+),<0\.(\d+)"', PYPROJECT.read_text())
    assert found, "pyproject.toml: expected aiokafka>=0.a,<0.b"
    low, high = int(found[1]), int(found[2])
    assert set(_aiokafka.VERIFIED_VERSIONS) == {(0, minor) for minor in range(low, high)}


def test_the_installed_aiokafka_is_verified() -> None:
    installed = tuple(int(x) for x in aiokafka.__version__.split(".")[:2])
    assert installed == _aiokafka.AIOKAFKA_VERSION
    assert _aiokafka.VERIFIED


@pytest.fixture(autouse=True)
def consumers() -> Iterator[list[Any]]:
    """The consumers a test made, marked closed after it (never started: nothing to stop)."""
    made: list[Any] = []
    yield made
    for consumer in made:
        consumer._closed = True


def unstarted_consumer(consumers: list[Any]) -> Any:
    consumer: Any = AIOKafkaConsumer(bootstrap_servers="localhost:1")
    consumers.append(consumer)
    return consumer


def consumer_on(buffer: Buffer, consumers: list[Any]) -> Any:
    """A real `AIOKafkaConsumer`, never started, reading `buffer` (as `start()` would wire it)."""
    consumer = unstarted_consumer(consumers)
    fetcher = buffer.fetcher
    fetcher._fetch_waiters = set()
    fetcher._loop = asyncio.get_running_loop()
    consumer._subscription = buffer.subscription
    consumer._fetcher = fetcher
    return consumer


async def test_fast_path_needs_a_fetch_buffer(consumers: list[Any]) -> None:
    assert not _aiokafka.fast_path_supported(unstarted_consumer(consumers))
    assert _aiokafka.fast_path_supported(consumer_on(Buffer(), consumers))


async def test_read_buffer_returns_buffered_records_as_the_batches_hold_them(
        consumers: list[Any]) -> None:
    buffer = Buffer(partitions=2)
    buffer.fetched(0, batch(0, 3))
    buffer.fetched(1, batch(0, 2))
    got = await _aiokafka.read_buffer(consumer_on(buffer, consumers), 1.0, None, {}, {})
    assert {p: [r.offset for r in records] for p, records in got.items()} == {
        0: [0, 1, 2], 1: [0, 1]}
    assert not isinstance(got[0][0], aiokafka.structs.ConsumerRecord)
    assert (buffer.position(0), buffer.position(1)) == (3, 2)


async def test_read_buffer_wakes_when_a_fetch_arrives(consumers: list[Any]) -> None:
    buffer = Buffer()
    consumer = consumer_on(buffer, consumers)

    def arrive() -> None:  # what the fetcher does when a response comes: buffer, then notify
        assert buffer.fetcher._fetch_waiters, "read_buffer is not waiting"
        buffer.fetched(0, batch(0, 2))
        for waiter in list(buffer.fetcher._fetch_waiters):
            buffer.fetcher._notify(waiter)

    reading = asyncio.ensure_future(_aiokafka.read_buffer(consumer, 30.0, None, {}, {}))
    asyncio.get_running_loop().call_soon(arrive)  # (runs after the read's first step: it waits)
    got = await asyncio.wait_for(reading, timeout=5)
    assert [r.offset for r in got[0]] == [0, 1]


async def test_read_buffer_gives_up_empty_at_its_timeout(consumers: list[Any]) -> None:
    buffer = Buffer()
    assert await _aiokafka.read_buffer(consumer_on(buffer, consumers), 0.01, None, {}, {}) == {}
    assert all(waiter.cancelled() for waiter in buffer.fetcher._fetch_waiters)


async def test_read_buffer_reports_a_failed_batch_and_a_fetch_error(consumers: list[Any]) -> None:
    buffer = Buffer()
    buffer.fetched(0, batch(0, 2), batch(2, 2, corrupt=True))
    failed: dict[int, tuple[int, str]] = {}
    got = await _aiokafka.read_buffer(consumer_on(buffer, consumers), 1.0, None, {}, failed)
    assert [r.offset for r in got[0]] == [0, 1]
    assert failed == {0: (2, "CRC mismatch")}
    buffer.failed(0, TopicAuthorizationFailedError())
    with pytest.raises(TopicAuthorizationFailedError):
        await _aiokafka.read_buffer(consumer_on(buffer, consumers), 1.0, None, {}, {})


async def test_read_buffer_refuses_a_stopped_consumer(consumers: list[Any]) -> None:
    consumer = consumer_on(Buffer(), consumers)
    consumer._closed = True
    with pytest.raises(ConsumerStoppedError):
        await _aiokafka.read_buffer(consumer, 1.0, None, {}, {})


async def test_log_ends_answers_in_one_round_trip(broker: BrokerAddress, topic_name: str) -> None:
    # the barrier's quick path: on aiokafka before 0.14 its side connection needed the leader
    # made known as a coordinator (an AssertionError inside aiokafka, else)
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config, partitions=2) as publisher:
        receipts = await publisher.publish_many([make_snapshot() for _ in range(6)])
    expected = {0: 0, 1: 0}
    for receipt in receipts:
        expected[receipt.partition] = max(expected[receipt.partition], receipt.offset + 1)
    reader = PartitionReader(config)
    await reader.open(paused=True)
    try:
        # (leaders are known once the consumer's metadata names the topic: until then, None)
        await eventually(lambda: reader.partitions_now() is not None, what="topic metadata")
        assert await reader.log_ends() == expected
        assert await reader.log_ends() == expected  # (again, on the same side connection)
    finally:
        await reader.close()
