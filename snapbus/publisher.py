"""`SnapshotPublisher`: publish snapshots and tombstones to the compacted topic.

Each record is keyed by the canonical session id string, so every update of a session lands on
the same partition (Kafka's default murmur2 partitioner, the same in every language's client
that is set to it) and compaction keeps its latest value. A publish returns only once the
broker acknowledged it (``acks="all"`` by default) and returns a `Receipt` that a view's
`wait_for` accepts for read-your-writes.

The producer is idempotent where the broker allows it (Apache Kafka does): a batch the client
sends again after a lost connection is stored once, in order. A broker that refuses it (its
InitProducerId fails, as on Tansu or without the IdempotentWrite permission) gets a plain
producer and one warning; ``idempotence=True`` makes that refusal an error instead.

Nothing invalid is ever sent: the snapshot is validated and encoded, and its size checked,
before the producer sees it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable, Iterable
from typing import Any, Literal, NoReturn, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    UnknownError,
    UnsupportedVersionError,
)
from aiokafka.partitioner import DefaultPartitioner

from snapbus._aiokafka import abandon_sends
from snapbus._kafka import start_client, translate
from snapbus._lifecycle import AsyncLifecycle
from snapbus._partition import murmur2
from snapbus.codec import Codec, default_codec, encode_key
from snapbus.config import KafkaConfig
from snapbus.errors import ConfigError, KafkaUnavailableError, PublishError, ValidationError
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import DEFAULT_PARTITIONS, ensure_topic

__all__ = ["DEFAULT_MAX_VALUE_BYTES", "Receipt", "SnapshotPublisher"]

log = logging.getLogger("snapbus.publisher")

DEFAULT_MAX_VALUE_BYTES = 1_000_000
"""Largest encoded snapshot accepted (Kafka's default ``max.message.bytes`` is about 1 MB)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    """Where an acknowledged record was stored."""

    topic: str
    """The topic written to."""
    partition: int
    """The partition the session's key maps to."""
    offset: int
    """The record's offset in that partition."""
    timestamp_ms: int
    """The record's timestamp, milliseconds since the epoch (-1 if the broker gave none)."""
    key: str
    """The record key: the session id as a canonical lowercase UUID string."""
    tombstone: bool = False
    """True for an eviction."""

    @property
    def session_id(self) -> uuid.UUID:
        """The session the record is about."""
        return uuid.UUID(self.key)

    @property
    def timestamp(self) -> datetime.datetime | None:
        """The record's timestamp as an aware UTC datetime, or None when unknown."""
        if self.timestamp_ms < 0:
            return None
        return datetime.datetime.fromtimestamp(self.timestamp_ms / 1000, tz=datetime.timezone.utc)


_State = Literal["new", "started", "stopped"]


class _MurmurPartitioner:
    """Kafka's default partitioner (murmur2 of the key), remembering recent keys' hashes.

    The same sessions are published again and again, and murmur2 is pure Python (microseconds
    a key); the result is identical to aiokafka's default partitioner (`snapbus._partition`).
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 65_536) -> None:
        self._hashes: dict[bytes, int] = {}
        self._size = size

    def __call__(self, key: bytes | None, all_partitions: list[int],
                 available: list[int]) -> int:
        if key is None:
            result: int = DefaultPartitioner()(key, all_partitions, available)
            return result
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._size:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[hashed % len(all_partitions)]


_REFUSED = (UnknownError, UnsupportedVersionError, ClusterAuthorizationFailedError)
"""How brokers answer InitProducerId when they do not give idempotent producers: Tansu with
UnknownError, brokers older than 0.11 with UnsupportedVersion, a cluster without the
IdempotentWrite permission for this principal with ClusterAuthorizationFailed."""


def _now_ms() -> int:
    return int(time.time() * 1000)


_T = TypeVar("_T")

if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[_T], seconds: float) -> _T:
        """`asyncio.wait_for` without the task it creates (a third of a publish's cost)."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    _within = asyncio.wait_for


def _receipt(md: Any, stamp: int, key: str, tombstone: bool) -> Receipt:
    """The receipt of an acknowledged record that was sent with timestamp `stamp`.

    aiokafka reports the first record's timestamp for every record of a batch; the record's
    own timestamp is the one snapbus set, unless the broker assigned LogAppendTime.
    """
    timestamp = stamp if md.timestamp_type == 0 else md.timestamp
    return Receipt(md.topic, md.partition, md.offset, timestamp, key, tombstone)


class SnapshotPublisher(AsyncLifecycle):
    """Publishes snapshots and evictions to the snapshot topic (an async context manager).

    ``async with SnapshotPublisher(config) as publisher: await publisher.publish(snapshot)``

    Args:
        config: where the cluster and topic are (default: `KafkaConfig.from_env()`).
        acks: ``"all"`` (default: the record is on every in-sync replica), ``1`` or ``0``.
        linger_ms: how long the producer waits to batch records (higher: more throughput).
        compression_type: ``None``, ``"gzip"``, ``"snappy"``, ``"lz4"`` or ``"zstd"``.
        idempotence: the idempotent producer (no duplicates or reordering when the client
            resends after a lost connection). ``None`` (default): on where the broker allows
            it, else off with one warning; ``True``: required (`start` fails where refused);
            ``False``: off. Only with ``acks="all"`` (``None`` with other acks: off).
        delivery_timeout_s: a publish not acknowledged within this time raises `PublishError`.
        max_value_bytes: larger encoded snapshots are refused with `ValidationError`.
        ensure_topic: create the topic (compacted) on start if it is missing, and check it.
        allow_non_compacted: accept an existing topic that is not compacted.
        partitions: partitions of a topic created on start.
        codec: the codec to encode with (default: the shipped current schema).
        history_retention_ms: retention of the history topic if this publisher creates it
            (only when ``config.history_topic`` is set; default 7 days).
        producer_options: extra keyword arguments for `aiokafka.AIOKafkaProducer`.
    """

    def __init__(
        self,
        config: KafkaConfig | None = None,
        *,
        acks: Literal["all", 0, 1] = "all",
        linger_ms: int = 5,
        compression_type: str | None = None,
        idempotence: bool | None = None,
        delivery_timeout_s: float = 30.0,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        ensure_topic: bool = True,
        allow_non_compacted: bool = False,
        partitions: int = DEFAULT_PARTITIONS,
        codec: Codec | None = None,
        history_retention_ms: int = 7 * 24 * 3600 * 1000,
        producer_options: dict[str, Any] | None = None,
    ) -> None:
        self.config = config if config is not None else KafkaConfig.from_env()
        self._codec = codec if codec is not None else default_codec()
        self._delivery_timeout_s = delivery_timeout_s
        self._max_value_bytes = max_value_bytes
        self._ensure_topic = ensure_topic
        self._allow_non_compacted = allow_non_compacted
        self._partitions = partitions
        self._history_retention_ms = history_retention_ms
        if idempotence and acks != "all":
            raise ConfigError(f"idempotence needs acks='all', not acks={acks!r}")
        self._idempotence = idempotence if acks == "all" else False
        self._idempotent = False
        self._producer_kwargs: dict[str, Any] = {
            **self.config.client_kwargs(),
            "acks": acks,
            "linger_ms": linger_ms,
            "compression_type": compression_type,
            "enable_idempotence": self._idempotence is not False,
            "request_timeout_ms": max(1000, int(delivery_timeout_s * 1000)),
            "partitioner": _MurmurPartitioner(),
            **(producer_options or {}),
        }
        self._producer: AIOKafkaProducer | None = None
        self._state: _State = "new"

    @property
    def topic(self) -> str:
        """The topic this publisher writes to."""
        return self.config.topic

    @property
    def idempotent(self) -> bool:
        """Whether the started producer is idempotent (see the ``idempotence`` argument)."""
        return self._idempotent

    async def start(self) -> None:
        """Connect, and ensure the topic exists and is compacted.

        Raises:
            KafkaUnavailableError: the cluster cannot be reached in time.
            TopicError: the topic is not compacted, or cannot be created.
        """
        if self._state == "started":
            return
        if self._state == "stopped":
            raise PublishError("a stopped SnapshotPublisher cannot be restarted; make a new one",
                               retriable=False)
        if self._ensure_topic:
            await ensure_topic(
                self.config,
                partitions=self._partitions,
                allow_non_compacted=self._allow_non_compacted,
            )
            if self.config.history_topic:
                await ensure_topic(
                    self.config.replace(topic=self.config.history_topic, history_topic=None),
                    partitions=self._partitions,
                    allow_non_compacted=True,
                    extra_configs={"cleanup.policy": "delete",
                                   "retention.ms": str(self._history_retention_ms)},
                )
        kwargs = self._producer_kwargs
        producer = AIOKafkaProducer(**kwargs)
        try:
            await start_client(producer, self.config, "publisher")
        except KafkaUnavailableError as exc:
            if not kwargs["enable_idempotence"] or not isinstance(exc.__cause__, _REFUSED):
                raise
            refusal = f"{type(exc.__cause__).__name__}: {exc.__cause__}"
            if self._idempotence:
                raise KafkaUnavailableError(
                    f"{self.config.bootstrap_servers} refused the idempotent producer "
                    f"({refusal}); pass idempotence=None or False to publish without it"
                ) from exc.__cause__
            log.warning("%s refused the idempotent producer (%s); publishing without it: a "
                        "batch resent after a lost connection may be stored twice",
                        self.config.bootstrap_servers, refusal, extra={"topic": self.topic})
            kwargs = {**kwargs, "enable_idempotence": False}
            producer = AIOKafkaProducer(**kwargs)
            await start_client(producer, self.config, "publisher")
        self._idempotent = bool(kwargs["enable_idempotence"])
        self._producer = producer
        self._state = "started"

    async def stop(self) -> None:
        """Flush what is pending and disconnect; safe to call twice.

        Waits at most `delivery_timeout_s` for the flush: records still unacknowledged then
        (their publish already raised `PublishError`) are dropped, so a pod can shut down
        while the cluster refuses writes.
        """
        producer, self._producer = self._producer, None
        self._state = "stopped"
        if producer is None:
            return
        closing = asyncio.ensure_future(producer.stop())
        done, _ = await asyncio.wait({closing}, timeout=self._delivery_timeout_s)
        if not done:
            # aiokafka retries a batch it cannot deliver for as long as the cluster refuses it
            # and its stop() waits for that; ending the sender lets stop() go on
            log.warning("publisher of %s stopped with records still unacknowledged after "
                        "%g s (their publish raised PublishError): dropped", self.topic,
                        self._delivery_timeout_s, extra={"topic": self.topic})
            abandon_sends(producer)
        await closing

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", None) == "started":
            _warn(f"{self!r} was never stopped", ResourceWarning, stacklevel=1)

    def encode(self, snapshot: WorkspaceSnapshot) -> tuple[bytes, bytes]:
        """Validate and encode a snapshot into its Kafka key and value.

        Raises:
            ValidationError: not a `WorkspaceSnapshot`, or its encoding is too large.
        """
        if not isinstance(snapshot, WorkspaceSnapshot):
            raise ValidationError(
                f"expected a WorkspaceSnapshot, not {type(snapshot).__name__}", field="snapshot"
            )
        value = self._codec.encode(snapshot)
        if len(value) > self._max_value_bytes:
            self._too_large(snapshot, len(value))
        return snapshot.key.encode("ascii"), value

    def _check(self, snapshot: WorkspaceSnapshot) -> None:
        """Raise what `encode` would raise, mostly without encoding (see `Codec.size_bound`)."""
        if not isinstance(snapshot, WorkspaceSnapshot):
            self.encode(snapshot)
        bound = self._codec.size_bound(snapshot)
        if bound is None or bound > self._max_value_bytes:
            self.encode(snapshot)

    def _too_large(self, snapshot: WorkspaceSnapshot, size: int) -> NoReturn:
        raise ValidationError(
            f"snapshot {snapshot.session_id} encodes to {size} bytes, over the "
            f"{self._max_value_bytes}-byte limit; shorten the intent",
            field="intent",
        )

    async def publish(self, snapshot: WorkspaceSnapshot) -> Receipt:
        """Publish a snapshot and return once the broker acknowledged it.

        Raises:
            ValidationError: the snapshot is invalid or too large; nothing was sent.
            PublishError: not acknowledged within `delivery_timeout_s`.
        """
        key, value = self.encode(snapshot)
        return await self._send(key, value, snapshot.key)

    async def touch(self, snapshot: WorkspaceSnapshot) -> Receipt:
        """Publish the snapshot again to renew its age (for views that expire old sessions)."""
        return await self.publish(snapshot)

    async def evict(self, session_id: uuid.UUID | str) -> Receipt:
        """Publish a tombstone: the session disappears from every view.

        Raises:
            ValidationError: `session_id` is not a UUID; nothing was sent.
            PublishError: not acknowledged within `delivery_timeout_s`.
        """
        key = encode_key(session_id)
        return await self._send(key, None, key.decode("ascii"))

    async def publish_many(self, snapshots: Iterable[WorkspaceSnapshot]) -> list[Receipt]:
        """Publish several snapshots in as few broker round trips as possible.

        Every snapshot is validated before any is sent. Returns the receipts in input order.

        Raises:
            ValidationError: one snapshot is invalid; nothing was sent.
            PublishError: some record was not acknowledged (others may have been).
        """
        snapshots = list(snapshots)
        for snapshot in snapshots:
            self._check(snapshot)
        producer = self._require_started()
        try:
            return await asyncio.wait_for(self._send_many(producer, snapshots),
                                          self._delivery_timeout_s)
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            raise self._publish_error(exc) from exc

    async def _send_many(self, producer: AIOKafkaProducer,
                         snapshots: list[WorkspaceSnapshot]) -> list[Receipt]:
        # encoding as we send lets the first batches travel while the rest is encoded
        stamp = _now_ms()
        topic, history, encode = self.topic, self.config.history_topic, self._codec.encode
        futures = []
        extra = []
        for snapshot in snapshots:
            key, value = snapshot.key.encode("ascii"), encode(snapshot)
            futures.append(await producer.send(topic, value, key=key, timestamp_ms=stamp))
            if history:
                extra.append(await producer.send(history, value, key=key, timestamp_ms=stamp))
        done = (await asyncio.gather(*futures, *extra))[: len(futures)]
        return [_receipt(md, stamp, snapshot.key, False)
                for md, snapshot in zip(done, snapshots, strict=True)]

    def _require_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            state = "stopped" if self._state == "stopped" else "not started"
            raise PublishError(f"the publisher is {state}; use `async with SnapshotPublisher()`",
                               retriable=False)
        return self._producer

    async def _send(self, key: bytes, value: bytes | None, session_key: str) -> Receipt:
        producer = self._require_started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delivery_timeout_s
        while True:
            try:
                stamp = _now_ms()
                md = await _within(
                    self._send_once(producer, key, value, stamp),
                    max(0.0, deadline - loop.time()),
                )
                return _receipt(md, stamp, session_key, value is None)
            except UnknownError as exc:  # some brokers answer a transient failure this way
                if loop.time() >= deadline:
                    raise self._publish_error(exc) from exc
                log.debug("publish of %s got %r; retrying", session_key, exc,
                          extra={"session_id": session_key, "topic": self.topic})
                await asyncio.sleep(0.05)
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                raise self._publish_error(exc) from exc

    async def _send_once(self, producer: AIOKafkaProducer, key: bytes,
                         value: bytes | None, stamp: int) -> Any:
        """Enqueue the record (waiting for buffer space) and wait for its acknowledgement."""
        future = await producer.send(self.topic, value, key=key, timestamp_ms=stamp)
        if self.config.history_topic:
            extra = await producer.send(self.config.history_topic, value, key=key,
                                        timestamp_ms=stamp)
            result, _ = await asyncio.gather(future, extra)
            return result
        return await future

    def _publish_error(self, exc: BaseException) -> PublishError:
        if isinstance(exc, asyncio.TimeoutError):
            reason = (f"not acknowledged within {self._delivery_timeout_s:g} s: a partition "
                      "leader down, or fewer in-sync replicas than min.insync.replicas")
            retriable = True
        else:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            retriable = translate(exc, self.config, "publishing").retriable
        return PublishError(
            f"publish to {self.topic!r} on {self.config.bootstrap_servers} failed ({reason}); "
            + ("the record may or may not be stored; publishing it again is safe" if retriable
               else "the broker refused it: publishing it again fails the same way"),
            retriable=retriable)
