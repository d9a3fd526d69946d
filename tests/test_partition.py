"""Kafka's default partitioner (murmur2), checked against Java's and aiokafka's."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from snapbus._partition import murmur2, partition_of, partitions_of

# kafka-clients' UtilsTest.testMurmur2: what Java's Utils.murmur2 returns
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("data", "expected"), JAVA_VECTORS.items())
def test_murmur2_matches_java(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected
    assert partition_of(data, 12) == (expected & 0x7FFFFFFF) % 12


def test_murmur2_matches_aiokafka_on_random_keys() -> None:
    rng = random.Random(16)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(70))
        assert murmur2(data) & 0xFFFFFFFF == aiokafka_murmur2(data)


@pytest.mark.parametrize("length", [*range(13), 36, 37, 38, 39])
def test_batched_partitions_equal_one_by_one(length: int) -> None:
    rng = random.Random(length)
    keys: list[bytes | None] = [rng.randbytes(length) for _ in range(200)]
    keys[7] = None
    keys[100] = rng.randbytes(length + 1)  # (another length in the same call)
    for partitions in (1, 3, 12, 1000):
        expected = [-1 if k is None else partition_of(k, partitions) for k in keys]
        assert partitions_of(keys, partitions) == expected


def test_java_vectors_batched() -> None:
    keys: list[bytes | None] = [b"abc"] * 40
    assert partitions_of(keys, 7) == [(479470107 & 0x7FFFFFFF) % 7] * 40
