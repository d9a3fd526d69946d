"""Cold rebuild: how long a new pod takes to load the whole topic into memory.

The topic is written once (pre-encoded, by a fast bare producer): 300k records over 100k
sessions (quick: 30k over 10k), 12 partitions. Then each run times, from a cold client (connect
included) until every partition reached the high watermark its fetches reported:

- ``bare aiokafka, no decode``: the baseline. assign + seek_to_beginning + getmany until each
  position >= the high watermark reported by Fetch (BROKER.md: not ListOffsets). Reads bytes
  and throws them away: the transport floor.
- ``bare aiokafka + fastavro -> dict``: the same loop, decoding every value with fastavro into a
  plain dict upsert keyed by the key string (tombstones pop). What a minimal hand-written view
  would do.
- ``snapbus SnapshotView start``: ``async with SnapshotView(config, fetch_max_wait_ms=W)``
  until it returns live (ensure_topic, key/value validation, `WorkspaceSnapshot` values,
  secondary indexes, change detection included). Checks ``len(view)`` equals the sessions
  expected. By default the view decodes lazily (each session's indexed fields now, the rest
  on first read: see ``bench_read`` for that cost); ``decode='eager'`` decodes and validates
  every session before it goes live.

The bare consumers use the same fetch settings as snapbus's reader (fetch_max_wait_ms, 4 MiB per
partition, 64 MiB per fetch), so the difference is what each does with the records.

    python benchmarks/bench_rebuild.py [--runs N] [--quick] [--profile] [--scale]

``--scale`` also runs the 1M-record / 300k-session case (its own tables).

``--profile`` runs one extra view start under cProfile and prints the top functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import time
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

FETCH_MAX_WAIT_MS = 100  # SnapshotView's default
SCALE_SESSIONS, SCALE_RECORDS = 300_000, 1_000_000
TICK_S = 0.005


class _StallMeter:
    """Measures the longest time the event loop could not run a 5 ms ticker (a blocked loop
    delays every other coroutine of the pod: health checks, request handlers)."""

    def __init__(self) -> None:
        self.max_stall = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            self.max_stall = max(self.max_stall, now - last - TICK_S)
            last = now

    async def __aenter__(self) -> _StallMeter:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _bare_read(bootstrap: str, topic: str, decode: bool) -> tuple[float, int, int]:
    """Return (seconds, records read, sessions held)."""
    import fastavro

    from snapbus.codec import HEADER_SIZE, default_codec

    parsed = default_codec().writer.parsed
    reader = fastavro.schemaless_reader
    view: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    async with common.bare_consumer(bootstrap, topic, FETCH_MAX_WAIT_MS) as consumer:
        targets: dict[Any, int] = {}
        count = 0
        while True:
            batches = await consumer.getmany(timeout_ms=FETCH_MAX_WAIT_MS)
            for records in batches.values():
                count += len(records)
                if decode:
                    for r in records:
                        if r.value is None:
                            view.pop(r.key.decode(), None)
                        else:
                            buf = io.BytesIO(r.value)
                            buf.seek(HEADER_SIZE)
                            view[r.key.decode()] = reader(buf, parsed, None)
            if await common.reached_end(consumer, targets):
                return time.perf_counter() - t0, count, len(view)


async def _view(config: Any, expected: int, decode: str = "lazy") -> float:
    """Seconds for a view to start live, holding `expected` sessions and no decode errors."""
    from snapbus.view import SnapshotView

    t0 = time.perf_counter()
    view = SnapshotView(config, fetch_max_wait_ms=FETCH_MAX_WAIT_MS, start_timeout_s=600,
                        decode=decode)  # type: ignore[arg-type]
    await view.start()
    elapsed = time.perf_counter() - t0
    try:
        if view.status != "live":
            raise RuntimeError(f"view did not go live: {view.status} {view.status_reason}")
        if len(view) != expected:
            raise RuntimeError(f"view holds {len(view)} sessions, expected {expected}")
        if view.stats.decode_errors:
            raise RuntimeError(f"view saw {view.stats.decode_errors} decode errors")
        return elapsed
    finally:
        await view.stop()


async def _profile_view(config: Any, expected: int, top: int = 25) -> str:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    await _view(config, expected)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


async def run(runs: int, quick: bool, profile: bool = False,
              scale: bool = False) -> list[dict[str, Any]]:
    sizes = [(10_000, 30_000, "")] if quick else [(100_000, 300_000, "")]
    if scale:
        sizes.append((SCALE_SESSIONS, SCALE_RECORDS, "-scale"))
    c: common.Collector | None = None
    for n_sessions, n_records, suffix in sizes:
        c = await _measure(c, runs, n_sessions, n_records, suffix, profile and not suffix)
    assert c is not None
    return c.results()


async def _measure(c: common.Collector | None, runs: int, n_sessions: int, n_records: int,
                   suffix: str, profile: bool) -> common.Collector:
    records = common.make_records(n_sessions, n_records, seed=11)
    expected = common.expected_sessions(records)
    pairs = common.encode_pairs(records)
    del records
    mib = sum(len(k) + len(v or b"") for k, v in pairs) / 2**20
    if c is None:
        params = {"records": n_records, "sessions": n_sessions,
                  "partitions": common.PARTITIONS, "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
                  "payload_mib": round(mib, 1)}
        c = common.Collector("rebuild", params)
    baseline = "bare aiokafka, no decode"
    c.table("seconds" + suffix, f"Cold rebuild, {n_records:,} records over {n_sessions:,} "
            f"sessions ({mib:.0f} MiB)", "seconds", baseline=baseline, higher_is_better=False,
            note=f"fetch_max_wait_ms={FETCH_MAX_WAIT_MS} for every case; times include "
                 "connecting. Records/s = records / seconds.")
    c.table("rate" + suffix, f"Cold rebuild rate, {n_records:,} records", "records/s",
            baseline=baseline, higher_is_better=True)
    c.table("stall" + suffix, f"Longest event-loop stall during the rebuild, {n_records:,} "
            "records", "ms", baseline=baseline,
            higher_is_better=False,
            note="How long a 5 ms ticker task in the same loop was kept from running at worst. "
                 "The bare loops use aiokafka's default max_records (everything prefetched); "
                 "snapbus's reader takes at most 20,000 records per read.")
    async with common.bench_broker() as broker:
        bootstrap = broker.bootstrap_servers
        config = await common.new_topic(bootstrap, "rebuild")
        produce_s = await common.bulk_produce(bootstrap, config.topic, pairs)
        print(f"(wrote {len(pairs):,} records in {produce_s:.1f} s, "
              f"{len(pairs) / produce_s:,.0f} records/s)", file=sys.stderr)
        del pairs

        async def raw() -> float:
            seconds, count, _ = await _bare_read(bootstrap, config.topic, decode=False)
            if count < n_records:  # Tansu never compacts; Kafka could have, so only warn
                print(f"(bare read saw {count} records of {n_records})", file=sys.stderr)
            return seconds

        async def decoded() -> float:
            seconds, _, sessions = await _bare_read(bootstrap, config.topic, decode=True)
            if sessions != expected:
                raise RuntimeError(f"bare decode holds {sessions} sessions, expected {expected}")
            return seconds

        def view(decode: str) -> Any:
            async def case() -> float:
                return await _view(config, expected, decode)
            return case

        cases = [(baseline, raw), ("bare aiokafka + fastavro -> dict", decoded),
                 (f"snapbus SnapshotView start (len == {expected:,} checked)", view("lazy")),
                 ("snapbus SnapshotView start, decode='eager'", view("eager"))]
        await raw()  # untimed warm-up: the broker's first full read of the topic
        for _ in range(runs):
            for name, case in cases:
                async with _StallMeter() as meter:
                    seconds = await case()
                c.add("seconds" + suffix, name, seconds)
                c.add("rate" + suffix, name, n_records / seconds)
                c.add("stall" + suffix, name, 1000 * meter.max_stall)
        if profile:
            print(await _profile_view(config, expected), file=sys.stderr)
        await common.delete_topic(bootstrap, config.topic)
    return c


if __name__ == "__main__":
    common.main(run, __doc__.splitlines()[0] if __doc__ else "",
                flags={"--profile": "also profile one view start (cProfile)",
                       "--scale": f"also {SCALE_RECORDS:,} records over {SCALE_SESSIONS:,} "
                                  "sessions"})
