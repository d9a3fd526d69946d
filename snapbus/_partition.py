"""Kafka's default partitioner: the partition a key belongs on (internal).

Java's producer (and aiokafka's) puts a keyed record on partition
``toPositive(murmur2(key)) % partitions``, with ``toPositive(x) = x & 0x7fffffff``. Every
record of a session must be on that partition: a record elsewhere is *misplaced* (written by a
producer with another partitioner) and views ignore it (docs/misplaced-records.md).

`partitions_of` hashes many keys at once: pure-Python murmur2 costs microseconds a key, too
much for every key of a large replay, so keys of equal length are hashed together, each in its
own 64-bit lane of one big integer (products of a 32-bit lane and the 31-bit constant never
carry into the next lane), which takes about a sixth of the time.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["murmur2", "partition_of", "partitions_of"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_BATCH_MIN = 32  # fewer keys of one length are hashed one by one


def murmur2(data: bytes) -> int:
    """Return Java's ``Utils.murmur2(data)``: a signed 32-bit int."""
    length = len(data)
    h = _SEED ^ length
    words = length // 4
    if words:
        for k in struct.unpack_from(f"<{words}I", data):
            k = (k * _M) & _MASK
            k ^= k >> 24
            k = (k * _M) & _MASK
            h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest:
        tail = length - rest
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_of(key: bytes, partitions: int) -> int:
    """Return the partition Kafka's default partitioner gives `key` among `partitions`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def partitions_of(keys: Sequence[bytes | None], partitions: int) -> list[int]:
    """Return `partition_of` for each key, -1 for a None key (no partition is its own)."""
    result = [-1] * len(keys)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            by_length.setdefault(len(key), []).append(i)
    for length, where in by_length.items():
        if len(where) < _BATCH_MIN:
            for i in where:
                result[i] = partition_of(keys[i], partitions)  # type: ignore[arg-type]
            continue
        group = b"".join([keys[i] for i in where])  # type: ignore[misc]
        for i, home in zip(where, _hash_lanes(group, length, len(where), partitions),
                           strict=True):
            result[i] = home
    return result


def _lanes(data: bytes, stride: int, first: int, count: int, size: int) -> int:
    """Bytes ``first .. first+size`` of each `stride`-long item of `data`, one 64-bit lane
    each (little-endian), as one integer."""
    lanes = bytearray(count * 8)
    for b in range(size):
        lanes[b::8] = data[first + b::stride]
    return int.from_bytes(lanes, "little")


def _hash_lanes(data: bytes, length: int, count: int, partitions: int) -> list[int]:
    """`partition_of` of `count` keys of `length` bytes each, concatenated in `data`."""
    lane = int.from_bytes(b"\xff\xff\xff\xff\0\0\0\0" * count, "little")
    ones = int.from_bytes(b"\x01\0\0\0\0\0\0\0" * count, "little")
    h = ((_SEED ^ length) & _MASK) * ones
    for word in range(length // 4):
        k = (_lanes(data, length, 4 * word, count, 4) * _M) & lane
        k ^= (k >> 24) & lane
        k = (k * _M) & lane
        h = ((h * _M) & lane) ^ k
    rest = length & 3
    if rest:
        h ^= _lanes(data, length, length - rest, count, rest)
        h = (h * _M) & lane
    h ^= (h >> 13) & lane
    h = (h * _M) & lane
    h ^= (h >> 15) & lane
    hashes = memoryview(h.to_bytes(count * 8, "little")).cast("Q")
    return [(x & 0x7FFFFFFF) % partitions for x in hashes]


