"""aiokafka's private internals, behind one door (internal).

Every use snapbus makes of aiokafka's non-public objects is here, in small named functions,
so that a new aiokafka touches one file (docs/adr/0001-aiokafka-internals-behind-one-door.md):

- the consumer's fetch buffer (`Fetcher._records`, `FetchResult`, `PartitionRecords`), read
  without building a `ConsumerRecord` per record: `fast_path_supported`, `read_buffer`,
  `drain`, `batch_records`;
- a whole-cluster Metadata request (the public calls name topics, which may auto-create them):
  `cluster_metadata`;
- a Fetch sent on a connection of its own to learn the log ends: `log_ends`;
- finishing a consumer stop that aiokafka left half done: `finish_stop`.

**Version check.** `VERIFIED_VERSIONS` are the aiokafka minor versions these internals were
checked against (the range pyproject.toml allows; CI runs the suite on its lowest and highest).
With any other version, `VERIFIED` is False and snapbus takes its documented fallbacks, with one
warning at import: reads go through aiokafka's public `getmany` (same records, slower), and
`log_ends` answers None (callers then wait on their own fetches). `cluster_metadata` and
`finish_stop` have no public equivalent and are tried as they are.
"""

from __future__ import annotations

import asyncio
import struct
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiokafka
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError

__all__ = [
    "AIOKAFKA_VERSION", "VERIFIED", "VERIFIED_VERSIONS", "Record", "batch_records",
    "cluster_metadata", "drain", "fast_path_supported", "finish_stop", "log_ends", "read_buffer",
]

VERIFIED_VERSIONS: tuple[tuple[int, int], ...] = ((0, 11), (0, 12), (0, 13), (0, 14))
"""The aiokafka (major, minor) versions whose internals this module was checked against."""


def _parse_version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (-1, -1)


AIOKAFKA_VERSION: tuple[int, int] = _parse_version(aiokafka.__version__)
"""The (major, minor) version of the aiokafka imported."""

try:  # the fetch buffer's types, as aiokafka 0.11 to 0.14 name them
    from aiokafka.client import ConnectionGroup
    from aiokafka.consumer.fetcher import READ_COMMITTED as _READ_COMMITTED
    from aiokafka.consumer.fetcher import READ_UNCOMMITTED as _READ_UNCOMMITTED
    from aiokafka.consumer.fetcher import FetchResult as _FetchResult
    from aiokafka.protocol.fetch import FetchRequest
    _imported = True
except ImportError:  # pragma: no cover - another aiokafka: the fallbacks
    _imported = False
    _READ_UNCOMMITTED, _READ_COMMITTED = 0, 1

VERIFIED: bool = AIOKAFKA_VERSION in VERIFIED_VERSIONS and _imported
"""Whether the imported aiokafka is one whose internals were verified (else: the fallbacks)."""

if not VERIFIED:  # pragma: no cover - only with an aiokafka outside pyproject.toml's range
    warnings.warn(
        f"snapbus was not verified with aiokafka {aiokafka.__version__} (verified: "
        + ", ".join(f"{a}.{b}" for a, b in VERIFIED_VERSIONS)
        + "); it reads through aiokafka's public getmany, which is slower",
        RuntimeWarning, stacklevel=2)


class Record(Protocol):
    """One Kafka record as a fetch returned it (aiokafka's batch records and `ConsumerRecord`
    both fit)."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


# ---------------------------------------------------------------------- client and connections


async def cluster_metadata(consumer: AIOKafkaConsumer) -> Any:
    """The whole cluster's metadata (aiokafka `ClusterMetadata`) from one Metadata request.

    A request for all topics: the client's bootstrap asked for none (Metadata v1+ reads an
    empty list as "none"), and naming the topic would auto-create it on brokers that do that.

    Raises:
        KafkaError: no broker answered.
    """
    return await consumer._client.fetch_all_metadata()


async def log_ends(consumer: AIOKafkaConsumer, topic: str, positions: Mapping[int, int]
                   ) -> dict[int, int] | None:
    """Each partition's log end now (`positions`: partition -> offset to fetch from), in one
    round trip; None when it cannot be had (a leader unknown, a request failed, or an aiokafka
    not verified).

    Sends each partition leader a Fetch that waits for nothing (no minimum size and a 1 ms
    wait: Tansu answers a 0 ms Fetch with no partitions at all) on the coordination
    connection, so it does not queue behind the consumer's long-polling fetch (a broker answers
    one connection's requests in order). The end is the high watermark of the response, or
    its last stable offset for a read_committed consumer when the broker tells one.
    """
    if not VERIFIED:
        return None
    client = consumer._client
    isolation = getattr(consumer._fetcher, "_isolation_level", _READ_COMMITTED)
    by_node: dict[int, list[tuple[int, int, int]]] = {}
    for p, offset in positions.items():
        leader = client.cluster.leader_for_partition(TopicPartition(topic, p))
        if leader is None or leader < 0:
            return None
        by_node.setdefault(leader, []).append((p, offset, 1))
    requests = {node: _fetch_request(consumer, isolation, topic, parts)
                for node, parts in by_node.items()}
    if AIOKAFKA_VERSION < (0, 14):
        # (before 0.14 the coordination connections go only to known coordinators: the
        # leaders are made known as such, under a key of their own)
        for node in requests:
            broker = client.cluster.broker_metadata(node)
            if broker is None:
                return None
            client.cluster.add_coordinator(node, broker.host, broker.port, broker.rack,
                                           purpose=("snapbus.log_ends", node))
    try:
        responses = await asyncio.gather(*(
            client.send(node, request, group=ConnectionGroup.COORDINATION)
            for node, request in requests.items()
        ))
    except (KafkaError, OSError, asyncio.TimeoutError):
        return None
    ends: dict[int, int] = {}
    for response in responses:
        for _topic, partitions in response.topics:
            for partition, error_code, highwater, *rest in partitions:
                if error_code or highwater < 0:
                    return None
                end = highwater  # (read_committed: the last stable offset, when told)
                if response.API_VERSION >= 4 and rest[0] >= 0:
                    end = rest[0]
                ends[partition] = end
    return ends if ends.keys() == positions.keys() else None


def _fetch_request(consumer: AIOKafkaConsumer, isolation: int, topic: str,
                   parts: list[tuple[int, int, int]]) -> Any:
    """A Fetch request of `parts` (partition, offset, max bytes) that waits 1 ms for nothing.

    aiokafka 0.13 on has one `FetchRequest` class that picks its wire version when sent;
    0.11 and 0.12 have a list of one class per version, and the fetcher holds the one it
    chose for the broker (v4 on, for any broker since Kafka 0.11).
    """
    if isinstance(FetchRequest, list):  # aiokafka 0.11, 0.12
        klass = consumer._fetcher._fetch_request_class
        return klass(-1, 1, 0, 1, isolation, [(topic, parts)])
    return FetchRequest(1, 0, 1, isolation, [(topic, parts)])


async def finish_stop(consumer: AIOKafkaConsumer) -> None:
    """Close a consumer whose `stop()` was cancelled inside aiokafka.

    aiokafka (issue #647) awaits the fetch tasks it just cancelled; one sleeping in a retry
    backoff (broker unreachable) re-raises that CancelledError before the client is closed.
    This cancels the fetcher's tasks still pending and closes the client.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    for task in list(getattr(fetcher, "_pending_tasks", ())):
        task.cancel()
    await consumer._client.close()


async def probe_connection(host: str, port: int, timeout_s: float,
                           client_kwargs: Mapping[str, Any]) -> None:
    """Connect to one broker as aiokafka's clients do and ask it for metadata (no topics);
    raise what that raises (a refused credential or certificate, say). TLS 1.3 brokers check
    the client certificate after the handshake, so a refusal only shows on the first read."""
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    conn = None
    try:
        conn = await asyncio.wait_for(
            create_conn(host, port, request_timeout_ms=int(timeout_s * 1000),
                        **client_kwargs), timeout_s)
        await asyncio.wait_for(conn.send(MetadataRequest([])), timeout_s)
    finally:
        if conn is not None:
            conn.close()


def abandon_sends(producer: Any) -> None:
    """Stop a producer's sender from retrying the batches it still holds, so that a `stop()`
    waiting for them returns (aiokafka retries a batch the cluster refuses for as long as it
    is refused, and its `stop()` waits for that)."""
    sender = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if sender is not None:
        sender.cancel()


# ---------------------------------------------------------------------- the fetch buffer


def fast_path_supported(consumer: AIOKafkaConsumer) -> bool:
    """Whether `read_buffer` can read this consumer's fetch buffer (else: `getmany`)."""
    fetcher = getattr(consumer, "_fetcher", None)
    return (
        VERIFIED
        and fetcher is not None
        and getattr(fetcher, "_isolation_level", None) in (_READ_UNCOMMITTED, _READ_COMMITTED)
        and isinstance(getattr(fetcher, "_records", None), dict)
    )


async def read_buffer(consumer: AIOKafkaConsumer, timeout_s: float, max_records: int | None,
                      skipped: dict[int, list[int]],
                      failed: dict[int, tuple[int, str]]) -> dict[int, list[Record]]:
    """`getmany` without building a `ConsumerRecord` per record: wait up to `timeout_s` for
    fetched data, then take whole fetched partitions until `max_records` is passed (or a
    batch could not be read: see `drain`).

    Raises:
        ConsumerStoppedError: the consumer is stopped.
        KafkaError: what the fetcher failed with (an authorization error, say).
    """
    if consumer._closed:
        raise ConsumerStoppedError()
    fetcher = consumer._fetcher
    deadline = time.monotonic() + timeout_s
    while True:
        with consumer._subscription.fetch_context():
            drained = drain(fetcher, max_records, failed, skipped)
        remaining = deadline - time.monotonic()
        if drained or failed or remaining <= 0:
            return drained
        waiter = fetcher._create_fetch_waiter()
        done, pending = await asyncio.wait([waiter], timeout=remaining)
        if not done or consumer._closed:
            for future in pending:
                future.cancel()
            return {}
        waiter.result()  # raises what the fetcher failed with (authorization errors)


def drain(fetcher: Any, max_records: int | None, failed: dict[int, tuple[int, str]],
          skipped: dict[int, list[int]] | None = None) -> dict[int, list[Record]]:
    """Take the buffered fetch results of aiokafka's `Fetcher`, as `Fetcher.fetched_records`
    does, keeping the batches' own record objects (see `batch_records`). The offsets of the
    records it skips (transaction markers, aborted transactions) go to `skipped` (partition ->
    offsets): they are no gap.

    Nothing is ever lost: a partition's position moves only past records that are returned.
    A batch that cannot be read (a CRC mismatch, a batch that does not parse) ends its
    partition's records just before it; the position stays at its first offset still wanted,
    the buffered rest is dropped, so the next fetch of the partition starts there again, and
    (partition -> (that offset, why)) goes to `failed`. A fetch error (aiokafka's
    `FetchError`) is raised when nothing was taken yet, else left for the next call.
    """
    drained: dict[int, list[Record]] = {}
    committed = fetcher._isolation_level == _READ_COMMITTED
    taken = 0
    for tp, result in list(fetcher._records.items()):
        if type(result) is not _FetchResult:  # a FetchError: report it, as aiokafka does
            if drained:
                break
            del fetcher._records[tp]
            fetcher._notify(fetcher._wait_consume_future)
            result.check_raise()
        if not result.check_assignment(tp) or not result.has_more():
            del fetcher._records[tp]
            fetcher._notify(fetcher._wait_consume_future)
            continue
        partition_records = result._partition_records
        records, next_offset, failure = batch_records(
            tp, partition_records._records, partition_records.next_fetch_offset,
            partition_records._aborted_transactions if committed else None,
            partition_records._check_crcs,
            None if skipped is None else skipped.setdefault(tp.partition, []))
        partition_records.next_fetch_offset = next_offset
        result._update_position()
        result._partition_records = None
        del fetcher._records[tp]
        fetcher._notify(fetcher._wait_consume_future)
        if records:
            drained[tp.partition] = records
            taken += len(records)
        if failure is not None:
            failed[tp.partition] = failure
        if max_records is not None and taken >= max_records:
            break
    return drained


def batch_records(
    tp: TopicPartition, memory: Any, next_offset: int,
    aborted_transactions: Sequence[tuple[int, int]] | None, check_crcs: bool,
    skipped: list[int] | None = None,
) -> tuple[list[Record], int, tuple[int, str] | None]:
    """The records of one fetched partition's batches (aiokafka `MemoryRecords`) from
    `next_offset` on, the offset to fetch next, as aiokafka's `PartitionRecords` gives them,
    and (offset, why) when a batch could not be read.

    Control batches (transaction markers) are skipped. With `aborted_transactions` (the fetch
    response's list of (producer id, first offset), given only to read_committed fetches), a
    transactional batch is skipped while its producer has an aborted transaction that began
    at or before it and whose abort marker has not come yet. The offsets of the skipped records
    are added to `skipped`, when given.

    A batch that fails its CRC check (with `check_crcs`) or does not parse ends the records
    returned: they stop before it, the offset to fetch next is the first one of it still
    wanted, and why comes third (nothing is raised: the records before it are not lost).
    """
    records: list[Record] = []
    pending = sorted(aborted_transactions or (), key=lambda entry: entry[1])
    aborting: set[int] = set()
    kept = 0  # records of the batches read whole
    try:
        while memory.has_next():
            batch = memory.next_batch()
            if check_crcs and not batch.validate_crc():
                return records, next_offset, (next_offset, "CRC mismatch")
            if aborted_transactions is not None and batch.producer_id is not None:
                base = batch.base_offset
                while pending and pending[0][1] <= base:
                    aborting.add(pending.pop(0)[0])
                if aborting:
                    if batch.is_control_batch and _is_abort_marker(batch):
                        aborting.discard(batch.producer_id)
                    elif batch.is_transactional and batch.producer_id in aborting:
                        if skipped is not None:
                            skipped.extend(range(max(batch.base_offset, next_offset),
                                                 batch.next_offset))
                        next_offset = batch.next_offset
                        continue
            if batch.is_control_batch:
                if skipped is not None:
                    skipped.extend(range(max(batch.base_offset, next_offset),
                                         batch.next_offset))
            else:
                if getattr(batch, "base_offset", -1) >= next_offset:
                    records.extend(batch)
                else:  # fetched from inside the batch (a seek), or a legacy message set
                    records.extend(r for r in batch if r.offset >= next_offset)
            next_offset = batch.next_offset
            kept = len(records)
    except Exception as exc:  # (any unreadable batch: stop before it)
        del records[kept:]
        said = " ".join(str(exc.args[0] if exc.args else type(exc).__name__).split())
        return records, next_offset, (next_offset, f"unreadable: {said}")
    return records, next_offset, None


def _is_abort_marker(batch: Any) -> bool:
    """Whether a control batch is a transaction's abort marker (control record type 0)."""
    marker = next(batch, None)
    key = None if marker is None else marker.key
    return key is not None and len(key) >= 4 and _CONTROL_KEY.unpack_from(key)[1] == 0


_CONTROL_KEY = struct.Struct(">hh")
"""A control record's key: version, type (0 abort, 1 commit)."""
