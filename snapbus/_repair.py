"""Bounded re-reads of a few keys, for the view's repairs and reports (internal).

A view that finds a session's latest value bad (on first read, or in the initial replay,
where only each key's latest value is kept) wants that session's last good record, and the
coordinates of the bad record to report it; a view that finds a key on the wrong partition in
its initial replay wants the coordinates of those records. `read_keys` reads only the
partitions concerned, up to given offsets, and keeps the records of the wanted keys, matched
on the key bytes: nothing is decoded here, so the cost is the fetch alone.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from snapbus.config import KafkaConfig
from snapbus.reader import PartitionReader, Record

__all__ = ["read_keys"]


async def read_keys(
    config: KafkaConfig,
    wanted: Mapping[int, Collection[bytes | None]],
    until: Mapping[int, int],
    *,
    fetch_max_wait_ms: int = 100,
    consumer_options: Mapping[str, Any] | None = None,
) -> dict[tuple[int, bytes | None], list[Record]]:
    """Return the records of the `wanted` keys of each partition before `until`, by
    (partition, key), in offset order.

    Only the partitions named in `wanted` are read, and none past its log end as of the read.

    Raises:
        KafkaUnavailableError, TopicError: as `PartitionReader.open`.
        aiokafka.errors.KafkaError: a fetch failed (the caller retries).
    """
    keys = {p: frozenset(k) for p, k in wanted.items() if k and until.get(p, 0) > 0}
    found: dict[tuple[int, bytes | None], list[Record]] = {}
    if not keys:
        return found
    reader = PartitionReader(config, fetch_max_wait_ms=fetch_max_wait_ms,
                             consumer_options=consumer_options)
    await reader.open(only=keys)
    try:
        while True:
            batches = await reader.read(timeout_ms=fetch_max_wait_ms)
            for partition, records in batches.items():
                want, stop = keys[partition], until[partition]
                for record in records:
                    key = record.key
                    if key in want and record.offset < stop:
                        found.setdefault((partition, key), []).append(record)
            ends = reader.end_targets
            targets = {p: min(until[p], ends.get(p, math.inf)) for p in reader.partitions}
            if reader.reached({p: int(t) for p, t in targets.items()}):
                return found
    finally:
        await reader.close()
