"""The cost of reading only committed records: a view's cold start on Apache Kafka.

A topic of 200k records over 100k sessions (quick: 20k over 10k), 12 partitions, is written on
an embedded Apache Kafka broker, once by a plain producer and once by a transactional one
(transactions of 1,000 records, every tenth aborted). A `SnapshotView` (decode="lazy", the
default) is started over each, and its start timed until it is live; and, to see the read
alone, a bare `PartitionReader` (snapbus's read loop, nothing applied) is timed from open to
the log end. Each for each of:

- isolation ``read_committed`` (snapbus's only isolation) or ``read_uncommitted`` (what
  snapbus used before; forced here past the view's refusal, for the comparison only);
- snapbus's fast path over aiokafka's fetch buffer, or aiokafka's ``getmany``.

Cases run in a new random order each run; the table gives the median over the runs.

    python -m benchmarks.isolation_cost [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from aiokafka import AIOKafkaProducer

import snapbus.reader as reader_module
from snapbus.broker import EmbeddedBroker
from snapbus.view import SnapshotView

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

TXN_RECORDS = 1_000
ABORT_EVERY = 10


async def transactional_produce(bootstrap: str, topic: str,
                                pairs: list[tuple[bytes, bytes | None]]) -> int:
    """Write `pairs` in transactions of TXN_RECORDS; abort every ABORT_EVERY-th. Returns how
    many records were committed."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"bench-{topic}",
                                linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    committed = 0
    try:
        for n, i in enumerate(range(0, len(pairs), TXN_RECORDS)):
            chunk = pairs[i:i + TXN_RECORDS]
            await producer.begin_transaction()
            futures = [await producer.send(topic, value, key=key) for key, value in chunk]
            await asyncio.gather(*futures)
            if n % ABORT_EVERY == ABORT_EVERY - 1:
                await producer.abort_transaction()
            else:
                await producer.commit_transaction()
                committed += len(chunk)
    finally:
        await producer.stop()
    return committed


async def cold_start(config: Any, isolation: str, raw: bool) -> tuple[float, int]:
    """Seconds from start() to live, and the sessions held."""
    supported = reader_module._raw_fetch_supported
    if not raw:
        reader_module._raw_fetch_supported = lambda consumer: False  # type: ignore[assignment]
    try:
        view = SnapshotView(config, start_timeout_s=600)
        view._reader._options["isolation_level"] = isolation  # past the view's refusal
        t0 = time.perf_counter()
        await view.start()
        elapsed = time.perf_counter() - t0
        assert view.status == "live", view.status_reason
        assert view._reader._raw == raw
        sessions = len(view)
        await view.stop()
        return elapsed, sessions
    finally:
        reader_module._raw_fetch_supported = supported


async def read_through(config: Any, isolation: str, raw: bool) -> tuple[float, int]:
    """Seconds for snapbus's reader alone to read the topic to its end, and the records read."""
    reader = reader_module.PartitionReader(config)
    reader._options["isolation_level"] = isolation  # past the reader's refusal
    t0 = time.perf_counter()
    await reader.open()
    reader._raw = raw
    count = 0
    try:
        while not reader.caught_up_to_start():
            for records in (await reader.read(timeout_ms=100)).values():
                count += len(records)
        return time.perf_counter() - t0, count
    finally:
        await reader.close()


async def main(runs: int, quick: bool) -> None:
    n_sessions, n_records = (10_000, 20_000) if quick else (100_000, 200_000)
    pairs = common.encode_pairs(common.make_records(n_sessions, n_records, seed=7))
    async with EmbeddedBroker(engine="kafka") as broker:
        bootstrap = broker.bootstrap_servers
        plain = await common.new_topic(bootstrap, "plain")
        await common.bulk_produce(bootstrap, plain.topic, pairs)
        txn = await common.new_topic(bootstrap, "txn")
        committed = await transactional_produce(bootstrap, txn.topic, pairs)
        cases = [(what, topic_name, config, isolation, raw)
                 for what in ("view start", "read only")
                 for topic_name, config in (("plain", plain), ("transactional", txn))
                 for isolation in ("read_committed", "read_uncommitted")
                 for raw in (True, False)]
        times: dict[tuple[str, str, str, bool], list[float]] = {}
        held: dict[tuple[str, str, str, bool], int] = {}
        rng = random.Random(1)
        for _ in range(runs):
            rng.shuffle(cases)
            for what, topic_name, config, isolation, raw in cases:
                measure = cold_start if what == "view start" else read_through
                elapsed, count = await measure(config, isolation, raw)
                key = (what, topic_name, isolation, raw)
                times.setdefault(key, []).append(elapsed)
                held[key] = count
    print(f"{n_records} records over {n_sessions} sessions, 12 partitions, Apache Kafka "
          f"(embedded); transactional topic: {committed} records committed, "
          f"{n_records - committed} aborted; median of {runs} runs")
    print()
    print("| measured | topic | isolation | read path | seconds | sessions held / records read |")
    print("|---|---|---|---|---|---|")
    for key, values in sorted(times.items(), reverse=True):
        what, topic_name, isolation, raw = key
        path = "fast path" if raw else "getmany"
        print(f"| {what} | {topic_name} | {isolation} | {path} | "
              f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | "
              f"{held[key]} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.quick))
