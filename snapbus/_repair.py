"""Bounded re-reads of a few keys, for the view's repairs and reports (internal).

A view that finds a session's latest value bad (on first read, or in the initial replay,
where only each key's latest value is kept) wants that session's last good record, and the
coordinates of the bad record to report it; a view that finds a key on the wrong partition in
its initial replay wants the coordinates of those records. `read_keys` reads only the
partitions concerned, up to given offsets, and keeps the records of the wanted keys, matched
on the key bytes: nothing is decoded here, so the cost is the fetch alone. `Repairs` runs
them for a view, one task at a time, beside its live tail.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import operator
from collections.abc import Callable, Collection, Mapping
from typing import Any

from aiokafka.errors import KafkaError

from snapbus._dead_letters import BadRecords
from snapbus._partition import partition_of, partitions_of
from snapbus.codec import Codec
from snapbus.config import KafkaConfig
from snapbus.errors import DecodeError, SnapbusError
from snapbus.reader import PartitionReader, Record, decode_value
from snapbus.snapshot import WorkspaceSnapshot

__all__ = ["Repairs", "read_keys"]

log = logging.getLogger("snapbus.view")

_record_key = operator.attrgetter("key")


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


class Repairs:
    """The view's repairs and reports, read from the log beside the live tail.

    Sessions whose latest value is bad want their last good snapshot back (`want`: key ->
    request number, so that a session applied meanwhile drops out, `applied`); records found
    bad or misplaced in the initial replay (which kept only values) want their coordinates
    found to be reported (`report_bad`, `report_misplaced`, by (partition, key)). `start` runs
    them in one task at a time; `restore` puts back what was found. An error it cannot get
    past is kept in `error` for the read loop to raise.
    """

    def __init__(self, config: KafkaConfig, codec: Codec, reader: PartitionReader,
                 bad: BadRecords, restore: Callable[[str, WorkspaceSnapshot | None, int], None],
                 settled: Callable[[], Mapping[int, int] | None], *, fetch_max_wait_ms: int,
                 consumer_options: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self._codec = codec
        self._reader = reader
        self._bad = bad
        self._restore = restore
        self._settled = settled
        self._consumer_options = consumer_options
        self._fetch_wait_ms = fetch_max_wait_ms
        self.wanted: dict[str, int] = {}
        self.report_bad: set[tuple[int, bytes | None]] = set()
        self.report_misplaced: set[tuple[int, bytes]] = set()
        self._requests = 0
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self._homes: dict[bytes, int] = {}  # key -> its partition (a cache, cleared when full)

    def pending(self) -> bool:
        """Whether repairs or reports are pending or under way."""
        task = self.task
        return bool(self.wanted or self.report_bad or self.report_misplaced
                    or (task is not None and not task.done()))

    def want(self, key: str) -> None:
        """Ask for the session's last good snapshot to be restored from the log (call
        `start` after)."""
        self._requests += 1
        self.wanted[key] = self._requests

    def applied(self, key: str) -> None:
        """A record of the session was applied: newer than what a repair would restore."""
        if self.wanted:
            self.wanted.pop(key, None)

    def start(self) -> None:
        """Run the repairs in their own task, unless it runs or there is nothing to do."""
        if self.task is not None and not self.task.done():
            return
        if not (self.wanted or self.report_bad or self.report_misplaced):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (a read from outside the loop: the loop starts it later)
            return
        self.task = loop.create_task(self._run(),
                                     name=f"snapbus-view-repair:{self.config.topic}")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """Keep an unexpected error of the repair task in `error` (the read loop raises it),
        so that a repair that died never leaves the view waiting for it silently."""
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()

    async def _run(self) -> None:
        """Restore the last good snapshot of the sessions in `wanted`, and report the records
        in `report_bad` and `report_misplaced`, reading only their partitions. Retries like
        the read loop; an error it cannot get past is left in `error`."""
        failures = 0
        while self.wanted or self.report_bad or self.report_misplaced:
            wanted = dict(self.wanted)
            bad, self.report_bad = self.report_bad, set()
            misplaced, self.report_misplaced = self.report_misplaced, set()
            keys: dict[int, set[bytes | None]] = {}
            for key in wanted:
                raw = key.encode()
                keys.setdefault(self.home(raw), set()).add(raw)
            for partition, found_key in itertools.chain(bad, misplaced):
                keys.setdefault(partition, set()).add(found_key)
            positions = self._reader.positions
            until = {p: positions.get(p, 0) for p in keys}
            try:
                found = await read_keys(self.config, keys, until,
                                        fetch_max_wait_ms=self._fetch_wait_ms,
                                        consumer_options=self._consumer_options)
            except (KafkaError, SnapbusError) as exc:
                self.report_bad |= bad
                self.report_misplaced |= misplaced
                if not getattr(exc, "retriable", False) and failures >= 3:
                    self.error = exc
                    return
                failures += 1
                log.warning("view of %s: reading the log to repair sessions failed, retrying: "
                            "%r", self.config.topic, exc, extra={"topic": self.config.topic})
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))  # (a backoff)
                continue
            failures = 0
            self._repaired(wanted, bad, misplaced, found)

    def _repaired(self, wanted: Mapping[str, int], bad: Collection[tuple[int, bytes | None]],
                  misplaced: Collection[tuple[int, bytes]],
                  found: Mapping[tuple[int, bytes | None], list[Record]]) -> None:
        """Apply and report what `_run` found."""
        partitions = len(self._reader.partitions)
        for partition, raw in sorted(misplaced):
            records = found.get((partition, raw), [])
            home = self.home(raw)
            for record in records:
                self._bad.misplaced_record(partition, record, home, partitions)
            if not records:  # (gone from the log since: count it)
                self._bad.misplaced += 1
        for partition, key_or_none in sorted(bad, key=lambda b: (b[0], b[1] or b"")):
            for record in reversed(found.get((partition, key_or_none), [])):
                try:
                    decode_value(record, self._codec)
                except DecodeError as exc:
                    self._bad.bad(partition, record, exc)
                    break
            else:  # (gone from the log since: count it)
                self._bad.decode_errors += 1
        restored = 0
        settled = self._settled()
        if settled is None:  # (the view is gone)
            return
        for key, request in wanted.items():
            if self.wanted.get(key) != request:
                continue  # applied (or asked again) since: the log has moved on
            del self.wanted[key]
            raw = key.encode()
            home = self.home(raw)
            below = settled.get(home, 0)
            for record in reversed(found.get((home, raw), [])):
                if record.offset >= below:
                    continue  # (fetched by the view, not applied yet: the view applies it)
                try:
                    _, snapshot = decode_value(record, self._codec)
                except DecodeError:
                    continue
                self._restore(key, snapshot, record.timestamp)
                restored += 1
                break
        if wanted:
            log.info("view of %s: %d of %d session(s) with a bad latest value restored to "
                     "their last good snapshot", self.config.topic, restored, len(wanted),
                     extra={"topic": self.config.topic})

    def home(self, key: bytes) -> int:
        """The partition `key` belongs on (Kafka's default partitioner)."""
        home = self._homes.get(key)
        if home is None:
            if len(self._homes) >= 65_536:
                self._homes.clear()
            home = self._homes[key] = partition_of(key, len(self._reader.partitions))
        return home

    def homes_of(self, records: list[Record]) -> list[int]:
        """The partition each record's key belongs on; -1 for no key."""
        if len(records) >= 32:
            return partitions_of(list(map(_record_key, records)), len(self._reader.partitions))
        return [-1 if record.key is None else self.home(record.key) for record in records]
