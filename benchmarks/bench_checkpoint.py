"""Restart from a checkpoint against a full replay of the topic.

The topic holds one record per session plus one update per third of them: 100k sessions
(quick: 10k; ``--scale``: 1M). A view replays it once and saves a checkpoint. Each run then
times, from a cold client until the view is live with every session present and indexed:

- ``full replay``: ``SnapshotView(config)`` (the baseline);
- ``from checkpoint``: ``SnapshotView(config, checkpoint_path=...)``: load the file, read the
  (empty) tail.

Each is timed twice: in a fresh Python process, as a restarted pod starts (the first table),
and in the benchmark's own process.

Also reported: the checkpoint's size and the time to save it.

    python benchmarks/bench_checkpoint.py [--runs N] [--quick] [--scale]
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

FETCH_MAX_WAIT_MS = 100
SCALE_SESSIONS = 1_000_000


async def _start(config: Any, checkpoint: Path | None, expected: int) -> float:
    from snapbus.view import SnapshotView

    t0 = time.perf_counter()
    view = SnapshotView(config, fetch_max_wait_ms=FETCH_MAX_WAIT_MS, start_timeout_s=900,
                        checkpoint_path=checkpoint)
    await view.start()
    elapsed = time.perf_counter() - t0
    try:
        if view.status != "live" or len(view) != expected:
            raise RuntimeError(f"view {view.status} with {len(view)} sessions, not {expected}")
        if checkpoint is not None and view.stats.checkpoint_sessions != expected:
            raise RuntimeError("the checkpoint was not used")
        return elapsed
    finally:
        view._checkpoint_path = None  # time the start only: do not save again on stop
        await view.stop()


_CHILD = """
import asyncio, json, sys, time
from snapbus import KafkaConfig, SnapshotView

async def main(bootstrap, topic, path, wait_ms):
    t0 = time.perf_counter()
    view = SnapshotView(KafkaConfig(bootstrap, topic), fetch_max_wait_ms=wait_ms,
                        start_timeout_s=900, checkpoint_path=path or None)
    await view.start()
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "status": view.status, "sessions": len(view),
                      "from_checkpoint": view.stats.checkpoint_sessions}))
    view._checkpoint_path = None  # time the start only: do not save again on stop
    await view.stop()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


async def _start_process(config: Any, checkpoint: Path | None, expected: int) -> float:
    """`_start` in a fresh Python process, as a restarted pod is (timed inside it, from
    creating the view: interpreter start and imports excluded)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, config.bootstrap_servers, config.topic,
        str(checkpoint or ""), str(FETCH_MAX_WAIT_MS), stdout=asyncio.subprocess.PIPE)
    out, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the child failed with exit code {child.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    if result["status"] != "live" or result["sessions"] != expected:
        raise RuntimeError(f"child view: {result}")
    if checkpoint is not None and result["from_checkpoint"] != expected:
        raise RuntimeError("the checkpoint was not used")
    return float(result["seconds"])


async def run(runs: int, quick: bool, scale: bool = False) -> list[dict[str, Any]]:
    from snapbus.view import SnapshotView

    n_sessions = SCALE_SESSIONS if scale else (10_000 if quick else 100_000)
    n_records = n_sessions + n_sessions // 3
    records = common.make_records(n_sessions, n_records, seed=17)
    expected = common.expected_sessions(records)
    pairs = common.encode_pairs(records)
    del records
    params = {"records": n_records, "sessions": n_sessions, "partitions": common.PARTITIONS,
              "fetch_max_wait_ms": FETCH_MAX_WAIT_MS}
    c = common.Collector("checkpoint", params)
    baseline = "full replay"
    c.table("process", f"Start with {n_sessions:,} sessions ({n_records:,} records), each in "
            "a fresh process", "seconds", baseline=baseline, higher_is_better=False,
            note="A restarted pod: each start runs in a new Python process, timed from creating "
                 "the view until live with every session indexed (imports excluded).")
    c.table("seconds", f"Start with {n_sessions:,} sessions ({n_records:,} records), in this "
            "process", "seconds", baseline=baseline, higher_is_better=False,
            note="The same starts in the benchmark's own process, whose heap already held the "
                 "topic's records and earlier views (allocation is slower there).")
    c.table("save", "Saving the checkpoint", "seconds", baseline=None, higher_is_better=False)
    async with common.bench_broker() as broker:
        config = await common.new_topic(broker.bootstrap_servers, "checkpoint")
        await common.bulk_produce(broker.bootstrap_servers, config.topic, pairs)
        del pairs
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "view.ckpt"
            async with SnapshotView(config, fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                                    start_timeout_s=900) as view:
                for _ in range(runs):
                    t0 = time.perf_counter()
                    size = await view.save_checkpoint(path)
                    c.add("save", f"save_checkpoint ({size / 2**20:.1f} MiB file)",
                          time.perf_counter() - t0)
            for _ in range(runs):
                c.add("process", baseline, await _start_process(config, None, expected))
                c.add("process", "from checkpoint",
                      await _start_process(config, path, expected))
                c.add("seconds", baseline, await _start(config, None, expected))
                c.add("seconds", "from checkpoint", await _start(config, path, expected))
        await common.delete_topic(broker.bootstrap_servers, config.topic)
    return c.results()


if __name__ == "__main__":
    common.main(run, __doc__.splitlines()[0] if __doc__ else "",
                flags={"--scale": "1M sessions instead of 100k"})
