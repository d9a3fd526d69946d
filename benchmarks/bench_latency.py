"""Publish-to-visible latency, idle barrier, and the idle CPU a follower costs, at two waits.

For each fetch_max_wait_ms in (20, 100), on a fresh 12-partition topic:

- ``snapbus``: one `SnapshotPublisher` and, in the same process, a separate `SnapshotView`
  (subscribed through ``view.changes()``). Each update's latency is from just before
  ``await publisher.publish(snapshot)`` to the moment its change comes out of the view's
  change stream (the view applied it).
- ``bare aiokafka`` (baseline): an `AIOKafkaProducer` (same acks/linger) sending pre-encoded
  bytes and awaiting the ack, and an `AIOKafkaConsumer` with every partition assigned, no group,
  the same fetch_max_wait_ms, looping on ``getmany`` and decoding each value with fastavro into
  a dict; latency is from just before ``send`` to ``getmany`` returning the record.

Updates are published one at a time (each awaits its ack), with a random gap of 0-4 ms between
them so publishes do not phase-lock with the fetch cycle; a few warm-up updates go first and
are not counted. Then, with the producer stopped and nothing published:

- idle barrier: ``snapbus`` times ``await view.barrier()`` (nothing new written: how fast a
  read-your-writes barrier returns on an up-to-date view), a few times with a random gap of up
  to one wait between them; the baseline is one idle fetch round trip of the bare consumer (the
  time between two consecutive fetch responses, seen through aiokafka's
  ``last_poll_timestamp``). Why that baseline: a barrier's target must be a log end read
  *after* the call (it then covers every record acknowledged before it), and the simple way to
  get one, waiting for the follower's own next fetch response, costs about that round trip
  (an up-to-date follower's fetch is parked on the broker up to fetch_max_wait_ms). snapbus
  asks the log ends with a Fetch that waits for nothing, on a connection of its own (one
  broker round trip; `snapbus.reader.PartitionReader.log_ends`). A ListOffsets round trip
  would be as fast but is no baseline: the Tansu broker answers it wrongly (BROKER.md).
- idle CPU: the follower is left idle and the CPU used by this process
  (``time.process_time``) and by the broker process (/proc, embedded broker only) is reported
  as a percentage of one core.

The trade-off: a fetch that finds nothing waits on the broker up to fetch_max_wait_ms. Apache
Kafka answers such a fetch as soon as a record arrives, so there latency barely depends on the
setting and a small wait only buys more idle requests. The embedded Tansu broker re-checks only
after about half the wait (BROKER.md), so there latency grows with the wait (about
U(0, wait/2) plus the produce time) while idle CPU falls as the wait grows: one empty fetch per
wait period, on both the client and the broker.

    python benchmarks/bench_latency.py [--runs N] [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

WAITS = (20, 100)
ACKS = "all"
LINGER_MS = 5  # SnapshotPublisher's default
GAP_MAX_S = 0.004
WARMUP = 10
TIMEOUT_S = 30.0
POLL_S = 0.0005  # how often the bare round-trip probe looks at aiokafka's fetch stamp


def _p(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method), q in 1..99."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class _Tracker:
    """Send times by item; arrival times; completion of a batch of expected items."""

    def __init__(self) -> None:
        self.sent: dict[Any, float] = {}
        self.latencies: list[float] = []
        self._event = asyncio.Event()

    def arrived(self, item: Any, now: float) -> None:
        t0 = self.sent.pop(item, None)
        if t0 is not None:
            self.latencies.append(now - t0)
            if not self.sent:
                self._event.set()

    async def drain(self) -> None:
        """Wait until everything sent so far arrived."""
        if self.sent:
            self._event.clear()
            await asyncio.wait_for(self._event.wait(), TIMEOUT_S)


async def _drive(
    tracker: _Tracker,
    publish: Callable[[Any], Any],
    warmup: list[tuple[Any, Any]],
    items: list[tuple[Any, Any]],
    rng: random.Random,
) -> tuple[list[float], list[float]]:
    """Publish (tracking key, payload) pairs one at a time; return (latencies, ack times)."""
    for key, payload in warmup:
        tracker.sent[key] = time.perf_counter()
        await publish(payload)
    await tracker.drain()
    tracker.latencies.clear()
    acks: list[float] = []
    for key, payload in items:
        await asyncio.sleep(rng.uniform(0, GAP_MAX_S))
        tracker.sent[key] = t0 = time.perf_counter()
        await publish(payload)
        acks.append(time.perf_counter() - t0)
    await tracker.drain()
    return list(tracker.latencies), acks


async def _idle_cpu(idle_s: float, broker_pid: int | None) -> tuple[float, float | None]:
    """CPU % of one core used by this process and by the broker while nothing happens."""
    await asyncio.sleep(0.2)  # let the last fetches settle
    wall0, cpu0 = time.perf_counter(), time.process_time()
    b0 = common.process_cpu_seconds(broker_pid)
    await asyncio.sleep(idle_s)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    b1 = common.process_cpu_seconds(broker_pid)
    broker = None if b0 is None or b1 is None else 100 * (b1 - b0) / wall
    return 100 * cpu / wall, broker


async def _snapbus(
    config: Any, wait_ms: int, warmup: list[Any], items: list[Any], n_barriers: int,
    idle_s: float, broker_pid: int | None, rng: random.Random,
) -> tuple[list[float], list[float], list[float], float, float | None]:
    from snapbus.publisher import SnapshotPublisher
    from snapbus.view import SnapshotView

    tracker = _Tracker()
    async with SnapshotView(config, fetch_max_wait_ms=wait_ms) as view:
        stream = view.changes()

        async def follow() -> None:
            async for change in stream:
                tracker.arrived(change.new, time.perf_counter())

        task = asyncio.create_task(follow())
        try:
            async with SnapshotPublisher(config, acks=ACKS, linger_ms=LINGER_MS) as publisher:
                latencies, acks = await _drive(
                    tracker, publisher.publish,
                    [(s, s) for s in warmup], [(s, s) for s in items], rng)
            barriers = []
            for _ in range(n_barriers):
                await asyncio.sleep(rng.uniform(0, wait_ms / 1000))
                t0 = time.perf_counter()
                await view.barrier(timeout=TIMEOUT_S)
                barriers.append(time.perf_counter() - t0)
            cpu, broker_cpu = await _idle_cpu(idle_s, broker_pid)
        finally:
            stream.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return latencies, acks, barriers, cpu, broker_cpu


async def _round_trips(consumer: Any, n: int, wait_ms: int, rng: random.Random) -> list[float]:
    """Times between two consecutive fetch responses of an idle bare consumer (seconds)."""
    from aiokafka import TopicPartition

    tp = min(consumer.assignment(), key=lambda t: t.partition)
    assert isinstance(tp, TopicPartition)

    async def next_response() -> float:
        stamp = consumer.last_poll_timestamp(tp)
        deadline = time.perf_counter() + TIMEOUT_S
        while consumer.last_poll_timestamp(tp) == stamp:
            if time.perf_counter() > deadline:
                raise TimeoutError("no fetch response")
            await asyncio.sleep(POLL_S)
        return time.perf_counter()

    trips = []
    for _ in range(n):
        await asyncio.sleep(rng.uniform(0, wait_ms / 1000))
        t1 = await next_response()
        trips.append(await next_response() - t1)
    return trips


async def _bare(
    bootstrap: str, topic: str, wait_ms: int, warmup: list[tuple[bytes, bytes]],
    items: list[tuple[bytes, bytes]], n_barriers: int, idle_s: float, broker_pid: int | None,
    rng: random.Random,
) -> tuple[list[float], list[float], list[float], float, float | None]:
    import fastavro
    from aiokafka import AIOKafkaProducer

    from snapbus.codec import HEADER_SIZE, default_codec

    parsed = default_codec().writer.parsed
    tracker = _Tracker()
    view: dict[bytes, Any] = {}
    async with common.bare_consumer(bootstrap, topic, wait_ms) as consumer:

        async def follow() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=wait_ms)
                now = time.perf_counter()
                for records in batches.values():
                    for r in records:
                        buf = io.BytesIO(r.value)
                        buf.seek(HEADER_SIZE)
                        view[r.key] = fastavro.schemaless_reader(buf, parsed, None)
                        tracker.arrived(r.value, now)

        task = asyncio.create_task(follow())
        try:
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=ACKS,
                                        linger_ms=LINGER_MS,
                                        enable_idempotence=common.bare_idempotence())
            await producer.start()
            try:
                async def publish(pair: tuple[bytes, bytes]) -> None:
                    await (await producer.send(topic, pair[1], key=pair[0]))

                latencies, acks = await _drive(
                    tracker, publish, [(v, (k, v)) for k, v in warmup],
                    [(v, (k, v)) for k, v in items], rng)
            finally:
                await producer.stop()
            trips = await _round_trips(consumer, n_barriers, wait_ms, rng)
            cpu, broker_cpu = await _idle_cpu(idle_s, broker_pid)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return latencies, acks, trips, cpu, broker_cpu


async def run(runs: int, quick: bool) -> list[dict[str, Any]]:
    n_updates, idle_s, n_barriers = (60, 0.8, 10) if quick else (500, 2.0, 20)
    n_sessions = 50
    records = [r for r in common.make_records(n_sessions, n_sessions + WARMUP + n_updates, seed=3)
               if isinstance(r, dict)]
    # the first n_sessions records create the sessions: publish them untimed, as the warm-up
    warmup_records, records = records[: n_sessions + WARMUP], records[n_sessions + WARMUP :]
    snapshots, warmup_snapshots = common.to_snapshots(records), common.to_snapshots(warmup_records)
    pairs, warmup_pairs = common.encode_pairs(records), common.encode_pairs(warmup_records)
    assert len(set(snapshots)) == len(snapshots), "every update must be a change"
    params = {"updates": n_updates, "sessions": n_sessions, "acks": ACKS, "linger_ms": LINGER_MS,
              "gap_ms": f"uniform 0..{GAP_MAX_S * 1000:g}", "idle_s": idle_s,
              "idle_barriers": n_barriers,
              "fetch_max_wait_ms": list(WAITS)}
    c = common.Collector("latency", params)
    for wait in WAITS:
        base = f"bare aiokafka, wait={wait}"
        c.table(f"p50-{wait}", f"Publish-to-visible p50, fetch_max_wait_ms={wait}", "ms",
                baseline=base, higher_is_better=False, metric="p50")
        c.table(f"p99-{wait}", f"Publish-to-visible p99, fetch_max_wait_ms={wait}", "ms",
                baseline=base, higher_is_better=False, metric="p99")
    for wait in WAITS:
        c.table(f"barrier-{wait}", f"Idle barrier: view.barrier() with nothing new written, "
                f"fetch_max_wait_ms={wait}, median of {n_barriers} per run", "ms",
                baseline=f"bare aiokafka, one idle fetch round trip, wait={wait}",
                higher_is_better=False, metric="barrier",
                note="Baseline: the time between two consecutive fetch responses of an "
                     "up-to-date bare consumer with the same wait (what waiting for the "
                     "follower's own next fetch costs). snapbus asks the log ends with a Fetch "
                     "that waits for nothing, on its own connection (module docstring).")
    c.table("ack", "publish() until acknowledged (acks=all, linger_ms=5), p50, both waits",
            "ms", baseline="bare aiokafka", higher_is_better=False,
            note="Part of every latency above: the producer lingers linger_ms before sending.")
    c.table("cpu", f"Idle CPU of this process, {idle_s:g} s with no traffic",
            "% of one core", baseline=None, higher_is_better=False, digits=2,
            note="Ratios: compare each snapbus row with the bare row of the same wait.")
    c.table("broker-cpu", "Idle CPU of the broker process serving that follower",
            "% of one core", baseline=None, higher_is_better=False, digits=2)

    rng = random.Random(5)
    async with common.bench_broker() as broker:
        bootstrap = broker.bootstrap_servers
        for _ in range(runs):
            for wait in WAITS:
                for name in ("bare aiokafka", "snapbus"):
                    config = await common.new_topic(bootstrap, "latency")
                    try:
                        if name == "snapbus":
                            latencies, acks, waits, cpu, broker_cpu = await _snapbus(
                                config, wait, warmup_snapshots, snapshots, n_barriers, idle_s,
                                broker.pid, rng)
                        else:
                            latencies, acks, waits, cpu, broker_cpu = await _bare(
                                bootstrap, config.topic, wait, warmup_pairs, pairs, n_barriers,
                                idle_s, broker.pid, rng)
                    finally:
                        await common.delete_topic(bootstrap, config.topic)
                    assert len(latencies) == n_updates, (name, len(latencies))
                    case = f"{name}, wait={wait}"
                    c.add(f"p50-{wait}", case, 1000 * statistics.median(latencies))
                    c.add(f"p99-{wait}", case, 1000 * _p(latencies, 99))
                    c.add("ack", name, 1000 * statistics.median(acks))
                    c.add(f"barrier-{wait}", f"snapbus view.barrier(), wait={wait}"
                          if name == "snapbus" else
                          f"bare aiokafka, one idle fetch round trip, wait={wait}",
                          1000 * statistics.median(waits))
                    c.add("cpu", case, cpu)
                    if broker_cpu is not None:
                        c.add("broker-cpu", case, broker_cpu)
    results = c.results()
    # idle CPU: ratio of each snapbus row to the bare row with the same wait
    by_case = {(r["table"], r["case"]): r for r in results}
    for r in results:
        if r["table"] in ("cpu", "broker-cpu"):
            wait = r["case"].rsplit("=", 1)[1]
            base = by_case.get((r["table"], f"bare aiokafka, wait={wait}"))
            r["baseline"] = base["case"] if base else None
            r["is_baseline"] = r["case"].startswith("bare")
            if base and base["median"] and not r["is_baseline"]:
                r["ratio"] = r["median"] / base["median"]
    return results


if __name__ == "__main__":
    common.main(run, __doc__.splitlines()[0])
