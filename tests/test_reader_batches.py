"""The reader's fast path over aiokafka's fetch buffer (`drain`, `batch_records`), broker-free.

Record batches are real v2 batches (aiokafka's `DefaultRecordBatchBuilder`, control batches
and corruptions made by hand with their CRC-32C), held in aiokafka's own `FetchResult`,
`PartitionRecords` and `SubscriptionState`, in a `Fetcher` made without a client (only its
buffer is used). The rule under test: a partition's position moves only past records that
are returned, whatever fails in the middle of a drain.
"""

from __future__ import annotations

import asyncio
import struct
from collections import OrderedDict
from typing import Any

import pytest
from aiokafka.consumer.fetcher import (
    READ_COMMITTED,
    Fetcher,
    FetchError,
    FetchResult,
    PartitionRecords,
)
from aiokafka.consumer.subscription_state import SubscriptionState
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from snapbus import _aiokafka
from snapbus._aiokafka import batch_records

TOPIC = "sessions"
_CRC_AT = 17  # BaseOffset(8) Length(4) PartitionLeaderEpoch(4) Magic(1): then CRC(4)
_ATTRIBUTES_AT = 21  # the CRC covers the batch from its attributes on
_CONTROL = 0x20


def batch(base: int, count: int, *, producer_id: int = -1, transactional: bool = False,
          control: int | None = None, corrupt: bool = False, unparsable: bool = False
          ) -> bytes:
    """A v2 record batch of `count` records from offset `base` (values ``v<offset>``), or a
    control batch (`control`: 0 abort, 1 commit marker). `corrupt`: a byte of the last value
    flipped (only the CRC sees it); `unparsable`: the last record's header count broken
    (a varint that never ends; the CRC sees it too)."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=int(transactional or control is not None),
        producer_id=producer_id, producer_epoch=0 if producer_id >= 0 else -1,
        base_sequence=-1 if producer_id < 0 else 0, batch_size=1 << 20)
    if control is not None:
        builder.append(0, timestamp=1_000, key=struct.pack(">hh", 0, control),
                       value=struct.pack(">hi", 0, 0), headers=[])
    else:
        for i in range(count):
            builder.append(i, timestamp=1_000 + base + i, key=f"k{base + i}".encode(),
                           value=f"v{base + i}".encode(), headers=[])
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base)
    if control is not None:
        attributes = struct.unpack_from(">h", data, _ATTRIBUTES_AT)[0] | _CONTROL
        struct.pack_into(">h", data, _ATTRIBUTES_AT, attributes)
        struct.pack_into(">I", data, _CRC_AT, calc_crc32c(bytes(data[_ATTRIBUTES_AT:])))
    if corrupt:
        data[-2] ^= 0x01  # (a record ends with its value, then its header count: 0)
    if unparsable:
        data[-1] = 0xFF
    return bytes(data)


class Buffer:
    """aiokafka's fetch buffer for some partitions of `TOPIC`, filled by hand."""

    def __init__(self, partitions: int = 1) -> None:
        self.subscription = SubscriptionState()
        self.tps = [TopicPartition(TOPIC, p) for p in range(partitions)]
        self.subscription.assign_from_user(self.tps)
        for tp in self.tps:
            self.subscription.seek(tp, 0)
        fetcher: Any = Fetcher.__new__(Fetcher)  # (no client: no fetch task)
        fetcher._records = OrderedDict()
        fetcher._isolation_level = READ_COMMITTED
        fetcher._wait_consume_future = None
        self.fetcher = fetcher

    def position(self, partition: int) -> int:
        state = self.subscription.subscription.assignment.state_value(self.tps[partition])
        position: int = state.position
        return position

    def seek(self, partition: int, offset: int) -> None:
        self.subscription.seek(self.tps[partition], offset)

    def fetched(self, partition: int, *batches: bytes,
                aborted: list[tuple[int, int]] | None = None, check_crcs: bool = True) -> None:
        """Buffer a fetch response of `partition`, fetched from its current position."""
        tp = self.tps[partition]
        records = PartitionRecords(tp, MemoryRecords(b"".join(batches)), aborted,
                                   self.position(partition), None, None, check_crcs,
                                   READ_COMMITTED)
        self.fetcher._records[tp] = FetchResult(
            tp, assignment=self.subscription.subscription.assignment,
            partition_records=records, backoff=0)

    def failed(self, partition: int, error: Exception) -> None:
        self.fetcher._records[self.tps[partition]] = FetchError(error=error, backoff=0)

    def drain(self, max_records: int | None = None, *,
              skipped: dict[int, list[int]] | None = None,
              failed: dict[int, tuple[int, str]] | None = None) -> dict[int, list[int]]:
        """`drain`, as offsets."""
        failed = {} if failed is None else failed
        drained = _aiokafka.drain(self.fetcher, max_records, failed, skipped)
        return {p: [r.offset for r in records] for p, records in drained.items()}

    def buffered(self) -> set[int]:
        return {tp.partition for tp in self.fetcher._records}


async def test_records_of_whole_batches_in_offset_order() -> None:
    buffer = Buffer()
    buffer.fetched(0, batch(0, 3), batch(3, 2))
    assert buffer.drain() == {0: [0, 1, 2, 3, 4]}
    assert buffer.position(0) == 5
    assert buffer.buffered() == set()


async def test_corrupt_batch_in_the_middle_returns_the_records_before_it() -> None:
    # the simulation: three batches, the middle one corrupt; 0-5 were never applied
    buffer = Buffer()
    buffer.fetched(0, batch(0, 3), batch(3, 3, corrupt=True), batch(6, 3))
    failed: dict[int, tuple[int, str]] = {}
    assert buffer.drain(failed=failed) == {0: [0, 1, 2]}
    assert buffer.position(0) == 3  # at the corrupt batch: nothing after it taken
    assert failed == {0: (3, "CRC mismatch")}
    assert buffer.buffered() == set()  # dropped: the next fetch starts at the batch again
    # that fetch gets an intact copy: everything is read, nothing twice, nothing skipped
    buffer.fetched(0, batch(3, 3), batch(6, 3))
    assert buffer.drain() == {0: [3, 4, 5, 6, 7, 8]}
    assert buffer.position(0) == 9


async def test_corrupt_batch_in_one_partition_loses_nothing_of_the_others() -> None:
    # partition 0 drained first, then partition 1's corrupt batch: 0's records are returned
    buffer = Buffer(partitions=3)
    buffer.fetched(0, batch(0, 4))
    buffer.fetched(1, batch(0, 2), batch(2, 2, corrupt=True))
    buffer.fetched(2, batch(0, 1))
    failed: dict[int, tuple[int, str]] = {}
    assert buffer.drain(failed=failed) == {0: [0, 1, 2, 3], 1: [0, 1], 2: [0]}
    assert [buffer.position(p) for p in range(3)] == [4, 2, 1]
    assert {p: offset for p, (offset, _) in failed.items()} == {1: 2}


async def test_corrupt_first_batch_takes_nothing_and_moves_nothing() -> None:
    buffer = Buffer(partitions=2)
    buffer.seek(0, 10)
    buffer.fetched(0, batch(10, 3, corrupt=True), batch(13, 3))
    buffer.fetched(1, batch(0, 2))
    failed: dict[int, tuple[int, str]] = {}
    assert buffer.drain(failed=failed) == {1: [0, 1]}
    assert buffer.position(0) == 10
    assert failed[0][0] == 10


async def test_an_unparsable_batch_is_an_error_at_its_offset_too() -> None:
    buffer = Buffer()  # (no CRC check: the batch's records do not parse)
    buffer.fetched(0, batch(0, 2), batch(2, 2, unparsable=True), batch(4, 1), check_crcs=False)
    failed: dict[int, tuple[int, str]] = {}
    assert buffer.drain(failed=failed) == {0: [0, 1]}
    assert buffer.position(0) == 2
    assert failed[0][0] == 2
    assert failed[0][1] == "unreadable: Found invalid number of record headers -64"


async def test_seek_into_a_batch_returns_from_the_seek_on() -> None:
    buffer = Buffer()
    buffer.seek(0, 4)
    buffer.fetched(0, batch(2, 5), batch(7, 2))  # (a fetch returns the whole batch of 4)
    assert buffer.drain() == {0: [4, 5, 6, 7, 8]}
    assert buffer.position(0) == 9


async def test_seek_into_a_corrupt_batch_keeps_the_seek_offset() -> None:
    buffer = Buffer()
    buffer.seek(0, 4)
    buffer.fetched(0, batch(2, 5, corrupt=True), batch(7, 2))
    failed: dict[int, tuple[int, str]] = {}
    assert buffer.drain(failed=failed) == {}
    assert buffer.position(0) == 4
    assert failed == {0: (4, "CRC mismatch")}


async def test_control_batches_are_skipped_and_reported() -> None:
    buffer = Buffer()
    buffer.fetched(0, batch(0, 2, producer_id=7, transactional=True),
                   batch(2, 1, producer_id=7, control=1), batch(3, 2))
    skipped: dict[int, list[int]] = {}
    assert buffer.drain(skipped=skipped) == {0: [0, 1, 3, 4]}
    assert skipped == {0: [2]}
    assert buffer.position(0) == 5


async def test_aborted_transactions_are_skipped_and_reported() -> None:
    buffer = Buffer()
    buffer.fetched(0, batch(0, 1),
                   batch(1, 2, producer_id=7, transactional=True),
                   batch(3, 1, producer_id=7, control=0),  # its abort marker
                   batch(4, 1, producer_id=7, transactional=True),  # a later, committed one
                   batch(5, 1, producer_id=7, control=1),
                   aborted=[(7, 1)])
    skipped: dict[int, list[int]] = {}
    assert buffer.drain(skipped=skipped) == {0: [0, 4]}
    assert skipped == {0: [1, 2, 3, 5]}
    assert buffer.position(0) == 6


async def test_corrupt_batch_after_a_marker_keeps_what_was_skipped_before_it() -> None:
    buffer = Buffer()
    buffer.fetched(0, batch(0, 1, producer_id=7, transactional=True),
                   batch(1, 1, producer_id=7, control=1),
                   batch(2, 2, corrupt=True))
    skipped: dict[int, list[int]] = {}
    failed: dict[int, tuple[int, str]] = {}
    assert buffer.drain(skipped=skipped, failed=failed) == {0: [0]}
    assert skipped == {0: [1]}
    assert buffer.position(0) == 2
    assert failed[0][0] == 2


async def test_fetch_error_after_records_is_raised_on_the_nextdrain() -> None:
    buffer = Buffer(partitions=2)
    buffer.fetched(0, batch(0, 3))
    buffer.failed(1, TopicAuthorizationFailedError())
    assert buffer.drain(failed={}) == {0: [0, 1, 2]}
    assert buffer.position(0) == 3
    with pytest.raises(TopicAuthorizationFailedError):
        buffer.drain(failed={})
    assert buffer.position(1) == 0  # nothing of partition 1 was taken
    assert buffer.buffered() == set()


async def test_max_records_stops_between_partitions_and_leaves_the_rest_buffered() -> None:
    buffer = Buffer(partitions=3)
    for p in range(3):
        buffer.fetched(p, batch(0, 3), batch(3, 3))
    first = buffer.drain(max_records=5)
    assert first == {0: [0, 1, 2, 3, 4, 5]}  # (whole fetched partitions: no batch is split)
    assert buffer.position(1) == 0
    assert buffer.position(2) == 0
    assert buffer.drain(max_records=5) == {1: [0, 1, 2, 3, 4, 5]}
    assert buffer.drain(max_records=5) == {2: [0, 1, 2, 3, 4, 5]}
    assert [buffer.position(p) for p in range(3)] == [6, 6, 6]


async def test_paused_or_moved_partitions_are_dropped_not_returned() -> None:
    buffer = Buffer(partitions=2)
    buffer.fetched(0, batch(0, 2))
    buffer.fetched(1, batch(0, 2))
    buffer.seek(1, 1)  # a seek after the fetch: its records are stale
    assert buffer.drain() == {0: [0, 1]}
    assert buffer.position(1) == 1
    assert buffer.buffered() == set()


async def test_batch_records_stops_before_the_corrupt_batch() -> None:
    tp = TopicPartition(TOPIC, 0)
    memory = MemoryRecords(batch(0, 2) + batch(2, 2) + batch(4, 2, corrupt=True) + batch(6, 2))
    records, next_offset, failure = batch_records(tp, memory, 0, None, True)
    assert [r.offset for r in records] == [0, 1, 2, 3]
    assert next_offset == 4
    assert failure is not None
    assert failure[0] == 4
    # without CRC checks (a consumer told not to), the batch is read as it is
    memory = MemoryRecords(batch(0, 2) + batch(2, 2, corrupt=True))
    records, next_offset, failure = batch_records(tp, memory, 0, None, False)
    assert [r.value for r in records] == [b"v0", b"v1", b"v2", b"v2"]  # (v3 flipped to v2)
    assert (next_offset, failure) == (4, None)


async def test_a_fetcher_made_without_a_client_is_enough_for_these_tests() -> None:
    # (guards the harness: `_notify` of the real Fetcher wakes a waiting consumer)
    buffer = Buffer()
    future = asyncio.get_running_loop().create_future()
    buffer.fetcher._wait_consume_future = future
    buffer.fetched(0, batch(0, 1))
    assert buffer.drain() == {0: [0]}
    assert future.done()
