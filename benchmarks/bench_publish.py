"""Publish throughput with acks=all: snapbus `SnapshotPublisher` vs a bare `AIOKafkaProducer`.

Cases (each on a fresh 12-partition compacted topic, same acks/linger/batch settings):

- ``bare aiokafka, pre-encoded``: the baseline. ``send()`` every pre-encoded (key, value) pair,
  then gather the delivery futures. The lower bound of what any Python client on aiokafka does.
- ``bare aiokafka + fastavro encode``: the same, encoding each record with fastavro inside the
  timed loop (the part of snapbus's cost that is plain Avro work).
- ``bare aiokafka send+await x gather(W)``: per-record coroutines (send, await the ack) gathered
  in windows of W: the bare equivalent of the last snapbus case, to separate the cost of the
  per-record pattern from snapbus's own.
- ``snapbus publish_many``: one `SnapshotPublisher.publish_many` call with every snapshot
  (validate, encode, size-check, send, gather, build receipts).
- ``snapbus publish() x gather(W)``: concurrent `publish()` calls gathered in windows of W
  (each awaits its own acknowledgement, as application code publishing per request would).

Throughput is records acknowledged per second, measured from the first send to the last ack.
Snapshot objects are built before timing for every case (building them is the caller's work).

    python benchmarks/bench_publish.py [--runs N] [--quick]
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

ACKS = "all"
LINGER_MS = 5  # SnapshotPublisher's default
WINDOW = 1000


async def _bare(bootstrap: str, topic: str, pairs: list[tuple[bytes, bytes | None]]) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=ACKS, linger_ms=LINGER_MS,
                                enable_idempotence=common.bare_idempotence())
    await producer.start()
    try:
        t0 = time.perf_counter()
        futures = [await producer.send(topic, value, key=key) for key, value in pairs]
        await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def _bare_gather(
    bootstrap: str, topic: str, pairs: list[tuple[bytes, bytes | None]], window: int
) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=ACKS, linger_ms=LINGER_MS,
                                enable_idempotence=common.bare_idempotence())

    async def one(key: bytes, value: bytes | None) -> Any:
        return await (await producer.send(topic, value, key=key))

    await producer.start()
    try:
        t0 = time.perf_counter()
        for i in range(0, len(pairs), window):
            await asyncio.gather(*(one(k, v) for k, v in pairs[i : i + window]))
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def _bare_encode(bootstrap: str, topic: str, records: list[dict[str, str]]) -> float:
    import fastavro
    from aiokafka import AIOKafkaProducer

    from snapbus.codec import MARKER, default_codec

    writer = default_codec().writer
    header = MARKER + writer.fingerprint
    parsed = writer.parsed
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=ACKS, linger_ms=LINGER_MS,
                                enable_idempotence=common.bare_idempotence())
    await producer.start()
    try:
        t0 = time.perf_counter()
        futures = []
        for record in records:
            buf = io.BytesIO()
            buf.write(header)
            fastavro.schemaless_writer(buf, parsed, record)
            futures.append(await producer.send(topic, buf.getvalue(),
                                               key=record["session_id"].encode("ascii")))
        await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def _publish_many(config: Any, snapshots: list[Any]) -> float:
    from snapbus.publisher import SnapshotPublisher

    async with SnapshotPublisher(config, acks=ACKS, linger_ms=LINGER_MS,
                                 delivery_timeout_s=120) as publisher:
        t0 = time.perf_counter()
        receipts = await publisher.publish_many(snapshots)
        elapsed = time.perf_counter() - t0
    assert len(receipts) == len(snapshots)
    return elapsed


async def _publish_gather(config: Any, snapshots: list[Any], window: int) -> float:
    from snapbus.publisher import SnapshotPublisher

    async with SnapshotPublisher(config, acks=ACKS, linger_ms=LINGER_MS,
                                 delivery_timeout_s=120) as publisher:
        t0 = time.perf_counter()
        for i in range(0, len(snapshots), window):
            await asyncio.gather(*(publisher.publish(s) for s in snapshots[i : i + window]))
        return time.perf_counter() - t0


async def run(runs: int, quick: bool) -> list[dict[str, Any]]:
    n_records = 10_000 if quick else 50_000
    n_sessions = n_records // 3
    generated = common.make_records(n_sessions, n_records, seed=7)
    records = [r for r in generated if isinstance(r, dict)]
    pairs = common.encode_pairs(records)
    snapshots = common.to_snapshots(records)
    avg_bytes = sum(len(v or b"") for _, v in pairs) / len(pairs)
    params = {"records": n_records, "sessions": n_sessions, "acks": ACKS, "linger_ms": LINGER_MS,
              "window": WINDOW, "avg_value_bytes": round(avg_bytes),
              "partitions": common.PARTITIONS}
    c = common.Collector("publish", params)
    c.table("throughput", f"Publish throughput, {n_records:,} records, acks={ACKS}, "
            f"linger_ms={LINGER_MS}", "records/s", baseline="bare aiokafka, pre-encoded",
            higher_is_better=True,
            note=f"Values average {avg_bytes:.0f} bytes; 12 partitions; one producer per case.")
    cases = [
        ("bare aiokafka, pre-encoded", lambda b, cfg: _bare(b, cfg.topic, pairs)),
        ("bare aiokafka + fastavro encode", lambda b, cfg: _bare_encode(b, cfg.topic, records)),
        (f"bare aiokafka send+await x gather({WINDOW})",
         lambda b, cfg: _bare_gather(b, cfg.topic, pairs, WINDOW)),
        ("snapbus publish_many", lambda b, cfg: _publish_many(cfg, snapshots)),
        (f"snapbus publish() x gather({WINDOW})",
         lambda b, cfg: _publish_gather(cfg, snapshots, WINDOW)),
    ]
    async with common.bench_broker() as broker:
        bootstrap = broker.bootstrap_servers
        # one untimed warm-up round: first connections, code paths, broker allocations
        for run_index in range(runs + 1):
            for name, case in cases:
                config = await common.new_topic(bootstrap, "publish")
                try:
                    seconds = await case(bootstrap, config)
                finally:
                    await common.delete_topic(bootstrap, config.topic)
                if run_index > 0:
                    c.add("throughput", name, len(records) / seconds)
                if quick and run_index == 0:
                    break  # quick: warm up with the first case only
    return c.results()


if __name__ == "__main__":
    common.main(run, __doc__.splitlines()[0])
