"""A/B of a view's cold start between two snapbus trees (docs/gc.md: the GC change).

Each tree is a folder holding ``snapbus/`` and ``schemas/`` (``git archive COMMIT snapbus
schemas | tar -x -C DIR``). The topic (N sessions, N + N/3 records, 12 partitions) is written
once and a checkpoint of it saved; then every round starts a view in a fresh Python process
(as a restarted pod) for each tree and each way of starting (a full replay with
``decode="lazy"``, one with ``decode="eager"``, a start from the checkpoint), in a new random
order each round. Reported per case: medians of wall and CPU seconds (the machine may be
shared: CPU time is the steadier figure), the collections the start triggered, and the CPU
time spent in them (``gc.callbacks``). The engine is ``SNAPBUS_BENCH_ENGINE``'s.

    python benchmarks/gc_ab.py SESSIONS ROUNDS NAME=DIR NAME=DIR
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

CHILD = r"""
import asyncio, gc, json, sys, time
from snapbus import KafkaConfig, SnapshotView
gc_cpu = [0.0, 0.0]
def timed(phase, info):
    if phase == "start":
        gc_cpu[1] = time.thread_time()
    else:
        gc_cpu[0] += time.thread_time() - gc_cpu[1]
gc.callbacks.append(timed)
async def main(bootstrap, topic, path, decode):
    gc_cpu[0] = 0.0
    before = [s["collections"] for s in gc.get_stats()]
    t0, c0 = time.perf_counter(), time.process_time()
    view = SnapshotView(KafkaConfig(bootstrap, topic), fetch_max_wait_ms=100,
                        start_timeout_s=900, checkpoint_path=path or None, decode=decode)
    await view.start()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = [s["collections"] for s in gc.get_stats()]
    print(json.dumps({"wall": wall, "cpu": cpu, "gc_cpu": gc_cpu[0], "status": view.status,
                      "sessions": len(view), "collections": [a - b for a, b in zip(after, before)],
                      "enabled": gc.isenabled()}))
    view._checkpoint_path = None
    await view.stop()
asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]))
"""
MODES = ("replay, lazy", "replay, eager", "from checkpoint")


async def _child(tree: str, bootstrap: str, topic: str, path: Path | None,
                 decode: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=tree)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, bootstrap, topic, str(path or ""), decode,
        stdout=asyncio.subprocess.PIPE, env=env, cwd=tempfile.gettempdir())
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the child of {tree} failed")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def main(n: int, rounds: int, trees: dict[str, str]) -> None:
    from snapbus.view import SnapshotView

    records = common.make_records(n, n + n // 3, seed=17)
    expected = common.expected_sessions(records)
    pairs = common.encode_pairs(records)
    del records
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    async with common.bench_broker() as broker:
        config = await common.new_topic(broker.bootstrap_servers, "gcab")
        await common.bulk_produce(broker.bootstrap_servers, config.topic, pairs)
        del pairs
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "view.ckpt"
            async with SnapshotView(config, fetch_max_wait_ms=100, start_timeout_s=900) as view:
                await view.save_checkpoint(path)
            cases = [(name, mode) for name in trees for mode in MODES]
            for r in range(rounds):
                random.shuffle(cases)
                for name, mode in cases:
                    result = await _child(
                        trees[name], broker.bootstrap_servers, config.topic,
                        path if mode == "from checkpoint" else None,
                        "eager" if mode == "replay, eager" else "lazy")
                    if result["status"] != "live" or result["sessions"] != expected:
                        raise RuntimeError(f"{name}, {mode}: {result}")
                    results.setdefault((mode, name), []).append(result)
                print(f"round {r + 1} of {rounds} done", file=sys.stderr, flush=True)
        await common.delete_topic(broker.bootstrap_servers, config.topic)
    print(f"{broker.description}; {n:,} sessions, {n + n // 3:,} records; {rounds} rounds; "
          f"{common.environment()}")
    print("| start | tree | wall s | CPU s | collections (gen 0, 1, 2) | GC CPU s |")
    print("|---|---|---|---|---|---|")
    for (mode, name), rs in sorted(results.items()):
        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(x[key] for x in rs)

        print(f"| {mode} | {name} | {med('wall'):.3f} | {med('cpu'):.3f} | "
              f"{rs[-1]['collections']} | {med('gc_cpu'):.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]),
                     dict(arg.split("=", 1) for arg in sys.argv[3:])))
