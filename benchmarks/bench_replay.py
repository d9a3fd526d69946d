"""Replay and export throughput: reading the log back as events, beside a bare read.

The topic is written once (pre-encoded): 300k records over 100k sessions (quick: 30k over
10k). Each run reads it all, from a cold client until the end of the log as it was when the
read began:

- ``bare aiokafka, no decode``: the baseline (the transport floor), the same loop as
  ``bench_rebuild``.
- ``snapbus replay()``: every record decoded into an `Event` (key, snapshot or tombstone,
  partition, offset, timestamp), counted.
- ``snapbus replay() -> JSON Lines``: the same events written as JSON Lines to an in-memory
  buffer (what ``snapbus replay > file`` does, minus the disk).
- ``snapbus rebuild(as_of=now)``: the state at an instant (every record decoded, last wins).

    python benchmarks/bench_replay.py [--runs N] [--quick]
"""

from __future__ import annotations

import io
import sys
import time
from typing import Any

try:
    from benchmarks import common
    from benchmarks.bench_rebuild import _bare_read
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]
    from bench_rebuild import _bare_read  # type: ignore[no-redef]


async def run(runs: int, quick: bool) -> list[dict[str, Any]]:
    from snapbus.replay import rebuild, replay, write_jsonl

    n_sessions, n_records = (10_000, 30_000) if quick else (100_000, 300_000)
    records = common.make_records(n_sessions, n_records, seed=13)
    expected = common.expected_sessions(records)
    pairs = common.encode_pairs(records)
    del records
    params = {"records": n_records, "sessions": n_sessions, "partitions": common.PARTITIONS}
    c = common.Collector("replay", params)
    baseline = "bare aiokafka, no decode"
    c.table("rate", f"Replay / export throughput, {n_records:,} records over "
            f"{n_sessions:,} sessions", "events/s", baseline=baseline, higher_is_better=True,
            note="Whole topic from a cold client, connect included; fetch_max_wait_ms=100.")
    async with common.bench_broker() as broker:
        bootstrap = broker.bootstrap_servers
        config = await common.new_topic(bootstrap, "replay")
        await common.bulk_produce(bootstrap, config.topic, pairs)
        del pairs

        async def bare() -> int:
            _, count, _ = await _bare_read(bootstrap, config.topic, decode=False)
            return count

        async def events() -> int:
            count = 0
            async for _ in replay(config, use_history=False):
                count += 1
            return count

        async def jsonl() -> int:
            return await write_jsonl(replay(config, use_history=False), io.StringIO())

        async def state() -> int:
            sessions = await rebuild(config, use_history=False)
            if len(sessions) != expected:
                raise RuntimeError(f"rebuild holds {len(sessions)} sessions, not {expected}")
            return n_records

        cases = [(baseline, bare), ("snapbus replay() -> events", events),
                 ("snapbus replay() -> JSON Lines", jsonl),
                 ("snapbus rebuild(as_of=now) -> dict", state)]
        await bare()  # untimed warm-up
        for _ in range(runs):
            for name, case in cases:
                t0 = time.perf_counter()
                count = await case()
                seconds = time.perf_counter() - t0
                if count != n_records:
                    print(f"({name} read {count} of {n_records} records)", file=sys.stderr)
                c.add("rate", name, n_records / seconds)
        await common.delete_topic(bootstrap, config.topic)
    return c.results()


if __name__ == "__main__":
    common.main(run, __doc__ or "")
    sys.exit(0)
