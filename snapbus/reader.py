"""The partition-reading loop shared by the view and by replay (internal).

`PartitionReader` reads every partition of the snapshot topic in offset order, without a
consumer group, and keeps what fetch responses report about each partition. Three Kafka
behaviours matter here and are handled the way that is right on every broker:

- **Log ends come from fetch responses**, never from ListOffsets: some brokers answer
  ListOffsets(latest) with the base offset of the newest batch plus one, which would end a
  catch-up early. `end_targets` holds the first stable end (below) each partition's fetch
  reported: "the end of the log when reading started".
- **Positions, not record counts**, decide when a target is reached: offsets may have holes
  (compaction, transaction markers), so the consumer's position after applying everything
  fetched is compared with the target.
- **Only committed records** are read (``read_committed``, always: another isolation in
  `consumer_options` is refused). Records of an aborted transaction are never returned, and
  a partition's readable end is its **last stable offset** (LSO: the first offset of the oldest
  transaction still open, else the high watermark), not the high watermark: a target past the
  LSO could only be reached once every open transaction ended (Kafka Streams' global tables
  hung on exactly that, KAFKA-6190). Targets (`end_targets`, barriers) and `lag` go by it.

`start_barrier` supports read-your-writes barriers: it hands out stable log ends only from a
fetch whose request was sent after the barrier began, so every record acknowledged before it
and not behind a transaction still open is included.

Records are taken from aiokafka's fetch buffer as the record batches hold them (`Record`), not
as `ConsumerRecord`s: building one `ConsumerRecord` per record costs about as much as the fetch
itself (benchmarks/bench_rebuild.py measures both).
Every use of aiokafka's internals (that fetch buffer, the whole-cluster Metadata request,
`log_ends`' Fetch, the close after a cancelled stop) is in `snapbus._aiokafka`, with its version
check: with an aiokafka it was not verified against, `read` falls back to `getmany`. Unlike
`fetched_records`, its drain never loses a record to a batch that fails its CRC check:
positions move only past records returned (docs/errors.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
import uuid
from collections.abc import Collection, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from snapbus import _aiokafka
from snapbus._aiokafka import Record
from snapbus._kafka import start_client
from snapbus.codec import Codec, decode_key_text
from snapbus.config import KafkaConfig
from snapbus.errors import ConfigError, CorruptBatchError, KafkaUnavailableError, TopicError
from snapbus.snapshot import WorkspaceSnapshot

__all__ = [
    "BarrierProbe", "Event", "PartitionReader", "Record", "decode_record", "decode_value",
]

log = logging.getLogger("snapbus.reader")


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One decoded record of the topic: a snapshot, or a tombstone when `snapshot` is None."""

    key: str
    """The session id as the record key holds it: the canonical lowercase UUID string."""
    snapshot: WorkspaceSnapshot | None
    """The session's new snapshot; None for a tombstone (the session was deleted)."""
    partition: int
    """The partition the record is in."""
    offset: int
    """The record's offset in its partition."""
    timestamp_ms: int
    """The record's timestamp in milliseconds since the epoch (-1 when unknown)."""

    @property
    def session_id(self) -> uuid.UUID:
        """The session the record is about."""
        return uuid.UUID(self.key)

    @property
    def tombstone(self) -> bool:
        """Whether the record deletes the session."""
        return self.snapshot is None

    @property
    def timestamp(self) -> datetime.datetime | None:
        """The record's timestamp as an aware UTC datetime, or None when unknown."""
        if self.timestamp_ms < 0:
            return None
        return datetime.datetime.fromtimestamp(self.timestamp_ms / 1000, tz=datetime.timezone.utc)


def decode_value(record: Record, codec: Codec) -> tuple[str, WorkspaceSnapshot | None]:
    """Decode one Kafka record into (session key, snapshot or None for a tombstone): the one
    decode path of views and replay.

    Raises:
        DecodeError: the key is not a UUID, the value is not a valid snapshot, or the value's
            session id differs from the key.
    """
    key = decode_key_text(record.key)
    value = record.value
    return key, None if value is None else codec.decode(value, key=key)


def decode_record(record: Record, partition: int, codec: Codec) -> Event:
    """Decode one Kafka record of `partition` into an `Event` (see `decode_value`)."""
    key, snapshot = decode_value(record, codec)
    return Event(key, snapshot, partition, record.offset, record.timestamp)


class BarrierProbe:
    """Tracks, for one barrier, the fetch responses seen since it began.

    A partition's target is known once two fetch responses newer than the one current at the
    barrier's start were seen: the second one was requested after the first arrived, so after
    the barrier began, and its stable end covers every record acknowledged before that and
    not behind a transaction still open.
    """

    __slots__ = ("_seen", "targets")

    def __init__(self, start_stamps: Mapping[int, int | None]) -> None:
        self._seen: dict[int, list[int | None]] = {p: [ts] for p, ts in start_stamps.items()}
        self.targets: dict[int, int] = {}

    def observe(self, partition: int, stamp: int | None, end: int | None) -> None:
        """Record the fetch response stamp and stable log end now known for `partition`."""
        if partition in self.targets or stamp is None or end is None:
            return
        seen = self._seen.setdefault(partition, [None])
        if stamp != seen[-1]:
            seen.append(stamp)
        if len(seen) >= 3:
            self.targets[partition] = end

    def complete(self, partitions: int) -> bool:
        """Whether a target is known for every partition."""
        return len(self.targets) >= partitions


_HOLE_WINDOW = 10_000
"""Offsets below the high watermark where a gap may be a write still in flight (Tansu)."""

_HOLE_CONFIRM_S = 0.25
"""How long a gap near the log end must persist before it is taken as permanent."""

_HOLE_RETRY_S = 0.02
"""How long a partition held at a gap rests before it is fetched again (no re-fetch spin)."""

_CORRUPT_ATTEMPTS = 3
"""Fetches in a row of one unreadable batch before `read` raises `CorruptBatchError`."""

_CORRUPT_RETRY_S = 0.1
"""Rest before an unreadable batch is fetched again (doubled at each further failure)."""

_QUICK_READ_MS = 5
"""How long a read waits for records while the log ends are not all known yet."""

_SEND_TURNS = 3
"""Event-loop turns a `read` yields before returning records while more wait on the broker,
so that aiokafka sends the next fetch before the caller works through these: taking records
wakes its fetch routine (1), which starts a request task (2), which writes the request (3).
Without this the broker sat idle while a replay's records were applied, and the replay sat idle
while the broker read the next ones (benchmarks/bench_read.py shows the difference). Not when
the read reached the log end (a view following it live): there it only delayed the records
(benchmarks/bench_latency.py). Too few turns only lose the overlap
(`test_read_returns_with_the_next_fetch_already_sent`)."""


TRUNCATION_GRACE_MS = 5_000
"""How long fetch responses must go on showing a log end below the reader's position before
`PartitionReader.truncated` reports it (a lagging high watermark catches up sooner)."""


class PartitionReader:
    """Reads all partitions of one topic from given offsets (default: the beginning).

    Args:
        config: cluster and topic.
        fetch_max_wait_ms: how long a fetch may wait on the broker for new records; lower
            means fresher views and more idle requests.
        max_records: a `read` takes no further fetched partition once it holds this many
            records (a fetched partition is taken whole: a read may return more).
        consumer_options: extra keyword arguments for `aiokafka.AIOKafkaConsumer`.
    """

    def __init__(
        self,
        config: KafkaConfig,
        *,
        fetch_max_wait_ms: int = 100,
        max_records: int | None = 20_000,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self._max_records = max_records
        # one dict, not several ** expansions: consumer_options may override these defaults
        # (a key given twice in a call is a TypeError)
        options: dict[str, Any] = {
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": fetch_max_wait_ms,
            "max_partition_fetch_bytes": 4 * 1024 * 1024,
            "fetch_max_bytes": 64 * 1024 * 1024,
            "isolation_level": "read_committed",
            **config.client_kwargs(),
            **dict(consumer_options or {}),
        }
        if options["isolation_level"] != "read_committed":
            raise ConfigError(
                f"isolation_level {options['isolation_level']!r} is not supported: snapbus reads "
                "only committed records (records of aborted transactions are not state)")
        self._options = options
        self._client: AIOKafkaConsumer | None = None  # made in open(): nothing to leak before
        self._tps: dict[int, TopicPartition] = {}
        self.end_targets: dict[int, int] = {}
        """The first stable end each partition's fetch reported (the log end at start)."""
        self.positions: dict[int, int] = {}
        """The next offset to read in each partition, after everything returned so far."""
        self.rewound: set[int] = set()
        """Partitions whose consumer position went backwards (an offset reset by the client)."""
        self._opened_ms = 0
        self._started = False
        self._raw = False  # read aiokafka's fetch buffer directly (decided in open)
        # partition -> (gap, when first seen, the high watermark then)
        self._holes: dict[int, tuple[int, float, int]] = {}
        self._holes_ok_below: dict[int, int] = {}  # partition -> holes accepted before this
        self._held: dict[int, float] = {}  # partition paused at a gap -> when to fetch it again
        self._short: dict[int, int | None] = {}  # log end below position: first fetch stamp
        self._skipped: dict[int, list[int]] = {}  # offsets the last read skipped (markers, aborted)
        self._unreadable: dict[int, tuple[int, int]] = {}  # partition -> (bad batch, failures)
        self.corrupt_fetches = 0
        """Fetched batches that could not be read (CRC mismatch) and were fetched again."""

    @property
    def _consumer(self) -> AIOKafkaConsumer:
        if self._client is None:
            raise RuntimeError("the reader is not open")
        return self._client

    @property
    def partitions(self) -> list[int]:
        """The partition numbers being read."""
        return sorted(self._tps)

    async def open(self, start: Mapping[int, int] | None = None, *,
                   paused: bool = False, only: Collection[int] | None = None) -> None:
        """Connect, assign every partition, and position each at `start` (default 0).

        With `paused`, nothing is fetched until `resume` (to seek first without fetching
        from the beginning meanwhile). With `only`, just those partitions are read.

        Raises:
            KafkaUnavailableError: the cluster cannot be reached in time.
            TopicError: the topic does not exist.
        """
        topic = self.config.topic
        self._client = AIOKafkaConsumer(**self._options)
        await start_client(self._client, self.config, "reader")
        self._raw = _raw_fetch_supported(self._client)
        self._started = True
        self._opened_ms = int(time.time() * 1000)
        # A whole-cluster Metadata request: the client's bootstrap asked for no topics (Metadata
        # v1+ reads an empty list as "none"), and naming the topic would auto-create it on
        # brokers that do that.
        try:
            cluster = await _aiokafka.cluster_metadata(self._consumer)
        except KafkaError as exc:
            await self.close()
            raise KafkaUnavailableError(
                f"cannot read the metadata of topic {topic!r} from "
                f"{self.config.bootstrap_servers}: {exc}") from exc
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            await self.close()
            raise TopicError(
                f"topic {topic!r} does not exist on {self.config.bootstrap_servers}; "
                "create it with `snapbus topic ensure` or start a publisher first"
            )
        self._tps = {p: TopicPartition(topic, p) for p in sorted(partitions)
                     if only is None or p in only}
        self._consumer.assign(list(self._tps.values()))
        if paused:
            self._consumer.pause(*self._tps.values())
        for p, tp in self._tps.items():
            offset = 0 if start is None else int(start.get(p, 0))
            self._consumer.seek(tp, offset)
            self.positions[p] = offset

    async def offsets_for_time(self, timestamp_ms: int) -> dict[int, int]:
        """Return the broker's hint of each partition's first offset at or after a time.

        Partitions with no match are left out (a missing answer, or timestamp -1, which some
        brokers give for "no match" together with offset 0). Only a hint: records' own
        timestamps must still be checked.
        """
        hints = await self._consumer.offsets_for_times(dict.fromkeys(self._tps.values(),
                                                                     timestamp_ms))
        return {tp.partition: hint.offset for tp, hint in hints.items()
                if hint is not None and hint.timestamp >= 0}

    def resume(self) -> None:
        """Start fetching after `open(paused=True)`."""
        self._consumer.resume(*self._tps.values())
        self._held.clear()

    def seek(self, partition: int, offset: int) -> None:
        """Read `partition` from `offset` next."""
        tp = self._tps[partition]
        self._consumer.seek(tp, offset)
        self.positions[partition] = offset
        self._holes.pop(partition, None)  # (gaps accepted before are checked again)
        self._holes_ok_below.pop(partition, None)
        if self._held.pop(partition, None) is not None:
            self._consumer.resume(tp)

    async def read(self, timeout_ms: int) -> dict[int, list[Record]]:
        """Return the next records by partition, each list in offset order (may be empty).

        After it returns, `positions`, `end_targets` and `highwater` reflect what was fetched.
        A position moves only past records returned: a record batch that cannot be read (a CRC
        mismatch) ends its partition's records, and is fetched again after a rest.

        Raises:
            CorruptBatchError: a batch could not be read on `_CORRUPT_ATTEMPTS` fetches in a
                row (not retriable; nothing after it is returned).
            KafkaError: what aiokafka's fetcher raises (an authorization error, say).
        """
        consumer = self._consumer
        if len(self.end_targets) < len(self._tps):
            # (until a fetch has told every log end: an empty tail answers only after the
            # broker's long-poll, which a full-length wait here would just miss)
            timeout_ms = min(timeout_ms, _QUICK_READ_MS)
        if self._held:
            timeout_ms = min(timeout_ms, self._release_held())
        batches: dict[int, list[Record]]
        failed: dict[int, tuple[int, str]] = {}
        if self._raw:
            batches = await _aiokafka.read_buffer(consumer, timeout_ms / 1000, self._max_records,
                                                  self._skipped, failed)
        else:
            fetched = await consumer.getmany(timeout_ms=timeout_ms, max_records=self._max_records)
            batches = {tp.partition: records for tp, records in fetched.items()}
        if batches:
            self._hold_at_holes(batches)
        self._skipped.clear()
        positions = {p: await consumer.position(tp) for p, tp in self._tps.items()}
        if batches and any(self._lag(positions).values()):
            for _ in range(_SEND_TURNS):  # (before `positions` counts these records)
                await asyncio.sleep(0)
        for p in self._tps:
            if positions[p] < self.positions.get(p, 0):
                self.rewound.add(p)  # the consumer reset: the log was truncated under us
            self.positions[p] = positions[p]
            if p not in self.end_targets:
                end = self.stable_end(p)
                if end is not None:
                    self.end_targets[p] = end
        for p, (offset, _error) in list(self._unreadable.items()):
            if self.positions[p] > offset:
                del self._unreadable[p]  # (read past it at last: it was transient)
        if failed:
            self._retry_unreadable(failed)
        return batches

    def _retry_unreadable(self, failed: dict[int, tuple[int, str]]) -> None:
        """Count each batch that could not be read; fetch it again after a rest, or raise
        `CorruptBatchError` once it failed `_CORRUPT_ATTEMPTS` fetches in a row."""
        now = time.monotonic()
        topic = self.config.topic
        for p, (offset, reason) in failed.items():
            self.corrupt_fetches += 1
            last, count = self._unreadable.get(p, (offset, 0))
            count = count + 1 if last == offset else 1
            self._unreadable[p] = (offset, count)
            if count >= _CORRUPT_ATTEMPTS:
                raise CorruptBatchError(
                    f"the record batch at offset {offset} of {topic}[{p}] failed {count} "
                    f"fetches in a row ({reason}); the broker's copy is damaged: nothing after "
                    "it is read until it is repaired (see docs/errors.md)",
                    topic=topic, partition=p, offset=offset)
            log.warning("the record batch at offset %d of %s[%d] cannot be read (%s); "
                        "fetching it again (attempt %d of %d)", offset, topic, p, reason,
                        count + 1, _CORRUPT_ATTEMPTS,
                        extra={"topic": topic, "partition": p, "offset": offset})
            tp = self._tps[p]
            self._consumer.pause(tp)  # (its position is at the batch: resumed, it refetches)
            self._held[p] = now + _CORRUPT_RETRY_S * 2 ** (count - 1)

    def _release_held(self) -> int:
        """Fetch again the partitions held at a gap whose rest is over; return the ms until the
        next one is due."""
        now = time.monotonic()
        due = [p for p, at in self._held.items() if at <= now]
        for p in due:
            del self._held[p]
        if due:
            self._consumer.resume(*(self._tps[p] for p in due))
        return max(1, int(1000 * (min(self._held.values(), default=now) - now)))

    def _hold_at_holes(self, batches: dict[int, list[Record]]) -> None:
        """Drop records after a hole near the log end, and read from the hole again.

        A hole is a gap between the position and the next record (or between two records);
        transaction markers and aborted transactions' records, which the fetch skipped, are
        none. Tansu 0.6 opens one for a moment under concurrent writers: it raises the high
        watermark before it stores the batch, and a fetch in between returns the records
        after the missing batch, so a consumer moved past an acknowledged record for good
        (issue 21; docs/demo-convergence.md). The held partition rests `_HOLE_RETRY_S`
        (paused) before it is fetched again. On Apache Kafka a hole is permanent (records
        the cleaner removed) and is accepted once fetches `_HOLE_CONFIRM_S` apart still show
        it, together with every other hole below the log end seen when it was first seen
        (their writes were as old); holes more than `_HOLE_WINDOW` offsets below the high
        watermark (a compacted log's replay) are accepted at once.
        """
        now = time.monotonic()
        for p, records in batches.items():
            hw = self.highwater(p)
            if not records or hw is None:
                continue
            expected = self.positions.get(p, 0)
            if records[-1].offset - expected + 1 == len(records):
                continue  # (no gap at all: the usual read, checked without a loop)
            ok_below = self._holes_ok_below.get(p, 0)
            skipped = set(self._skipped.get(p, ()))
            for i, record in enumerate(records):
                offset = record.offset
                while expected in skipped:
                    expected += 1
                if offset > expected and expected >= hw - _HOLE_WINDOW and expected >= ok_below:
                    at, first_seen, end_then = self._holes.get(p, (expected, now, hw))
                    if at != expected:
                        first_seen, end_then = now, hw
                    if now - first_seen < _HOLE_CONFIRM_S:
                        self._holes[p] = (expected, first_seen, end_then)
                        del records[i:]  # (not applied: the hole may fill)
                        tp = self._tps[p]
                        self._consumer.seek(tp, expected)
                        self._consumer.pause(tp)
                        self._held[p] = now + _HOLE_RETRY_S
                        break
                    self._holes.pop(p, None)  # still there: a real gap
                    ok_below = self._holes_ok_below[p] = max(end_then, offset)
                expected = offset + 1

    def highwater(self, partition: int) -> int | None:
        """The latest high watermark a fetch reported for `partition`, or None before any."""
        hw: int | None = self._consumer.highwater(self._tps[partition])
        return hw

    def stable_end(self, partition: int) -> int | None:
        """The latest last stable offset a fetch reported for `partition` (where its readable
        records end: the oldest open transaction's first offset, else the high watermark), or
        None before any fetch.

        A broker that reports no LSO (-1; one that has no transactions) gives its high
        watermark instead.
        """
        tp = self._tps[partition]
        lso: int | None = self._consumer.last_stable_offset(tp)
        if lso is not None and lso >= 0:
            return lso
        return self.highwater(partition)

    def fetch_stamp(self, partition: int) -> int | None:
        """The time (ms) of the latest fetch response for `partition`, or None before any."""
        stamp: int | None = self._consumer.last_poll_timestamp(self._tps[partition])
        return stamp

    def reached(self, targets: Mapping[int, int]) -> bool:
        """Whether every partition's position is at or past its target, and none is past the
        log end its latest fetch reported (a log shorter than the position is a truncation
        being confirmed, `truncated`: nothing is reached there)."""
        positions = self.positions
        for p, target in targets.items():
            position = positions.get(p, 0)
            if position < target or p in self._short:
                return False
        return True

    def start_barrier(self) -> BarrierProbe:
        """Begin tracking fetch responses for a read-your-writes barrier."""
        return BarrierProbe({p: self.fetch_stamp(p) for p in self._tps})

    async def log_ends(self) -> dict[int, int] | None:
        """Each partition's log end now, in one round trip; None when it cannot be had.

        Sends each partition leader a Fetch that waits for nothing (no minimum size and a 1 ms
        wait: Tansu answers a 0 ms Fetch with no partitions at all) on a connection of its own,
        so it does not queue behind the reader's long-polling fetch (a broker answers one
        connection's requests in order). The end is the high watermark that fetch responses
        report (right on every broker, unlike ListOffsets on some), or the last stable offset
        for a read_committed reader. Every record acknowledged before the call is below it.
        None when a leader is unknown or a request fails: callers fall back to the reader's
        own fetches (`start_barrier`).
        """
        return await _aiokafka.log_ends(
            self._consumer, self.config.topic, {p: self.positions.get(p, 0) for p in self._tps})

    def observe(self, probe: BarrierProbe) -> None:
        """Feed the latest fetch stamps and stable ends to a barrier probe."""
        for p in self._tps:
            probe.observe(p, self.fetch_stamp(p), self.stable_end(p))

    def truncated(self) -> list[int]:
        """Partitions whose log now ends before the reader's position, or that were rewound.

        Either means records the reader already applied are gone from the broker (a broker
        that lost its data, or a topic deleted and re-created): the reader must start over.
        A log end below the position counts once fetch responses have gone on showing it for
        `TRUNCATION_GRACE_MS`: a truncation stays, while a high watermark can lag behind records
        already read for a while: a new partition leader learns the followers' log ends only
        from their next fetches (after a failover, seconds), and a fresh Apache Kafka topic was
        seen, rarely, to answer one stale high watermark.
        """
        found = set(self.rewound)
        for p in self._tps:
            hw = self.highwater(p)
            if hw is None or hw >= self.positions.get(p, 0):
                self._short.pop(p, None)
                continue
            stamp = self.fetch_stamp(p)
            first = self._short.get(p)
            if first is None:
                self._short[p] = stamp
            elif stamp is not None and stamp - first >= TRUNCATION_GRACE_MS:
                found.add(p)
        return sorted(found)

    def restart_from_beginning(self) -> None:
        """Read every partition again from offset 0, with fresh end targets."""
        for p in self._tps:
            self.seek(p, 0)
        self.end_targets.clear()
        self.rewound.clear()
        self._short.clear()

    def staleness_s(self) -> float:
        """Seconds since the broker last answered a fetch for the least recent partition."""
        stamps = [self.fetch_stamp(p) for p in self._tps]
        oldest = min((s if s is not None else self._opened_ms for s in stamps),
                     default=self._opened_ms)
        return max(0.0, time.time() - oldest / 1000)

    def partitions_now(self) -> set[int] | None:
        """The topic's partitions per the client's latest metadata (None: topic unknown)."""
        found = self._consumer.partitions_for_topic(self.config.topic)
        return None if found is None else set(found)

    def caught_up_to_start(self) -> bool:
        """Whether every partition reached the stable end seen when reading started."""
        return len(self.end_targets) == len(self._tps) and self.reached(self.end_targets)

    def lag(self) -> dict[int, int]:
        """Offsets between each partition's position and its latest known stable end (records
        behind a transaction still open are not counted: they cannot be read yet)."""
        return self._lag(self.positions)

    def _lag(self, positions: dict[int, int]) -> dict[int, int]:
        lag: dict[int, int] = {}
        for p in self._tps:
            end = self.stable_end(p)
            if end is not None:
                lag[p] = max(0, end - positions.get(p, 0))
        return lag

    async def close(self) -> None:
        """Disconnect; safe to call twice."""
        if self._started:
            self._started = False
            consumer = self._consumer
            stopping = asyncio.ensure_future(consumer.stop())
            try:
                await asyncio.shield(stopping)
            except asyncio.CancelledError:
                if not stopping.cancelled():
                    raise  # we were cancelled; the stop goes on in the background
                # aiokafka's stop raised a false cancel (its issue #647): finish the job
                await _aiokafka.finish_stop(consumer)


_raw_fetch_supported = _aiokafka.fast_path_supported
"""Whether `read` takes records from aiokafka's fetch buffer (tests and benchmarks replace it
to force the `getmany` path)."""
