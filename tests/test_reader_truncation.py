"""When a log end below the reader's position counts as a truncation (`truncated`), broker-free.

The reader's high watermarks and fetch stamps come from the last fetch responses; here they
are set directly on a reader that was never opened, so the rule is tested on its own.
"""

from __future__ import annotations

import pytest
from aiokafka.structs import TopicPartition

from snapbus.config import KafkaConfig
from snapbus.reader import TRUNCATION_GRACE_MS, PartitionReader


class _Reader(PartitionReader):
    """A reader whose fetch responses (high watermark, stamp) the test sets."""

    def __init__(self) -> None:
        super().__init__(KafkaConfig("127.0.0.1:9", "sessions"))
        self._tps = {0: TopicPartition("sessions", 0)}
        self.positions = {0: 100}
        self.hw: int | None = 100
        self.stamp: int | None = 1_000_000

    def highwater(self, partition: int) -> int | None:
        return self.hw

    def fetch_stamp(self, partition: int) -> int | None:
        return self.stamp


def test_a_log_end_that_stays_below_the_position_is_a_truncation() -> None:
    reader = _Reader()
    reader.hw = 40
    assert reader.truncated() == []  # first sighting
    reader.stamp += TRUNCATION_GRACE_MS
    assert reader.truncated() == [0]


def test_a_high_watermark_lagging_after_a_failover_is_not_a_truncation() -> None:
    # A new leader reports a high watermark below records already read until the followers'
    # next fetches: responses go on showing it for a few seconds, then it catches up.
    reader = _Reader()
    reader.hw = 90
    for _ in range(10):
        assert reader.truncated() == []
        reader.stamp += TRUNCATION_GRACE_MS // 10 - 1
    reader.hw = 100
    assert reader.truncated() == []
    reader.stamp += TRUNCATION_GRACE_MS
    assert reader.truncated() == []  # caught up: the clock starts again at the next sighting
    reader.hw = 90
    assert reader.truncated() == []


@pytest.mark.parametrize("stamp", [None, 1_000_000])
def test_no_fetch_answered_yet_counts_nothing(stamp: int | None) -> None:
    reader = _Reader()
    reader.hw, reader.stamp = 40, stamp
    assert reader.truncated() == []
    assert reader.truncated() == []  # (the same response seen twice: not a later one)
