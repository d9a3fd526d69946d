"""`SnapshotView`: an in-memory materialized view of every session on the topic.

Consistency contract
--------------------
- **Start**: `start` (or ``async with``) reads the topic from the beginning and returns once
  the view holds everything written before it started, i.e. every partition reached the last
  stable offset its first fetch reported (the high watermark, unless a transaction is open).
  If that takes longer than `start_timeout_s`, it returns anyway with `status` ``degraded``
  and the reason, and keeps catching up in the background.
- **Live**: a background task then follows the topic. Records are applied one at a time, in
  offset order within each partition; a tombstone (null value) deletes the session. Since all
  updates of a session share a partition, the view always holds, for each session, the value
  of its latest record read so far: last write wins over the full log, so the result does not
  depend on broker-side compaction (which only bounds replay time).
- **Reads** are synchronous, in memory, and O(1): `get`, ``view[id]``, ``id in view``,
  `len`, iteration, and the exact secondary indexes `by_repo`, `by_agent`, `by_state`.
  Between two awaits the view does not change, so a read sees one consistent state.
- **Read your writes**: `wait_for(receipt)` returns once the view applied that record;
  `barrier()` returns once everything acknowledged by the broker before the call is visible.
- **Transactions**: only committed records are applied (read_committed); records of aborted
  transactions never are. Records behind a transaction still open (even plain ones) show when
  it ends; meanwhile `start` and `barrier` do not wait for them, `wait_for` does
  (docs/transactions.md).
- **Bad records** (undecodable value, empty value, unknown schema fingerprint, key that is not
  a UUID, value whose session id differs from its key) are counted in `stats`, logged with
  their partition and offset, and skipped: they never stop the view and never erase or alter
  the last good snapshot of their key. With ``decode="lazy"`` a value may be found bad only
  when first read: from then on the session is absent from every read (`get`, ``[]``, ``in``,
  `len`, iteration, indexes) until its last good snapshot is restored from the log, which
  happens beside the live tail (docs/bad-values.md).
- **Misplaced records**: a record on another partition than the one Kafka's default
  partitioner (murmur2 of the key) gives its key was written by a producer with another
  partitioner. It is ignored (never applied, never deletes), counted in `stats.misplaced`,
  logged with its coordinates and dead-lettered, so that every view reaches the same state
  from the same log whatever order it reads partitions in (docs/misplaced-records.md).
- **Changes**: `changes()` streams every applied change as ``(session_id, old, new)``, in
  order per session (``old`` None: created; ``new`` None: deleted or expired). Re-publishing
  an equal snapshot is not a change. The initial replay decodes only each session's latest
  record, so a subscriber that joins before `start` sees each session's final state once.
- **Expiry** (optional ``ttl_s``): sessions whose latest record is older than the TTL are
  removed from every read together (within one fetch wait of their expiry, as the background
  task sweeps them), as the cache snapbus replaces expired its entries.
- **Deleted stays deleted**: a compacted topic keeps a tombstone only ``delete.retention.ms``
  (read from the topic at start) after it reached the log. A view whose state was last
  complete longer ago than that, less a margin (a tenth, at most an hour), does not trust it: a
  checkpoint that old is not loaded, and a view that lagged that long (stopped fetching,
  black-holed, behind) re-reads the whole log (`stats.resyncs`). See docs/compaction.md.
- **Topic changes**: every ``topic_check_s`` the view reads the topic's partition count and
  configs; added partitions (which move sessions to other partitions) or a policy that is no
  longer ``compact`` make it ``degraded`` with the reason, logged as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, ParamSpec, TypeVar

from aiokafka.errors import KafkaError

from snapbus import checkpoint
from snapbus._dead_letters import BadRecords
from snapbus._expiry import Expiry
from snapbus._lifecycle import AsyncLifecycle
from snapbus._repair import Repairs
from snapbus._retention import Retention
from snapbus._stash import Stash, Stashed
from snapbus._store import SessionStore
from snapbus._waiters import Subscriber, Waiters
from snapbus.codec import Codec, default_codec
from snapbus.config import KafkaConfig, validate_topic_name
from snapbus.errors import (
    ConfigError,
    DecodeError,
    SnapbusError,
    TopicError,
    ViewError,
    ViewTimeoutError,
)
from snapbus.publisher import Receipt
from snapbus.reader import PartitionReader, Record, decode_value
from snapbus.snapshot import WorkspaceSnapshot, _is_canonical, parse_uuid
from snapbus.topic import (
    DEFAULT_DELETE_RETENTION_MS,
    TopicInfo,
    TopicWatch,
    describe_if_exists,
)
from snapbus.topic import ensure_topic as _ensure_topic

__all__ = ["Change", "ChangeStream", "Health", "SnapshotView", "ViewStats", "ViewStatus"]

log = logging.getLogger("snapbus.view")
_P = ParamSpec("_P")
_R = TypeVar("_R")

ViewStatus = Literal["starting", "catching_up", "live", "degraded", "failed", "stopped"]
"""Where the view is in its life: see `SnapshotView.status`."""

_APPLY_CHUNK = 2000  # records applied between two yields to the event loop
_LOG_ENDS_WAIT_S = 5.0  # how long barrier() waits for the log ends before its own fetches
_SHORT_RETENTION_MS = 60_000  # a tombstone retention that warrants a warning at start
_SLOW_READS = 3  # whole-log reads in a row outlasting the tombstone retention before failing
class Change(NamedTuple):
    """One applied change of one session."""

    session_id: uuid.UUID
    """The session that changed."""
    old: WorkspaceSnapshot | None
    """The snapshot before the change; None when the session was created."""
    new: WorkspaceSnapshot | None
    """The snapshot after the change; None when the session was deleted."""


@dataclasses.dataclass(frozen=True, slots=True)
class ViewStats:
    """A point-in-time summary of what the view has done."""

    status: ViewStatus
    """The view's status when the stats were taken."""
    sessions: int
    """Sessions currently in the view."""
    records_applied: int
    """Records applied (upserts plus tombstones), bad records excluded."""
    records_superseded: int
    """Records of the initial replay skipped undecoded because a later record of the same
    session replaced them."""
    tombstones: int
    """Tombstones applied."""
    decode_errors: int
    """Records skipped because they could not be decoded."""
    last_offsets: dict[int, int]
    """Offset of the last record read, per partition (absent until one was read)."""
    lag: dict[int, int]
    """Records between the view and the latest known end of each partition."""
    catch_up_seconds: float | None
    """How long the initial replay took; None until it completed."""
    status_reason: str | None
    """Why the view is degraded or failed; None otherwise."""
    staleness_s: float
    """Seconds since the broker last answered for the least recently answered partition."""
    dead_lettered: int
    """Bad records copied to the dead-letter topic."""
    resyncs: int
    """Times the view re-read the whole log because the broker's log ended before it."""
    expired: int
    """Sessions hidden because their latest record grew older than the TTL."""
    checkpoint_sessions: int | None
    """Sessions loaded from a checkpoint at start; None when none was used."""
    misplaced: int = 0
    """Records ignored because they are on another partition than their key's (written by a
    producer with another partitioner; docs/misplaced-records.md)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """What a health or readiness check needs to know about a view."""

    ready: bool
    """Caught up and live."""
    status: ViewStatus
    """The view's status."""
    reason: str | None
    """Why the view is degraded or failed."""
    staleness_s: float
    """Seconds since the broker last answered for the least recently answered partition."""
    lag: int
    """Records between the view and the latest known end of the log, over all partitions."""
    sessions: int
    """Sessions in the view."""
    decode_errors: int
    """Records skipped as undecodable."""


class ChangeStream:
    """An async iterator of `Change`, subscribed from the moment `SnapshotView.changes` returns.

    If the consumer falls more than `max_pending` changes behind, iteration raises `ViewError`
    (nothing is dropped silently). Use ``async with`` or `close` to unsubscribe.
    """

    __slots__ = ("_closed", "_max_pending", "_queue", "_subscribers")

    def __init__(self, subscribers: set[Subscriber], max_pending: int) -> None:
        self._subscribers = subscribers
        self._max_pending = max_pending
        self._queue: asyncio.Queue[Change | BaseException | None] = asyncio.Queue()
        self._closed = False

    def _push(self, change: Change) -> None:
        if self._queue.qsize() >= self._max_pending:
            self._subscribers.discard(self)
            self._queue.put_nowait(
                ViewError(f"change subscriber fell more than {self._max_pending} changes behind")
            )
            return
        self._queue.put_nowait(change)

    def _end(self, error: BaseException | None) -> None:
        self._queue.put_nowait(error)

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        if self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Change):
            return item
        self.close()
        if item is None:
            raise StopAsyncIteration
        raise item

    def close(self) -> None:
        """Unsubscribe; iteration ends."""
        self._closed = True
        self._subscribers.discard(self)

    async def __aenter__(self) -> ChangeStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _weakly(method: Callable[_P, _R]) -> Callable[_P, _R | None]:
    """`method`, without keeping its object alive (no reference cycle keeps a view); None
    once the object is gone."""
    ref = weakref.WeakMethod(method)

    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)

    return call


_UUID = uuid.UUID


def _canonical(session_id: uuid.UUID | str) -> str:
    return str(parse_uuid(session_id, field="session_id"))


class SnapshotView(AsyncLifecycle):
    """The latest snapshot of every session, kept in memory and in sync with the topic.

    ``async with SnapshotView(config) as view: view.get(session_id)``

    Args:
        config: where the cluster and topic are (default: `KafkaConfig.from_env()`).
        start_timeout_s: how long `start` waits for the initial replay before returning with
            status ``degraded`` (the replay goes on in the background).
        fetch_max_wait_ms: how long a fetch waits on the broker for new records. Apache Kafka
            answers as soon as a record arrives; some brokers only re-check after about half
            of it, so lower values mean fresher views at the cost of more idle requests.
        ensure_topic: create the topic (compacted) if it is missing; when false a missing
            topic raises `TopicError` on start.
        allow_non_compacted: accept an existing topic that is not compacted.
        codec: the codec to decode with (default: the shipped schemas).
        stale_after_s: with no answer from the broker for this long the view reports
            ``degraded`` (it keeps serving the last known state and keeps retrying).
        fail_after_s: with no answer for this long the view gives up: ``failed`` (default:
            never; it retries until stopped).
        dead_letter_topic: copy every undecodable record there (a compacted topic keyed by
            source coordinates, so copies from many pods collapse), with headers saying where
            it came from and why it failed.
        ttl_s: hide sessions whose latest record is older than this, as the cache snapbus
            replaces expired its entries (record timestamps are compared with this host's
            clock); `SnapshotPublisher.touch` renews a session. See `snapbus.janitor` to
            also delete them from the topic.
        checkpoint_path: a local file to start from and to save to: `start` loads it (when it
            exists and is valid) and reads only the records after it, `stop` saves the state
            there, and `save_checkpoint` saves it on demand. A corrupt, foreign or stale file
            falls back to a full replay (see `snapbus.checkpoint`).
        topic_check_s: how often to read the topic's partition count and configs, to report
            added partitions or a policy no longer ``compact`` (``degraded``), and to follow
            changes of ``delete.retention.ms`` (over one admin connection kept between
            checks); None: never (only at start).
        clock: the wall clock (seconds since the epoch, like `time.time`) the view compares
            record, checkpoint and fetch times with, for the TTL and tombstone retention.
        decode: ``"lazy"`` (default): the initial replay reads only the indexed fields of each
            session's latest record and decodes the rest on first use, as a GlobalKTable keeps
            serialized values (half the time to go live). A value found bad then is absent
            from every read at once, counted in `stats.decode_errors`, and replaced by the
            session's last good snapshot from the log moments later. ``"eager"``:
            decode and validate every session before going live. Records arriving after
            that are always decoded at once.
        consumer_options: extra keyword arguments for `aiokafka.AIOKafkaConsumer`.
    """

    def __init__(
        self,
        config: KafkaConfig | None = None,
        *,
        start_timeout_s: float = 60.0,
        fetch_max_wait_ms: int = 100,
        ensure_topic: bool = True,
        allow_non_compacted: bool = False,
        codec: Codec | None = None,
        stale_after_s: float = 10.0,
        fail_after_s: float | None = None,
        dead_letter_topic: str | None = None,
        ttl_s: float | None = None,
        checkpoint_path: str | Path | None = None,
        decode: Literal["lazy", "eager"] = "lazy",
        consumer_options: Mapping[str, Any] | None = None,
        topic_check_s: float | None = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config if config is not None else KafkaConfig.from_env()
        if topic_check_s is not None and topic_check_s <= 0:
            raise ConfigError(f"topic_check_s must be positive, not {topic_check_s}")
        self._topic_check_s = topic_check_s
        self._watch_task: asyncio.Task[None] | None = None
        self._topic_problem: str | None = None
        self._compacted_at_start = True  # (a topic read non-compacted on purpose stays so)
        self._clock = clock
        # tombstone retention: when the state was last complete (`Retention`)
        self._retention = Retention()
        self._resync_reason = ""
        self._checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self._checkpoint_loaded: int | None = None
        self._stale_after_s = stale_after_s
        self._fail_after_s = fail_after_s
        # bad and misplaced records: counted, logged, dead-lettered
        self._bad = BadRecords(self.config, validate_topic_name(dead_letter_topic)
                               if dead_letter_topic is not None else None)
        self._resyncs = 0
        self._resync_seen: set[str] | None = None
        self._slow_reads = 0  # whole-log reads in a row that outlasted the retention
        # initial replay: each partition's latest value per key (record, with a TTL), applied
        # when caught up
        self._stash: Stash | None = Stash(keep_records=ttl_s is not None)
        self._records_superseded = 0
        if decode not in ("lazy", "eager"):
            raise ConfigError(f"decode must be 'lazy' or 'eager', not {decode!r}")
        self._lazy = decode == "lazy"  # see _flush_stash
        self._serving = False
        if ttl_s is not None and ttl_s <= 0:
            raise ConfigError(f"ttl_s must be positive, not {ttl_s}")
        self._expiry = None if ttl_s is None else Expiry(int(ttl_s * 1000), self._now_ms)
        self._expired = 0
        self._codec = codec if codec is not None else default_codec()
        self._start_timeout_s = start_timeout_s
        self._ensure_topic = ensure_topic
        self._allow_non_compacted = allow_non_compacted
        self._reader = PartitionReader(
            self.config, fetch_max_wait_ms=fetch_max_wait_ms, consumer_options=consumer_options
        )
        self._fetch_wait_ms = fetch_max_wait_ms
        # repairs and reports, beside the live tail (`Repairs`)
        self._repairs = Repairs(self.config, self._codec, self._reader, self._bad,
                                _weakly(self._apply_snapshot), _weakly(self._settled),
                                fetch_max_wait_ms=fetch_max_wait_ms,
                                consumer_options=consumer_options)
        self._flushing = False  # (the initial replay's stash is being applied)
        # state: the sessions and their indexes (`_data`: the store's decoded sessions, bound
        # here for `get`)
        self._store = SessionStore(self._codec, _weakly(self._lost))
        self._data = self._store.data
        # `uuid.UUID.int` -> the view's own canonical string of that id (a session's key or a
        # repo id), filled by reads with `uuid.UUID` keys, for which `str(uuid)` costs more
        # than the lookup; checked against the store on every use, so a stale entry only costs
        # a slow read; cleared when it outgrows the view (docs/reads-and-memory.md)
        self._texts: dict[int, str] = {}
        # progress
        self._status: ViewStatus = "starting"
        self._status_reason: str | None = None
        self._records_applied = 0
        self._tombstones = 0
        self._last_offsets: dict[int, int] = {}
        # the reader's positions as of the last read whose records are all applied: what
        # `wait_for` and checkpoints go by (a read's records are applied in chunks, with the
        # event loop running in between, and the reader's positions count them all at once)
        self._applied: dict[int, int] = {}
        self._started_at: float | None = None
        self._catch_up_seconds: float | None = None
        self._caught_up: asyncio.Event = asyncio.Event()
        # waiters, barriers and change subscribers (`_subscribers`: bound for `_put`)
        self._waiters = Waiters()
        self._subscribers = self._waiters.subscribers
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Replay the topic, then follow it live in the background.

        Returns once the view is complete as of the log ends (last stable offsets) at start,
        or after `start_timeout_s` with status ``degraded``. A start that raises or is
        cancelled (a caller's timeout) leaves the view stopped, with nothing running.

        Raises:
            KafkaUnavailableError: the cluster cannot be reached in time.
            TopicError: the topic is missing (with ``ensure_topic=False``) or not compacted.
        """
        if self._status != "starting" or self._task is not None:
            if self._status == "stopped":
                raise ViewError("a stopped SnapshotView cannot be restarted; make a new one")
            return
        self._started_at = time.monotonic()
        loading: asyncio.Future[checkpoint.Checkpoint] | None = None
        if self._checkpoint_path is not None and self._checkpoint_path.exists():
            # read the file while connecting (reading and checking it release the GIL)
            loading = asyncio.ensure_future(asyncio.to_thread(
                checkpoint.read_checkpoint, self._checkpoint_path, topic=self.config.topic))
        try:
            await self._read_topic_configs()
            await self._bad.open()
            # with a checkpoint, fetch nothing until its offsets are known
            await self._reader.open(paused=loading is not None)
            self._retention.reset(self._reader.partitions, self._now_ms())
        except BaseException:
            self._status = "stopped"
            if loading is not None:
                loading.cancel()
            await self._reader.close()
            await self._bad.close()
            raise
        try:
            if loading is not None:
                assert self._checkpoint_path is not None
                # fetch the tail from the offsets in the file's header while the rest loads
                early = checkpoint.read_offsets(self._checkpoint_path, topic=self.config.topic,
                                                partitions=len(self._reader.partitions))
                if early is not None:
                    for partition, offset in early.items():
                        self._reader.seek(partition, offset)
                    self._reader.resume()
                try:
                    await self._load_checkpoint(loading, early)
                finally:
                    self._reader.resume()
            self._status = "catching_up"
            self._task = asyncio.create_task(self._run(), name=f"snapbus-view:{self.config.topic}")
            if self._topic_check_s is not None:
                self._watch_task = asyncio.create_task(
                    self._watch_topic(self._topic_check_s),
                    name=f"snapbus-view-topic-check:{self.config.topic}")
            caught_up = asyncio.create_task(self._caught_up.wait())
            try:
                await asyncio.wait(
                    {caught_up, self._task},
                    timeout=self._start_timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                caught_up.cancel()
        except BaseException:
            # cancelled (a caller's timeout) or failed while loading or catching up: leave
            # nothing running, as a start that raised before the read loop would
            await self.stop()
            raise
        if self._failure is not None:
            await self.stop()
            raise ViewError(f"view failed during start: {self._failure}") from self._failure
        self._serving = True
        if not self._caught_up.is_set():
            behind = sum(self._reader.lag().values())
            self._set_status(
                "degraded",
                f"initial replay not complete after {self._start_timeout_s:g} s "
                f"({behind} records behind); still catching up",
            )

    async def stop(self) -> None:
        """Stop following the topic and disconnect; safe to call twice.

        Pending `wait_for` and `barrier` calls raise `ViewError`; change streams end.
        """
        if self._status == "stopped" and self._task is None:
            return
        if self._checkpoint_path is not None and self._can_checkpoint():
            try:
                await self.save_checkpoint()
            except (OSError, SnapbusError) as exc:
                log.warning("view of %s: could not save the checkpoint %s: %s",
                            self.config.topic, self._checkpoint_path, exc,
                            extra={"topic": self.config.topic})
        task, self._task = self._task, None
        watch, self._watch_task = self._watch_task, None
        repair, self._repairs.task = self._repairs.task, None
        for running in (task, watch, repair):
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await running
        if self._status != "failed":
            self._status = "stopped"
        await self._reader.close()
        await self._bad.close()
        self._end_waiters(ViewError("the view was stopped"))

    async def _read_topic_configs(self) -> None:
        """Ensure (or describe) the topic and take its tombstone retention."""
        info: TopicInfo | None
        if self._ensure_topic:
            info = await _ensure_topic(self.config,
                                       allow_non_compacted=self._allow_non_compacted)
        else:
            try:
                info = await describe_if_exists(self.config)
            except TopicError as exc:  # (a missing topic is the reader's to report)
                log.warning("view of %s: %s; assuming delete.retention.ms=%d", self.config.topic,
                            exc, DEFAULT_DELETE_RETENTION_MS, extra={"topic": self.config.topic})
                info = None
        if info is not None:
            self._retention.retention_ms = info.tombstone_retention_ms
            if info.tombstone_retention_ms < _SHORT_RETENTION_MS:
                log.warning("view of %s: the topic keeps tombstones only %d ms "
                            "(delete.retention.ms): a view behind by longer, or whose read of "
                            "the whole log takes longer, re-reads the whole log (and fails "
                            "after three such reads in a row); raise it",
                            self.config.topic,
                            info.tombstone_retention_ms, extra={"topic": self.config.topic})
            self._compacted_at_start = info.compacted

    async def _watch_topic(self, interval_s: float) -> None:
        """Read the topic's partitions and configs every `interval_s` (`_topic_changed`), over
        one admin connection kept between checks (`TopicWatch`)."""
        watch = TopicWatch(self.config)
        try:
            while True:
                await asyncio.sleep(interval_s)  # (a period, not a synchronisation)
                try:
                    info = await watch.describe()
                except SnapbusError as exc:  # (an unreachable broker: the reader reports it)
                    log.debug("view of %s: cannot check the topic: %s", self.config.topic, exc)
                    continue
                except Exception:  # (the check must not end silently: say why, try again)
                    log.exception("view of %s: checking the topic failed", self.config.topic,
                                  extra={"topic": self.config.topic})
                    await watch.close()
                    continue
                if info is not None:
                    self._topic_changed(info)
        finally:
            await watch.close()

    def _topic_changed(self, info: TopicInfo) -> None:
        """Report a partition count or policy that changed under the view; follow the
        tombstone retention."""
        topic, reading = self.config.topic, len(self._reader.partitions)
        problems = []
        if info.partitions != reading:
            problems.append(
                f"topic {topic!r} now has {info.partitions} partitions, the view reads "
                f"{reading}: adding partitions moves sessions to other partitions, where no "
                "view can order their records; copy the sessions to a new topic instead "
                "(snapbus replay | snapbus import), and restart the views on it")
        if not info.compacted and self._compacted_at_start and not self._allow_non_compacted:
            problems.append(
                f"topic {topic!r} now has cleanup.policy={info.cleanup_policy}, not compact: "
                "the broker will delete sessions not updated within its retention time; set "
                "it back to compact")
        problem = "; ".join(problems) or None
        if problem != self._topic_problem:
            self._topic_problem = problem
            if problem is not None:
                log.error("view of %s: %s", topic, problem, extra={"topic": topic})
        retention = info.tombstone_retention_ms
        if retention != self._retention.retention_ms:
            log.info("view of %s: the topic now keeps tombstones %d ms (was %d ms)", topic,
                     retention, self._retention.retention_ms, extra={"topic": topic})
            self._retention.retention_ms = retention

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_task", None) is not None:
            _warn(f"{self!r} was never stopped", ResourceWarning, stacklevel=1)

    # ------------------------------------------------------------------ checkpoints

    def _can_checkpoint(self) -> bool:
        return (self._task is not None and self._caught_up.is_set() and self._stash is None
                and self._resync_seen is None and self._status != "failed"
                and not self._repairs.wanted)

    async def save_checkpoint(self, path: str | Path | None = None) -> int:
        """Save the view's state and offsets to a checkpoint file; return its size in bytes.

        The state and offsets are captured at one instant (no await in between); the file is
        written in a worker thread, atomically. The offsets are those of the last read whose
        records are all applied: the state may hold some records after them (a read applied
        in part), which a restart from the file reads again, to the same end state.

        Raises:
            ViewError: the view is not running, or has not caught up yet.
            ConfigError: no path given and the view has no `checkpoint_path`.
        """
        target = Path(path) if path is not None else self._checkpoint_path
        if target is None:
            raise ConfigError("save_checkpoint needs a path (or SnapshotView(checkpoint_path=))")
        if not self._can_checkpoint():
            raise ViewError(f"cannot checkpoint a view that is {self._status}, not caught up "
                            "or repairing a session")
        # captured and encoded at one instant, on the loop; written in a worker thread
        sessions = self._store.export()
        data = checkpoint.dumps(checkpoint.Checkpoint(
            self.config.topic, len(self._reader.partitions), dict(self._applied),
            sessions, self._store.frozen(),
            {} if self._expiry is None else self._expiry.stamps, int(self._now_ms()),
            self._codec.compact_prefix,
            self._retention.oldest_ms()))
        del sessions
        size = await asyncio.to_thread(checkpoint.write_file, target, data)
        log.info("view of %s saved %d sessions to %s (%d bytes)", self.config.topic,
                 len(self), target, size, extra={"topic": self.config.topic})
        return size

    async def _load_checkpoint(self, loading: asyncio.Future[checkpoint.Checkpoint],
                               early: dict[int, int] | None) -> None:
        """Install the checkpoint `loading` reads, or fall back to a full replay; `early`:
        the offsets the reader was already sent to (`checkpoint.read_offsets`)."""
        reader, path = self._reader, self._checkpoint_path
        try:
            saved = await loading
        except checkpoint.CheckpointError as exc:
            problem = str(exc)
        else:
            problem = "" if saved.partitions == len(reader.partitions) else (
                f"{path} is for {saved.partitions} partitions; topic {self.config.topic!r} "
                f"now has {len(reader.partitions)}")
            if not problem and saved.compact_prefix != self._codec.compact_prefix:
                problem = (f"{path} keeps values of schema {saved.compact_prefix[2:].hex()}; "
                           "this process's current schema is another")
            if not problem:
                problem = self._too_old(saved)
        if problem:
            log.warning("view of %s: ignoring checkpoint, replaying the whole topic: %s",
                        self.config.topic, problem, extra={"topic": self.config.topic})
            if early is not None:
                reader.restart_from_beginning()
            return
        for _ in self._store.install(saved.sessions, saved.indexes):
            await asyncio.sleep(0)
        if self._expiry is not None:
            for key in self._store.ids():
                if not self._expiry.renew(key, saved.stamps.get(key, saved.created_ms)):
                    self._put(key, None)
        if saved.offsets != early:  # (a seek drops what was fetched since)
            for partition, offset in saved.offsets.items():
                reader.seek(partition, offset)
        assert saved.synced_ms is not None  # (_too_old)
        self._retention.synced = {p: (offset, saved.synced_ms)
                                  for p, offset in saved.offsets.items()}
        self._checkpoint_loaded = len(self)
        log.info("view of %s loaded %d sessions from %s", self.config.topic, len(self),
                 path, extra={"topic": self.config.topic})

    def _too_old(self, saved: checkpoint.Checkpoint) -> str:
        """Why a checkpoint's state is too old to trust (empty: it is not): sessions deleted
        since may have lost their tombstones."""
        if saved.synced_ms is None:
            return (f"{self._checkpoint_path} does not say when its state was complete "
                    "(written by an older snapbus)")
        problem = self._retention.too_old(saved.synced_ms, self._now_ms(), self.config.topic)
        return problem and f"{self._checkpoint_path} {problem}"

    # ------------------------------------------------------------------ status

    @property
    def status(self) -> ViewStatus:
        """``starting``, ``catching_up``, ``live``, ``degraded``, ``failed`` or ``stopped``."""
        return self._status

    @property
    def ready(self) -> bool:
        """Whether the view caught up and is live: safe to serve reads that must be fresh."""
        return self._status == "live"

    def health(self) -> Health:
        """A summary for health checks: readiness, status, staleness, lag and sessions.

        The one call to check a view: `status`, `ready` and `status_reason` read the same
        fields live; `stats` adds the counters.
        """
        stats = self.stats
        return Health(
            ready=stats.status == "live",
            status=stats.status,
            reason=stats.status_reason,
            staleness_s=stats.staleness_s,
            lag=sum(stats.lag.values()),
            sessions=stats.sessions,
            decode_errors=stats.decode_errors,
        )

    @property
    def status_reason(self) -> str | None:
        """Why the view is ``degraded`` or ``failed``; None otherwise."""
        return self._status_reason

    @property
    def stats(self) -> ViewStats:
        """Counters, offsets and lag, as of now."""
        return ViewStats(
            status=self._status,
            sessions=len(self),
            records_applied=self._records_applied,
            records_superseded=self._records_superseded,
            tombstones=self._tombstones,
            decode_errors=self._bad.decode_errors,
            last_offsets=dict(self._last_offsets),
            lag=self._reader.lag(),
            catch_up_seconds=self._catch_up_seconds,
            status_reason=self._status_reason,
            staleness_s=self._reader.staleness_s() if self._task is not None else 0.0,
            dead_lettered=self._bad.dead_lettered,
            resyncs=self._resyncs,
            expired=self._expired,
            checkpoint_sessions=self._checkpoint_loaded,
            misplaced=self._bad.misplaced,
        )

    def _set_status(self, status: ViewStatus, reason: str | None = None) -> None:
        if status != self._status:
            log.info("view of %s: %s -> %s%s", self.config.topic, self._status, status,
                     f" ({reason})" if reason else "",
                     extra={"topic": self.config.topic, "status": status})
        self._status = status
        self._status_reason = reason

    # ------------------------------------------------------------------ reads

    def get(
        self, session_id: uuid.UUID | str, default: WorkspaceSnapshot | None = None
    ) -> WorkspaceSnapshot | None:
        """Return the session's latest snapshot, or `default` when it is not in the view.

        A session whose latest value turns out bad when first read (see ``decode``) is not in
        the view until its last good snapshot is restored from the log (docs/bad-values.md).

        Raises:
            ValidationError: `session_id` is not a UUID.
        """
        if type(session_id) is _UUID:  # fast path: a UUID read before
            found = self._data.get(self._texts.get(session_id.int))  # type: ignore[arg-type]
        else:
            try:
                found = self._data.get(session_id)  # type: ignore[arg-type]  # fast: str keys
            except TypeError:  # unhashable: let _canonical say what is wrong with it
                found = None
        if found is not None:
            return found
        return self._get(session_id, default)

    def _get(self, session_id: uuid.UUID | str, default: WorkspaceSnapshot | None
             ) -> WorkspaceSnapshot | None:
        """`get` past its fast path: other spellings, UUIDs not read before, first reads."""
        if type(session_id) is str and _is_canonical(session_id):
            key = session_id
        else:
            key = _canonical(session_id)
            found = self._data.get(key)
            if found is not None:
                if type(session_id) is _UUID:
                    self._remember(session_id, found.key)
                return found
        value = self._store.encoded.get(key)
        if value is None:
            return default
        found = self._store.decoded(key, value)  # not read before: decode it now
        if found is None:
            return default
        if type(session_id) is _UUID:
            self._remember(session_id, found.key)
        return found

    def _remember(self, id_: uuid.UUID, text: str) -> None:
        """Keep `text`, the view's own string of `id_`, for the next read by `uuid.UUID`."""
        texts = self._texts
        if len(texts) > 2 * len(self._store) + len(self._store.by_repo) + 1024:
            texts.clear()  # (stale entries of sessions gone: start over)
        texts[id_.int] = text

    def ttl_left_s(self, session_id: uuid.UUID | str) -> float | None:
        """Seconds before the session expires from this view (0 when due), by the view's TTL
        and clock; None when the view has no TTL or does not hold the session.

        Raises:
            ValidationError: `session_id` is not a UUID.
        """
        if self._expiry is None or self.get(session_id) is None:
            return None
        left_ms = self._expiry.left_ms(_canonical(session_id))
        return None if left_ms is None else left_ms / 1000

    def __getitem__(self, session_id: uuid.UUID | str) -> WorkspaceSnapshot:
        if type(session_id) is _UUID:
            found = self._data.get(self._texts.get(session_id.int))  # type: ignore[arg-type]
        else:
            try:
                found = self._data.get(session_id)  # type: ignore[arg-type]
            except TypeError:
                found = None
        if found is None:
            found = self._get(session_id, None)
            if found is None:
                raise KeyError(session_id)
        return found

    def __contains__(self, session_id: object) -> bool:
        if type(session_id) is _UUID:
            if self._texts.get(session_id.int) in self._data:
                return True
        elif type(session_id) is str and session_id in self._data:
            return True
        if not isinstance(session_id, (str, uuid.UUID)):
            return False
        try:
            key = session_id if type(session_id) is str else _canonical(session_id)
        except SnapbusError:
            return False
        found = self._data.get(key)
        if found is None:
            value = self._store.encoded.get(key)
            if value is not None:  # (decoded, so that `in` agrees with `get` on a bad value)
                found = self._store.decoded(key, value)
                if found is None:
                    return False
        if found is not None:
            if isinstance(session_id, uuid.UUID):
                self._remember(session_id, found.key)
            return True
        try:
            return self.get(key) is not None  # (a non-canonical spelling)
        except SnapbusError:
            return False

    def __len__(self) -> int:
        """Sessions in the view (with ``decode="lazy"``, counting those not read yet: one whose
        value turns out bad when first read leaves then; docs/bad-values.md)."""
        return len(self._store)

    def __iter__(self) -> Iterator[uuid.UUID]:
        return (uuid.UUID(key) for key in self._store.ids())

    def snapshots(self) -> list[WorkspaceSnapshot]:
        """Return every snapshot in the view."""
        return self._store.snapshots()

    def _lost(self, key: str, error: DecodeError) -> None:
        """A session's value found bad on its first read, now gone from the store: report its
        record (`BadRecords`) and restore its last good snapshot from the log (`Repairs`)."""
        log.debug("view of %s: the value of session %s is bad (%s), found on first read",
                  self.config.topic, key, error.reason, extra={"topic": self.config.topic})
        if self._expiry is not None:
            self._expiry.forget(key)
        raw = key.encode()
        self._repairs.report_bad.add((self._repairs.home(raw), raw))
        self._want_repair(key)

    def by_repo(self, repo_id: uuid.UUID | str) -> list[WorkspaceSnapshot]:
        """Return the snapshots of every session on that repository."""
        by_repo = self._store.by_repo
        if type(repo_id) is str:
            if repo_id in by_repo:  # (only canonical ids are in the index)
                return self._store.snapshots(by_repo[repo_id])
        elif type(repo_id) is _UUID:
            text = self._texts.get(repo_id.int)
            if text is not None and text in by_repo:
                return self._store.snapshots(by_repo[text])
        if type(repo_id) is str and _is_canonical(repo_id):
            key = repo_id
        else:
            key = str(parse_uuid(repo_id, field="repo_id"))
        found = self._store.snapshots(by_repo.get(key, ()))
        if found and type(repo_id) is _UUID:
            self._remember(repo_id, found[0].repo_key)
        return found

    def by_agent(self, agent_id: str) -> list[WorkspaceSnapshot]:
        """Return the snapshots of every session of that agent."""
        return self._store.snapshots(self._store.by_agent.get(agent_id, ()))

    def by_state(self, state: str) -> list[WorkspaceSnapshot]:
        """Return the snapshots of every session in that lifecycle state."""
        return self._store.snapshots(self._store.by_state.get(state, ()))

    def select(
        self,
        *,
        repo_id: uuid.UUID | str | None = None,
        agent_id: str | None = None,
        state: str | None = None,
    ) -> list[WorkspaceSnapshot]:
        """Return the snapshots matching every filter given (all of them when none is).

        Walks the smallest of the indexes involved, so the cost follows the smallest match.

        Raises:
            ValidationError: `repo_id` is not a UUID.
        """
        repo = None if repo_id is None else str(parse_uuid(repo_id, field="repo_id"))
        return self._store.select(repo, agent_id, state)

    # ------------------------------------------------------------------ waiting

    def _require_running(self) -> None:
        if self._status == "failed":
            raise ViewError(f"the view failed: {self._status_reason}")
        if self._task is None:
            raise ViewError("the view is not running; use `async with SnapshotView()`")

    async def wait_for(self, receipt: Receipt, timeout: float | None = None) -> None:
        """Return once the view applied the record `receipt` describes (read your writes).

        Raises:
            ViewTimeoutError: not applied within `timeout` seconds (an asyncio.TimeoutError).
            ViewError: the view stopped or failed meanwhile.
        """
        self._require_running()
        if receipt.topic != self.config.topic:
            raise ViewError(f"receipt is for topic {receipt.topic!r}, the view reads "
                            f"{self.config.topic!r}")
        if self._applied.get(receipt.partition, 0) > receipt.offset:
            return
        try:
            await asyncio.wait_for(
                self._waiters.wait_offset(receipt.partition, receipt.offset), timeout)
        except asyncio.TimeoutError:
            raise ViewTimeoutError(
                f"offset {receipt.offset} of {receipt.topic}[{receipt.partition}] not applied "
                f"within {timeout:g} s (the view has applied up to "
                f"{self._applied.get(receipt.partition, 0)})") from None

    async def barrier(self, timeout: float | None = None) -> None:
        """Return once every record acknowledged before this call is visible in the view.

        The target is each partition's log end, asked of the broker after the call began
        with a Fetch that waits for nothing (one round trip: an idle view's barrier returns in
        about a millisecond). Should that fail, the target comes from the view's own next two
        fetch responses (about two fetch waits).

        Raises:
            ViewTimeoutError: not reached within `timeout` seconds (an asyncio.TimeoutError).
            ViewError: the view stopped or failed meanwhile.
        """
        self._require_running()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        reader = self._reader
        probe = reader.start_barrier()
        bound = _LOG_ENDS_WAIT_S if timeout is None else min(timeout, _LOG_ENDS_WAIT_S)
        try:
            ends = await asyncio.wait_for(reader.log_ends(), bound)
        except asyncio.TimeoutError:
            ends = None  # (a broker slow to answer: the view's own fetches will tell)
        self._require_running()
        if ends is not None:
            probe.targets.update(ends)
            if self._applied_all(ends) and reader.reached(ends):
                return
        future = self._waiters.wait_barrier(probe)
        try:
            await asyncio.wait_for(future, None if deadline is None
                                   else max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise ViewTimeoutError(
                f"barrier on {self.config.topic} not reached within {timeout:g} s (status "
                f"{self._status}{': ' + self._status_reason if self._status_reason else ''})"
            ) from None

    def _applied_all(self, targets: dict[int, int]) -> bool:
        applied = self._applied
        return all(applied.get(p, 0) >= target for p, target in targets.items())

    def changes(self, *, max_pending: int = 100_000) -> ChangeStream:
        """Subscribe to changes from now on; see `ChangeStream`."""
        stream = ChangeStream(self._subscribers, max_pending)
        self._subscribers.add(stream)
        return stream

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        """The read loop: read, apply (or stash, during the initial replay), then let the
        parts react: dead letters, expiry, health and status, waiters."""
        reader = self._reader
        try:
            while True:
                batches = await self._read()
                for partition, records in batches.items():
                    if self._stash is not None:
                        self._stash_records(partition, records)
                    else:
                        await self._apply_records(partition, records)
                    if records:
                        self._last_offsets[partition] = records[-1].offset
                # (drop the fetched records now: else the last fetch of the replay, up to
                # fetch_max_bytes of them, stays referenced while the next read waits)
                batches, records = {}, []
                if self._stash is not None and (
                    self._serving or self._waiters.pending()
                    or reader.caught_up_to_start()
                ):
                    await self._flush_stash()
                if self._stash is None:
                    self._applied = dict(reader.positions)
                if self._bad.pending():
                    self._bad.send()
                if self._expiry is not None:
                    self._expire(self._expiry)
                self._check_health()
                self._after_read()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    async def _read(self) -> dict[int, list[Record]]:
        """The next records, retrying failed fetches (``degraded`` meanwhile)."""
        failures = 0
        while True:
            try:
                return await self._reader.read(timeout_ms=self._fetch_wait_ms)
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) and failures >= 3:
                    raise
                failures += 1
                self._set_status("degraded", f"reading failed, retrying: {exc!r}")
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))

    async def _apply_records(self, partition: int, records: list[Record]) -> None:
        """Apply a partition's records in order; misplaced ones are skipped (`BadRecords`)."""
        homes = self._repairs.homes_of(records)
        partitions = len(self._reader.partitions)
        for start in range(0, len(records), _APPLY_CHUNK):
            for record, home in zip(records[start:start + _APPLY_CHUNK],
                                    homes[start:start + _APPLY_CHUNK], strict=True):
                if home == partition or home < 0:
                    self._apply(partition, record)
                else:
                    self._bad.misplaced_record(partition, record, home, partitions)
            if len(records) > _APPLY_CHUNK:
                await asyncio.sleep(0)  # let readers and waiters run

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        if self._repairs.task is not None:
            self._repairs.task.cancel()  # (nothing to repair in a view that serves no more)
        self._set_status("failed", f"{type(exc).__name__}: {exc}")
        log.error("view of %s failed: %s", self.config.topic, self._status_reason,
                  extra={"topic": self.config.topic, "status": "failed"})
        self._end_waiters(ViewError(f"the view failed: {exc}"))

    def _check_health(self) -> None:
        """Track staleness, truncated logs and changed partitions; set the status."""
        if self._repairs.error is not None:  # (a repair could not get past it)
            error, self._repairs.error = self._repairs.error, None
            raise error
        reader = self._reader
        truncated = reader.truncated()
        if truncated:
            self._begin_resync(
                f"partitions {truncated} now end before the view's position (the broker lost "
                "records, or the topic was re-created)")
        else:
            self._check_retention()
        staleness = reader.staleness_s()
        if staleness > self._stale_after_s:
            if self._fail_after_s is not None and staleness > self._fail_after_s:
                raise ViewError(f"no answer from the broker for {staleness:.0f} s "
                                f"(fail_after_s={self._fail_after_s:g})")
            partitions = reader.partitions_now()
            if partitions is not None and partitions != set(reader.partitions):
                raise ViewError(f"topic {self.config.topic!r} now has partitions "
                                f"{sorted(partitions)}, not {reader.partitions}: it was "
                                "deleted and re-created; restart the view")
            self._set_status("degraded", f"no answer from the broker for {staleness:.1f} s; "
                                         "serving the last known state")
        elif self._resync_seen is not None:
            self._set_status("degraded", f"{self._resync_reason}; re-reading the whole log")
        elif self._topic_problem is not None:
            self._set_status("degraded", self._topic_problem)
        elif self._status == "degraded" and self._caught_up.is_set():
            self._set_status("live")
        elif self._status == "degraded":
            self._set_status("catching_up")

    def _now_ms(self) -> float:
        return self._clock() * 1000

    def _check_retention(self) -> None:
        """Re-read the whole log if the state may have missed a tombstone (`Retention`).

        A read of the whole log (the first one, or a re-read) that outlasts the retention is
        started over too; `_SLOW_READS` such reads in a row fail the view: the topic cannot
        be read whole before it drops tombstones.
        """
        reason = self._retention.check(self._reader, self._now_ms())
        if reason is None:
            return
        if self._resync_seen is not None or (self._checkpoint_loaded is None
                                             and not self._caught_up.is_set()):
            self._slow_reads += 1
            reason = f"reading the whole log was too slow: {reason}"
            if self._slow_reads >= _SLOW_READS:
                raise ViewError(f"{reason}; {self._slow_reads} reads of the whole log in a "
                                "row took that long: raise the topic's delete.retention.ms")
        self._begin_resync(reason)

    def _set_live(self) -> None:
        """Caught up: ``live``, unless the topic changed under the view (`_topic_changed`)."""
        if self._topic_problem is None:
            self._set_status("live")
        else:
            self._set_status("degraded", self._topic_problem)

    def _begin_resync(self, reason: str) -> None:
        log.warning("view of %s: %s; re-reading the whole log", self.config.topic, reason,
                    extra={"topic": self.config.topic})
        self._resyncs += 1
        self._resync_seen = set()
        self._resync_reason = reason
        if self._stash is not None:  # (keys whose records are gone must not survive)
            self._records_superseded -= self._stash.drop()
        self._reader.restart_from_beginning()
        self._retention.reset(self._reader.partitions, self._now_ms())

    def _finish_resync(self) -> None:
        seen, self._resync_seen = self._resync_seen or set(), None
        for key in [k for k in self._store.ids() if k not in seen]:
            self._put(key, None)
        log.info("view of %s re-read the log: %d sessions", self.config.topic, len(self),
                 extra={"topic": self.config.topic})

    def _after_read(self) -> None:
        reader = self._reader
        if self._resync_seen is not None and reader.caught_up_to_start():
            self._slow_reads = 0
            self._finish_resync()
            self._set_live()
        if (not self._caught_up.is_set() and reader.caught_up_to_start()
                and not self._repairs.pending()):  # (the initial replay's repairs are done)
            self._slow_reads = 0
            self._catch_up_seconds = time.monotonic() - (self._started_at or 0.0)
            self._caught_up.set()
            self._set_live()
            log.info("view of %s caught up: %d sessions in %.2f s", self.config.topic,
                     len(self), self._catch_up_seconds, extra={"topic": self.config.topic})
        self._waiters.release(self._applied, reader)

    def _end_waiters(self, error: BaseException) -> None:
        self._waiters.end(error, None if isinstance(error, ViewError) and self._failure is None
                          else error)

    def _stash_records(self, partition: int, records: list[Record]) -> None:
        """Initial replay: keep only each key's latest value; apply it at the end (`Stash`)."""
        assert self._stash is not None
        self._stash.add(partition, records)
        self._records_superseded += len(records)

    async def _flush_stash(self) -> None:
        """Apply the latest record of every key seen during the initial replay.

        With ``decode="lazy"``, a new session's value is only peeked at (`Codec.peek`) for its
        indexed fields and kept encoded (`Codec.compact`), decoded on first read (`SessionStore`);
        anything else (a tombstone, an older schema, a bad value, a session already in the
        view) is decoded now. A bad one is reported once `Repairs` has found
        its record in the log.
        """
        stash, self._stash = self._stash, None
        assert stash is not None
        self._flushing = True
        try:
            await self._apply_stash(stash)
        finally:
            self._flushing = False
        self._start_repair()

    async def _apply_stash(self, stash: Stash) -> None:
        store, peek = self._store, self._codec.peek
        for partition, keys, values, records, misplaced, stashed in stash.take(
                len(self._reader.partitions)):
            self._records_superseded -= stashed
            self._repairs.report_misplaced.update((partition, key) for key in misplaced)
            for start in range(0, len(keys), _APPLY_CHUNK):
                chunk_keys = keys[start:start + _APPLY_CHUNK]
                chunk_values = values[start:start + _APPLY_CHUNK]
                lazy = (self._lazy and self._resync_seen is None and self._expiry is None
                        and not self._subscribers)
                # (map: the per-value calls run from C, not from this loop)
                left: Sequence[int] = (store.load(chunk_keys, chunk_values,
                                                  map(peek, chunk_values))
                                       if lazy else range(len(chunk_keys)))
                self._records_applied += len(chunk_keys) - len(left)
                for at in left:
                    key = chunk_keys[at]
                    if records is not None:
                        error = self._apply(partition, records[start + at])
                    else:  # (its record is found in the log if it is bad: `Repairs`)
                        error = self._apply(partition, Stashed(key, chunk_values[at]),
                                            report=False)
                        if error is not None:
                            self._repairs.report_bad.add((partition, key))
                    if error is not None and error.reason != "bad_key" and key:
                        self._want_repair(key.decode("ascii"))  # an earlier good record
                await asyncio.sleep(0)

    def _settled(self) -> Mapping[int, int]:
        """Per partition, the offset below which no record can still be applied after a
        repair restores one (`Repairs`): the reader's positions while the initial replay is
        stashed or flushed (the stash holds each key's latest record: applying it later only
        moves forward), else the positions of the last read applied in full (a read is applied
        in chunks, with awaits between: its later records are not applied yet)."""
        if self._stash is not None or self._flushing:
            return self._reader.positions
        return self._applied

    # ------------------------------------------------------------------ applying

    def _want_repair(self, key: str) -> None:
        """Ask for the session's last good snapshot to be restored from the log (`Repairs`)."""
        self._repairs.want(key)
        self._start_repair()

    def _start_repair(self) -> None:
        """Start the repairs (`Repairs`), unless the view is not running."""
        if self._task is not None and self._status != "failed":
            self._repairs.start()

    def _apply(self, partition: int, record: Record, *, report: bool = True
               ) -> DecodeError | None:
        try:
            key, snapshot = decode_value(record, self._codec)
        except DecodeError as exc:
            if report:
                self._bad.bad(partition, record, exc)
            return exc
        self._apply_snapshot(key, snapshot, record.timestamp)
        return None

    def _apply_snapshot(self, key: str, new: WorkspaceSnapshot | None, timestamp_ms: int
                        ) -> None:
        if self._resync_seen is not None:
            self._resync_seen.add(key)
        self._repairs.applied(key)  # (newer than what a repair would restore)
        self._records_applied += 1
        if new is None:
            self._tombstones += 1
            if self._expiry is not None:
                self._expiry.deleted(key)
        elif self._expiry is not None and not self._expiry.renew(key, timestamp_ms):
            new = None  # already older than the TTL: hidden, like an expired cache entry
        self._put(key, new)

    def _put(self, key: str, new: WorkspaceSnapshot | None) -> None:
        """Make `new` the session's snapshot (None: delete), telling subscribers."""
        change = self._store.put(key, new)
        if change is None:
            return
        if new is None and self._expiry is not None:
            self._expiry.forget(key)
        if self._subscribers:
            self._waiters.notify(Change(uuid.UUID(key), *change))

    def _expire(self, expiry: Expiry) -> None:
        """Remove the sessions whose latest record is older than the TTL."""
        for key in expiry.due():
            if key in self._store:
                self._expired += 1
                self._put(key, None)

    def expired_sessions(self) -> list[uuid.UUID]:
        """Sessions hidden because their latest record is older than the TTL, not yet evicted.

        Used by `snapbus.janitor.Janitor` to publish their tombstones. Empty without a TTL.
        """
        return [] if self._expiry is None else [uuid.UUID(key) for key in self._expiry.hidden]
