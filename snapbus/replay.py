"""Reading the log back: bounded replay, the state at an instant, per-session history, export.

`replay` reads the topic (or the history topic, when one is configured) from a start bound to
the end of the log as it was when the replay began, and yields decoded `Event` values in
offset order within each partition. It never waits for new records.

Bounds are either datetimes, compared with record timestamps, or explicit per-partition
offsets. The broker's time index (``offsets_for_times``) is used only to skip ahead: it is a
hint (some brokers index by write time at batch granularity and answer "offset 0" when nothing
matches), and every record's own timestamp is checked.

What compaction removes
-----------------------
On a compacted topic the broker may delete any record that a later record with the same key
supersedes. Replay therefore sees every session's *latest* record, but not necessarily the
updates before it. `rebuild(as_of=T)` is exact for every instant T at which each session's
record in force is still in the log; once compaction removed a superseded record, the state
before its successor can no longer be rebuilt from the snapshot topic (a session deleted by a
tombstone may also vanish entirely after ``delete.retention.ms``). For full history, configure
a history topic (`KafkaConfig.history_topic`): the publisher also writes every change there,
to a topic that is never compacted and expires by time, and replay reads it.

Misplaced records
-----------------
A record on another partition than the one Kafka's default partitioner (murmur2) gives its key
was written by a producer with another partitioner; views ignore it, and so do `replay`,
`rebuild` and `history` (docs/misplaced-records.md). `find_misplaced` lists them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import math
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import IO, Any, TypeVar

from snapbus._kafka import KAFKA_ERRORS, translate
from snapbus._partition import partitions_of
from snapbus._retention import too_slow
from snapbus.codec import Codec, default_codec
from snapbus.config import KafkaConfig
from snapbus.errors import DecodeError, SnapbusError, TopicError, ValidationError
from snapbus.reader import Event, PartitionReader, Record, decode_record
from snapbus.snapshot import WorkspaceSnapshot, parse_uuid
from snapbus.topic import DEFAULT_DELETE_RETENTION_MS, describe_if_exists

__all__ = [
    "Bound", "Event", "Misplaced", "event_to_json", "find_misplaced", "history", "rebuild",
    "replay", "write_jsonl",
]

log = logging.getLogger("snapbus.replay")

Bound = datetime.datetime | Mapping[int, int] | None
"""A replay bound: a datetime (record timestamps), offsets per partition, or None (open)."""

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` with records read so far and the records to read."""

_T = TypeVar("_T")

_clock = time.time
"""The replay's clock (seconds; the wall clock, as the broker's cleaner keeps time while this
host sleeps; tests move it instead of waiting)."""

_ATTEMPTS = 3
"""How many times `rebuild` and `history` read the log when each read outlasts the topic's
tombstone retention (`replay` raises a retriable `TopicError` then)."""


class _TooSlow(TopicError):
    """The `TopicError` of a replay that outlasted the topic's tombstone retention."""


def _to_ms(moment: datetime.datetime, name: str) -> int:
    if not isinstance(moment, datetime.datetime):
        raise ValidationError(f"{name} must be a datetime or offsets, not {type(moment).__name__}",
                              field=name)
    if moment.tzinfo is None:
        raise ValidationError(f"{name} must be timezone-aware (e.g. UTC): {moment.isoformat()}",
                              field=name)
    return math.floor(moment.timestamp() * 1000)


def _resolve_config(config: KafkaConfig | None, bootstrap_servers: str | None, topic: str | None,
                    history: bool, caller: str) -> KafkaConfig:
    if bootstrap_servers is not None or topic is not None:
        warnings.warn(
            f"{caller}(bootstrap_servers=..., topic=...) is deprecated and will be removed in "
            f"snapbus 0.3: pass a KafkaConfig first, {caller}(KafkaConfig(servers, topic), ...)",
            DeprecationWarning, stacklevel=3)
    config = KafkaConfig.from_env(bootstrap_servers=bootstrap_servers, topic=topic) \
        if config is None else config.replace(**{k: v for k, v in (
            ("bootstrap_servers", bootstrap_servers), ("topic", topic)) if v is not None})
    if history and config.history_topic:
        return config.replace(topic=config.history_topic, history_topic=None)
    return config


async def _start_offsets(reader: PartitionReader, since: Bound) -> dict[int, int]:
    if since is None:
        return {}
    if isinstance(since, Mapping):
        return {int(p): int(o) for p, o in since.items()}
    return await reader.offsets_for_time(_to_ms(since, "since"))


async def replay(
    config: KafkaConfig | None = None,
    *,
    bootstrap_servers: str | None = None,
    topic: str | None = None,
    since: Bound = None,
    until: Bound = None,
    use_history: bool = True,
    errors: str = "skip",
    codec: Codec | None = None,
    fetch_max_wait_ms: int = 100,
    progress: Progress | None = None,
    quiet: bool = False,
    on_error: Callable[[int, Record, DecodeError], object] | None = None,
) -> AsyncIterator[Event]:
    """Yield the log's events between two bounds, in offset order within each partition.

    Args:
        config: cluster and topic, as for `SnapshotPublisher` and `SnapshotView` (default:
            `KafkaConfig.from_env()`).
        bootstrap_servers, topic: deprecated (removed in 0.3): override the config's; a
            `DeprecationWarning` says so.
        since: first event to include: a datetime (records at or after it) or start offsets
            per partition (inclusive). None: from the beginning.
        until: where to stop: a datetime (records strictly before it) or end offsets per
            partition (exclusive). The replay never reads past the end of the log as it was
            when it began.
        use_history: read the history topic instead when the config names one.
        errors: ``"skip"`` (default: undecodable records are logged and skipped) or
            ``"raise"`` (raise `DecodeError`).
        progress: called after each batch with (records read, records to read).
        quiet: do not log skipped records (the caller counts them).
        on_error: called with (partition, record, error) for each record skipped as bad.

    Records on another partition than their key's are skipped (and logged unless `quiet`),
    as views ignore them (docs/misplaced-records.md).

    On a compacted topic a replay must end within the topic's tombstone retention
    (``delete.retention.ms``, less a margin) of its first read: a value read earlier may have
    lost its tombstone meanwhile (docs/compaction.md). A replay that takes longer raises a
    retriable `TopicError`; what it yielded so far may lack deletes.

    Raises:
        TopicError: the topic does not exist; or (retriable) the replay took longer than the
            topic keeps tombstones.
        KafkaUnavailableError: the cluster cannot be reached, or a request failed (retriable
            unless the broker refused it for good; `KafkaAuthenticationError`: refused).
        CorruptBatchError: a record batch fails its CRC check on every fetch.
        DecodeError: a record is undecodable and ``errors="raise"``.
        ValidationError, ConfigError: a bad argument or setting.
    """
    if errors not in ("skip", "raise"):
        raise ValidationError(f"errors must be 'skip' or 'raise', not {errors!r}", field="errors")
    config = _resolve_config(config, bootstrap_servers, topic, use_history, "replay")
    codec = codec if codec is not None else default_codec()
    until_ms = _to_ms(until, "until") if isinstance(until, datetime.datetime) else None
    until_offsets = {int(p): int(o) for p, o in until.items()} \
        if isinstance(until, Mapping) else {}
    since_ms = _to_ms(since, "since") if isinstance(since, datetime.datetime) else None
    reader = PartitionReader(config, fetch_max_wait_ms=fetch_max_wait_ms)
    doing = f"replaying topic {config.topic!r}"
    try:
        await reader.open()
    except KAFKA_ERRORS as exc:
        raise translate(exc, config, doing) from exc
    # the tombstone retention, read beside a replay of more than one fetch (one fetch returns
    # a value and what follows it at the same instant: nothing to miss)
    describing: asyncio.Future[int | None] | None = None
    try:
        first_read = last_read = 0.0
        reads = 0
        try:
            starts = await _start_offsets(reader, since)
        except KAFKA_ERRORS as exc:
            raise translate(exc, config, doing) from exc
        for p, offset in starts.items():
            reader.seek(p, offset)
        done = 0
        count = len(reader.partitions)
        while True:
            try:
                batches = await reader.read(timeout_ms=fetch_max_wait_ms)
            except KAFKA_ERRORS as exc:
                raise translate(exc, config, doing) from exc
            if batches:
                last_read = _clock()
                reads += 1
                if reads == 1:
                    first_read = last_read
                elif describing is None:
                    describing = asyncio.ensure_future(_retention_ms(config))
                elif describing.done():
                    _check_speed(config, describing.result(), last_read - first_read)
            targets = _targets(reader, until_offsets)
            for partition, records in batches.items():
                first = starts.get(partition, 0)
                stop = targets.get(partition, math.inf)
                homes = partitions_of([record.key for record in records], count)
                for record, home in zip(records, homes, strict=True):
                    done += 1
                    if record.offset < first or record.offset >= stop:
                        continue
                    if home not in (partition, -1):
                        if not quiet:
                            log.warning("skipping misplaced record at %s[%d]@%d: its key "
                                        "belongs on partition %d", config.topic, partition,
                                        record.offset, home)
                        continue
                    if since_ms is not None and record.timestamp < since_ms:
                        continue
                    if until_ms is not None and record.timestamp >= until_ms:
                        continue
                    try:
                        event = decode_record(record, partition, codec)
                    except DecodeError as exc:
                        if errors == "raise":
                            raise
                        if on_error is not None:
                            on_error(partition, record, exc)
                        if not quiet:
                            log.warning("skipping bad record at %s[%d]@%d (%s): %s",
                                        config.topic, partition, record.offset,
                                        exc.reason, exc)
                        continue
                    yield event
            if progress is not None:
                progress(done, done + sum(max(0, t - reader.positions.get(p, 0))
                                          for p, t in targets.items()))
            if len(targets) == len(reader.partitions) and reader.reached(targets):
                if describing is not None:
                    _check_speed(config, await describing, last_read - first_read)
                return
    finally:
        if describing is not None:
            describing.cancel()  # (and awaited: its admin client closes)
            await asyncio.gather(describing, return_exceptions=True)
        await reader.close()


def _check_speed(config: KafkaConfig, retention_ms: int | None, took_s: float) -> None:
    """Raise if a replay whose first and last reads were `took_s` apart may lack tombstones."""
    slow = retention_ms is not None and too_slow(config.topic, retention_ms, took_s * 1000)
    if slow:
        raise _TooSlow(slow, retriable=True)


async def _retention_ms(config: KafkaConfig) -> int | None:
    """The topic's tombstone retention (None: not compacted, no tombstone to lose)."""
    try:
        info = await describe_if_exists(config)
    except SnapbusError as exc:  # (the read reports an unreachable cluster or missing topic)
        log.warning("replay of %s: cannot read the topic's configs (%s); assuming "
                    "delete.retention.ms=%d", config.topic, exc, DEFAULT_DELETE_RETENTION_MS)
        return DEFAULT_DELETE_RETENTION_MS
    if info is None:
        return DEFAULT_DELETE_RETENTION_MS
    return info.tombstone_retention_ms if info.compacted else None


async def _read_again_if_slow(read: Callable[[], Awaitable[_T]]) -> _T:
    """`read()` (a whole replay), again while it outlasts the topic's tombstone retention."""
    attempt = 1
    while True:
        try:
            return await read()
        except _TooSlow as exc:
            if attempt == _ATTEMPTS:
                raise
            attempt += 1
            log.warning("%s; reading it again (attempt %d of %d)", exc, attempt, _ATTEMPTS)


def _targets(reader: PartitionReader, until_offsets: Mapping[int, int]) -> dict[int, int]:
    targets = dict(reader.end_targets)
    for p, offset in until_offsets.items():
        if p in targets:
            targets[p] = min(targets[p], offset)
    return targets


async def rebuild(
    config: KafkaConfig | None = None,
    *,
    bootstrap_servers: str | None = None,
    topic: str | None = None,
    as_of: datetime.datetime | None = None,
    use_history: bool = True,
    codec: Codec | None = None,
) -> dict[uuid.UUID, WorkspaceSnapshot]:
    """Return every session's snapshot as it was at `as_of` (default: now).

    `config` is as for `replay` (`bootstrap_servers` and `topic` are deprecated there too).
    Records with a timestamp at or before `as_of` (an aware datetime) count; a tombstone
    deletes; undecodable records are skipped, as a view skips them. See the module docstring
    for what compaction removes. A read that outlasts the topic's tombstone retention is
    started over, up to 3 reads in all.

    Raises:
        SnapbusError: what `replay` raises.
    """
    until = None
    if as_of is not None:
        until_ms = _to_ms(as_of, "as_of") + 1
        until = datetime.datetime.fromtimestamp(until_ms / 1000, tz=datetime.timezone.utc)
    config = _resolve_config(config, bootstrap_servers, topic, False, "rebuild")

    async def read() -> dict[uuid.UUID, WorkspaceSnapshot]:
        state: dict[uuid.UUID, WorkspaceSnapshot] = {}
        async for event in replay(config, until=until, use_history=use_history, codec=codec):
            if event.snapshot is None:
                state.pop(event.session_id, None)
            else:
                state[event.session_id] = event.snapshot
        return state

    return await _read_again_if_slow(read)


async def history(
    config: KafkaConfig | None,
    session_id: uuid.UUID | str | None = None,
    *,
    since: Bound = None,
    until: Bound = None,
    use_history: bool = True,
) -> list[Event]:
    """Return every change of one session still in the log, oldest first.

    `config` comes first, as for `replay` (None: `KafkaConfig.from_env()`); the former order,
    ``history(session_id[, config])``, still works until snapbus 0.3, with a
    `DeprecationWarning`. Records of the session on another partition than its own are left
    out, as views ignore them (docs/misplaced-records.md). A read that outlasts the topic's
    tombstone retention is started over, as by `rebuild`.

    Raises:
        ValidationError: `session_id` is not a UUID.
        SnapbusError: what `replay` raises.
    """
    if not isinstance(config, KafkaConfig | None) and isinstance(session_id, KafkaConfig | None):
        warnings.warn(
            "history(session_id[, config]) is deprecated and will be removed in snapbus 0.3: "
            "pass the config first, history(config, session_id)",
            DeprecationWarning, stacklevel=2)
        config, session_id = session_id, config
    if session_id is None:
        raise ValidationError("history() needs a session_id: history(config, session_id)",
                              field="session_id")
    wanted = parse_uuid(session_id, field="session_id")

    async def read() -> list[Event]:
        return [event async for event in replay(config, since=since, until=until,
                                                use_history=use_history)
                if event.session_id == wanted]

    return await _read_again_if_slow(read)


@dataclasses.dataclass(frozen=True, slots=True)
class Misplaced:
    """A record on another partition than the one its key belongs on (`find_misplaced`)."""

    partition: int
    """The partition the record is on."""
    offset: int
    """Its offset there."""
    expected_partition: int
    """The partition Kafka's default partitioner (murmur2 of the key) gives its key."""
    key: bytes
    """The record's key (a session id, as text, when the record is snapbus's)."""
    timestamp_ms: int
    """The record's timestamp, ms since the epoch (-1: none)."""
    tombstone: bool
    """Whether the record is a tombstone (no value)."""


async def find_misplaced(
    config: KafkaConfig | None = None,
    *,
    progress: Progress | None = None,
    fetch_max_wait_ms: int = 100,
) -> list[Misplaced]:
    """Return every record of the topic that is on another partition than its key's.

    Such records were written by a producer with another partitioner (librdkafka's default,
    KafkaJS's LegacyPartitioner); views ignore them (docs/misplaced-records.md). Reads the
    whole topic, never the history topic, up to the log end as of the call; decodes nothing.

    Raises:
        TopicError: the topic does not exist.
        KafkaUnavailableError: the cluster cannot be reached.
    """
    config = config if config is not None else KafkaConfig.from_env()
    reader = PartitionReader(config, fetch_max_wait_ms=fetch_max_wait_ms)
    await reader.open()
    found: list[Misplaced] = []
    try:
        count, done = len(reader.partitions), 0
        while True:
            try:
                batches = await reader.read(timeout_ms=fetch_max_wait_ms)
            except KAFKA_ERRORS as exc:
                raise translate(exc, config, "looking for misplaced records") from exc
            targets = reader.end_targets
            for partition, records in batches.items():
                stop = targets.get(partition, math.inf)
                homes = partitions_of([record.key for record in records], count)
                done += len(records)
                found.extend(
                    Misplaced(partition, record.offset, home, record.key or b"",
                              record.timestamp, record.value is None)
                    for record, home in zip(records, homes, strict=True)
                    if home not in (partition, -1) and record.offset < stop)
            if progress is not None:
                progress(done, done + sum(max(0, t - reader.positions.get(p, 0))
                                          for p, t in targets.items()))
            if len(targets) == count and reader.reached(targets):
                return sorted(found, key=lambda m: (m.partition, m.offset))
    finally:
        await reader.close()


def event_to_json(event: Event) -> dict[str, Any]:
    """Return an event as a JSON-ready dict (the line format of `write_jsonl`)."""
    return {
        "session_id": str(event.session_id),
        "snapshot": None if event.snapshot is None else event.snapshot.to_dict(),
        "partition": event.partition,
        "offset": event.offset,
        "timestamp": None if event.timestamp is None else event.timestamp.isoformat(),
        "timestamp_ms": event.timestamp_ms,
    }


async def write_jsonl(events: AsyncIterator[Event], out: IO[str]) -> int:
    """Write events as JSON Lines (one `event_to_json` object per line); return the count."""
    count = 0
    for_line = json.dumps
    async for event in events:
        out.write(for_line(event_to_json(event), ensure_ascii=False))
        out.write("\n")
        count += 1
    return count
