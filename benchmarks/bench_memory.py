"""Memory per session: what a pod holds for a view of the whole topic, beside plain dicts.

A topic of 200k records over 100k sessions (quick: 20k over 10k), 12 partitions, is written
once (pre-encoded). Each run then reads all of it from a cold client, once per case, with
`tracemalloc` tracing from just before the client is created; after the client is stopped and
a full garbage collection, the memory still allocated minus the memory allocated before,
divided by the sessions held, is the retained size per session (every Python object the
result keeps: dict tables, keys, values, index sets, interned labels, plus the per-process
fixed cost of the object, negligible per session at these sizes):

- ``dict[str, bytes]``: the baseline, a bare aiokafka read keeping each session's latest raw
  value (the framed Avro bytes as fetched) under its key string. The smallest useful form.
- ``dict[str, dict]``: the same read decoding each value with bare fastavro
  (``schemaless_reader`` of the body after the 10-byte header) into a plain dict, as a minimal
  hand-written view would.
- ``snapbus SnapshotView (as started)``: ``await view.start()`` until live, then ``stop()``: the
  view as a fresh pod holds it (``decode="lazy"``: each session's value kept as read, decoded
  on first read) plus the exact ``by_repo`` / ``by_agent`` / ``by_state`` indexes.
- ``snapbus SnapshotView, every session read once``: the same, after ``view.snapshots()``
  decoded every session into a `WorkspaceSnapshot` (what ``decode="eager"`` holds too).
- ``of which: the three indexes``: copies of the view's three ``dict[str, set[str]]`` indexes
  (sharing its key strings), traced alone: the share of the view that the secondary indexes
  cost.

The same cases then run over values sized as the issue's reference ("raw Avro bytes in a dict
take ~500 B per session"): intents of 4 to 30 words instead of 8 to 60, values of about 335
bytes instead of 460. What a view adds to the raw form is about the same at both sizes; the
absolute figure moves with the values.

At most 3 passes are made whatever ``--runs`` says: the sizes repeat to within a few bytes
(the first pass of the view carries some one-time allocations). The second table is the peak
traced memory during each build (per session): replay buffers, fetched batches and decoding
garbage included.

tracemalloc sees what Python's allocators hand out; the process's RSS is higher (allocator
arenas, fragmentation, the interpreter and libraries). ``--scale`` also runs one pass at 1M
sessions (1M records; several minutes, not part of the default run).

    python benchmarks/bench_memory.py [--runs N] [--quick] [--scale]
"""

from __future__ import annotations

import gc
import io
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

FETCH_MAX_WAIT_MS = 100
BASELINE = "dict[str, bytes]: raw Avro value per session"
VIEW = "snapbus SnapshotView (as started: values kept encoded, 3 indexes)"
SCALE_SESSIONS = 1_000_000
MAX_PASSES = 3  # the sizes are deterministic to a few bytes; a traced pass is slow
REFERENCE_INTENT_WORDS = (4, 30)
"""Intent lengths giving raw values of the issue's reference size (~500 B per session held)."""


async def _bare_build(bootstrap: str, topic: str, decode: bool) -> dict[str, Any]:
    """Read the whole topic with a bare consumer; keep each key's latest value (or dict)."""
    import fastavro

    from snapbus.codec import HEADER_SIZE, default_codec

    parsed = default_codec().writer.parsed
    reader = fastavro.schemaless_reader
    held: dict[str, Any] = {}
    async with common.bare_consumer(bootstrap, topic, FETCH_MAX_WAIT_MS) as consumer:
        targets: dict[Any, int] = {}
        while True:
            batches = await consumer.getmany(timeout_ms=FETCH_MAX_WAIT_MS)
            for records in batches.values():
                for r in records:
                    key = r.key.decode()
                    if r.value is None:
                        held.pop(key, None)
                    elif decode:
                        buf = io.BytesIO(r.value)
                        buf.seek(HEADER_SIZE)
                        held[key] = reader(buf, parsed, None)
                    else:
                        held[key] = r.value
            if await common.reached_end(consumer, targets):
                return held


async def _view_build(config: Any) -> Any:
    from snapbus.view import SnapshotView

    view = SnapshotView(config, fetch_max_wait_ms=FETCH_MAX_WAIT_MS, start_timeout_s=3600)
    await view.start()
    try:
        if view.status != "live":
            raise RuntimeError(f"view did not go live: {view.status} {view.status_reason}")
    finally:
        await view.stop()
    return view


def _indexes(view: Any) -> tuple[dict[str, Any], ...]:
    """Copies of the view's three indexes: new dicts, tuples and sets of the view's strings
    (built from its internals: the view decodes lazily, and reading snapshots would decode
    them)."""
    return tuple({value: type(members)(list(members)) for value, members in index.items()}
                 for index in view._store.indexes())


async def _traced(build: Callable[[], Awaitable[Any]]) -> tuple[Any, int, int, float]:
    """Run `build` under tracemalloc; return (result, retained bytes, peak bytes, seconds)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        result = await build()
        seconds = time.perf_counter() - t0
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, after - before, peak - before, seconds


async def _measure(c: common.Collector, bootstrap: str, config: Any, expected: int,
                   runs: int, suffix: str = "") -> None:
    """`runs` interleaved passes of every case, added to `c`'s tables named with `suffix`."""

    async def raw() -> dict[str, Any]:
        return await _bare_build(bootstrap, config.topic, decode=False)

    async def decoded() -> dict[str, Any]:
        return await _bare_build(bootstrap, config.topic, decode=True)

    async def view() -> Any:
        return await _view_build(config)

    async def view_read() -> Any:
        built = await _view_build(config)
        built.snapshots()  # reads (decodes) every session
        return built

    cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        (BASELINE, raw), ("dict[str, dict]: fastavro-decoded dict per session", decoded),
        (VIEW, view), ("snapbus SnapshotView, every session read once (decoded)", view_read)]
    for _ in range(runs):
        for name, build in cases:
            held, retained, peak, seconds = await _traced(build)
            if len(held) != expected:
                raise RuntimeError(f"{name}: {len(held)} sessions, expected {expected}")
            c.add("retained" + suffix, name, retained / expected)
            c.add("peak" + suffix, name, peak / expected)
            print(f"({name}, {expected:,} sessions: {retained / expected:,.0f} B/session retained, "
                  f"{peak / expected:,.0f} peak, {seconds:.1f} s traced)", file=sys.stderr)
            if name == VIEW:

                async def indexes(view: Any = held) -> Any:
                    return _indexes(view)

                _, idx_retained, _, _ = await _traced(indexes)
                c.add("retained" + suffix, "of which: the three indexes (rebuilt by hand)",
                      idx_retained / expected)
            del held


async def run(runs: int, quick: bool, scale: bool = False) -> list[dict[str, Any]]:
    n_sessions, n_records = (10_000, 20_000) if quick else (100_000, 200_000)
    params: dict[str, Any] = {"sessions": n_sessions, "records": n_records,
                              "partitions": common.PARTITIONS}
    if scale:
        params["scale_sessions"] = SCALE_SESSIONS
    params["reference_intent_words"] = list(REFERENCE_INTENT_WORDS)
    c = common.Collector("memory", params)
    passes = min(runs, MAX_PASSES)
    default_words = common.DEFAULT_INTENT_WORDS
    sizes = [(n_sessions, n_records, passes, "", default_words)]
    if scale:
        sizes.append((SCALE_SESSIONS, SCALE_SESSIONS, 1, "-scale", default_words))
    sizes.append((n_sessions, n_records, passes, "-ref", REFERENCE_INTENT_WORDS))
    if scale:
        sizes.append((SCALE_SESSIONS, SCALE_SESSIONS, 1, "-ref-scale", REFERENCE_INTENT_WORDS))
    for sessions, n, _, suffix, words in sizes:
        sized = ("" if words == default_words else
                 f", values of the issue's reference size (intents of {words[0]}-{words[1]} words)")
        c.table("retained" + suffix, f"Retained memory per session, {sessions:,} sessions "
                f"({n:,} records read){sized}", "bytes/session", baseline=BASELINE,
                higher_is_better=False,
                note="tracemalloc: allocated after the build (client stopped, gc run) minus "
                     "before, divided by sessions. Python allocations only; RSS is higher.")
        c.table("peak" + suffix, f"Peak traced memory during the build, per session, "
                f"{sessions:,} sessions{sized}", "bytes/session", baseline=BASELINE,
                higher_is_better=False,
                note="Highest tracemalloc total during the read minus the total before it.")
    async with common.bench_broker() as broker:
        bootstrap = broker.bootstrap_servers
        for sessions, n, passes, suffix, words in sizes:
            records = common.make_records(sessions, n, seed=19, intent_words=words)
            expected = common.expected_sessions(records)
            pairs = common.encode_pairs(records)
            del records
            config = await common.new_topic(bootstrap, "memory")
            produce_s = await common.bulk_produce(bootstrap, config.topic, pairs)
            print(f"(wrote {len(pairs):,} records in {produce_s:.1f} s)", file=sys.stderr)
            del pairs
            try:
                await _measure(c, bootstrap, config, expected, passes, suffix)
            finally:
                await common.delete_topic(bootstrap, config.topic)
    return c.results()


if __name__ == "__main__":
    common.main(run, __doc__.splitlines()[0] if __doc__ else "",
                flags={"--scale": "also one pass at 1M sessions (minutes, GBs)"})
