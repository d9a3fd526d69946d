"""The initial replay's stash: each key's latest value, applied once the view caught up
(internal).

Nothing is checked while stashing (this runs for every record of the log): a bad latest
record is found when applied, and the session's last good one is then looked up in the log.
Only the value is kept, not the record, unless the record's timestamp is needed (a TTL):
records die young, which took a fifth off reading a 1M-record log. `take` hands the latest
values back per partition, without the keys that belong on another partition (misplaced:
ignored, and reported by the caller).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from typing import Any, NamedTuple

from snapbus._partition import partitions_of
from snapbus.reader import Record

__all__ = ["Latest", "Stash", "Stashed"]

_record_key = operator.attrgetter("key")
_record_value = operator.attrgetter("value")
_record_offset = operator.attrgetter("offset")


class Stashed(NamedTuple):
    """A record of the initial replay kept as its key and value only."""

    key: bytes | None
    value: bytes | None
    offset: int = -1
    timestamp: int = -1
    headers: tuple[tuple[str, bytes], ...] = ()


class Latest(NamedTuple):
    """One partition's latest values, as `Stash.take` hands them back."""

    partition: int
    keys: list[bytes | None]
    values: list[bytes | None]
    records: list[Record] | None
    """The records themselves, in offset order, when the stash keeps records."""
    misplaced: list[bytes]
    """Keys left out: they belong on another partition."""
    stashed: int
    """Keys the partition's stash held (misplaced ones included)."""


class Stash:
    """Each partition's latest value (or record, with `keep_records`) per key."""

    __slots__ = ("_keep_records", "_partitions")

    def __init__(self, *, keep_records: bool) -> None:
        self._keep_records = keep_records
        self._partitions: dict[int, dict[bytes | None, Any]] = {}

    def add(self, partition: int, records: list[Record]) -> None:
        """Stash a read's records of one partition, in offset order (later ones win)."""
        stash = self._partitions.get(partition)
        if stash is None:
            stash = self._partitions[partition] = {}
        kept = records if self._keep_records else map(_record_value, records)
        stash.update(zip(map(_record_key, records), kept, strict=True))

    def drop(self) -> int:
        """Forget everything stashed (the log is read again); return how many keys."""
        count = sum(map(len, self._partitions.values()))
        self._partitions = {}
        return count

    def take(self, partitions: int) -> Iterator[Latest]:
        """Hand back and forget each partition's latest values (of `partitions`)."""
        stashes, self._partitions = self._partitions, {}
        for partition, stash in stashes.items():
            stashed = len(stash)
            if not self._keep_records:  # key -> value
                records: list[Record] | None = None
                keys, values = list(stash), list(stash.values())
            else:  # key -> record
                records = sorted(stash.values(), key=_record_offset)
                keys = list(map(_record_key, records))
                values = list(map(_record_value, records))
            stash.clear()
            homes = partitions_of(keys, partitions)
            misplaced: list[bytes] = []
            if homes.count(partition) + homes.count(-1) != len(homes):  # misplaced: ignored
                placed = [home in (partition, -1) for home in homes]
                misplaced = [key for key, ok in zip(keys, placed, strict=True)
                             if not ok and key is not None]
                keys = list(itertools.compress(keys, placed))
                values = list(itertools.compress(values, placed))
                if records is not None:
                    records = list(itertools.compress(records, placed))
            yield Latest(partition, keys, values, records, misplaced, stashed)
