"""Millions of sessions in one pod: memory per session, full cold start, checkpoint start.

One topic of N sessions, one record each (default benchmark values, 12 partitions), is written
once, untimed for the results, by `--producers` worker processes (default: one per CPU), each
generating and encoding its chunks of 200k records and writing them with librdkafka
(confluent-kafka: ~1 us a record, where aiokafka's Python producer spent ~15-30 us and made a
10M write take tens of minutes on a loaded host) with Kafka's murmur2 partitioner, as snapbus
writes (a view ignores records on another partition); 1 MB batches, linger 50 ms, no
compression, acks=1. Without confluent-kafka it falls back to one aiokafka producer. Then
each measurement runs in a fresh Python process, as a pod starts, in this order: bare read,
view start, bare read, view start (the view's runs save a checkpoint and report memory),
checkpoint start, checkpoint start (each run records the 1-minute load average around it):

- ``bare``: a group-less aiokafka consumer with snapbus's reader fetch settings reads every
  partition to the high watermark its fetches report, keeping nothing: the baseline.
- ``view``: ``SnapshotView`` start until live holding N sessions; the process's RSS growth
  and Python's allocated blocks (``sys.getallocatedblocks``, cheap where tracemalloc at this
  size is not) per session; then `save_checkpoint`.
- ``checkpoint``: ``SnapshotView(config, checkpoint_path=...)`` start until live.

``--profile`` also runs one view start under cProfile (top functions by own time), and
``--traced`` one with tracemalloc (top allocation sites once live), in their own processes.

    python benchmarks/scale_sessions.py --sessions 10000000 [--engine kafka|tansu] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import common  # noqa: E402

FETCH_MAX_WAIT_MS = 100
CHUNK = 200_000


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _produce_chunks(bootstrap: str, topic: str, chunks: list[tuple[int, int, int]]) -> int:
    """Worker process: generate, encode and write `chunks` (index, start, n) with librdkafka;
    return the records delivered (raises on any delivery error)."""
    from confluent_kafka import Producer

    errors: list[str] = []
    delivered = 0

    def on_delivery(err: Any, _msg: Any) -> None:
        nonlocal delivered
        if err is not None:
            errors.append(str(err))
        else:
            delivered += 1

    producer = Producer({
        "bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": 1,
        "linger.ms": 50, "batch.size": 1_000_000, "compression.type": "none",
        "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1_048_576,
        "enable.idempotence": False,
    })
    for i, _start, n in chunks:
        pairs = common.encode_pairs(common.make_records(n, n, seed=1000 + i))
        for key, value in pairs:
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        del pairs
        if errors:
            break
    producer.flush(600)
    if errors:
        raise RuntimeError(f"{len(errors)} delivery errors, first: {errors[0]}")
    return delivered


async def _produce(bootstrap: str, topic: str, sessions: int, producers: int) -> float:
    chunks = [(i, start, min(CHUNK, sessions - start))
              for i, start in enumerate(range(0, sessions, CHUNK))]
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return await _produce_aiokafka(bootstrap, topic, chunks)
    import concurrent.futures
    import multiprocessing

    t0 = time.perf_counter()
    workers = max(1, min(producers, len(chunks)))
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(pool, _produce_chunks, bootstrap, topic, chunks[w::workers])
                   for w in range(workers)]
        written = sum(await asyncio.gather(*futures))
    if written != sessions:
        raise RuntimeError(f"wrote {written:,} records, expected {sessions:,}")
    return time.perf_counter() - t0


async def _produce_aiokafka(bootstrap: str, topic: str,
                            chunks: list[tuple[int, int, int]]) -> float:
    total = 0.0
    for i, start, n in chunks:
        pairs = common.encode_pairs(common.make_records(n, n, seed=1000 + i))
        total += await common.bulk_produce(bootstrap, topic, pairs, linger_ms=50,
                                           max_batch_size=1024 * 1024, window=50_000)
        if i % 10 == 0:
            print(f"(produced {start + n:,} in {total:.0f} s)", file=sys.stderr)
    return total


async def _child(mode: str, bootstrap: str, topic: str, expected: int, path: str) -> dict[str, Any]:
    import gc

    from snapbus.config import KafkaConfig
    from snapbus.view import SnapshotView

    out: dict[str, Any] = {"mode": mode}
    if mode == "bare":
        count = 0
        t0 = time.perf_counter()
        async with common.bare_consumer(bootstrap, topic, FETCH_MAX_WAIT_MS) as consumer:
            targets: dict[Any, int] = {}
            while True:
                batches = await consumer.getmany(timeout_ms=FETCH_MAX_WAIT_MS)
                count += sum(len(b) for b in batches.values())
                if await common.reached_end(consumer, targets):
                    break
        out.update(seconds=time.perf_counter() - t0, records=count)
        return out
    config = KafkaConfig(bootstrap_servers=bootstrap, topic=topic)
    gc.collect()
    rss0, blocks0 = _rss(), sys.getallocatedblocks()
    traced = mode == "traced"
    if traced:
        import tracemalloc
        tracemalloc.start()
    profiler = None
    if mode == "profile":
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    view = SnapshotView(config, fetch_max_wait_ms=FETCH_MAX_WAIT_MS, start_timeout_s=3600,
                        checkpoint_path=path if mode == "checkpoint" else None)
    await view.start()
    seconds = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        import io
        import pstats
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        out["profile"] = buf.getvalue()
    if view.status != "live" or len(view) != expected:
        raise RuntimeError(f"view {view.status} with {len(view)} sessions, expected {expected}")
    gc.collect()
    out.update(seconds=seconds, sessions=len(view),
               rss_per_session=(_rss() - rss0) / expected,
               blocks_per_session=(sys.getallocatedblocks() - blocks0) / expected,
               peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if traced:
        import tracemalloc
        snap = tracemalloc.take_snapshot()
        out["traced_per_session"] = tracemalloc.get_traced_memory()[0] / expected
        out["top"] = [f"{s.size / expected:7.1f} B/session  {s.count / expected:5.2f} "
                      f"blocks/session  {s.traceback[0].filename.split('site-packages/')[-1]}"
                      f":{s.traceback[0].lineno}"
                      for s in snap.statistics("lineno")[:15]]
        tracemalloc.stop()
    if mode == "view":
        t1 = time.perf_counter()
        await view.save_checkpoint(path)
        out["checkpoint_save_s"] = time.perf_counter() - t1
        out["checkpoint_bytes"] = Path(path).stat().st_size  # noqa: ASYNC240
    await view.stop()
    return out


def _run_child(mode: str, bootstrap: str, topic: str, expected: int, path: str) -> dict[str, Any]:
    env = dict(os.environ)
    load_before = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--bootstrap", bootstrap, "--topic", topic,
         "--expected", str(expected), "--checkpoint", path],
        capture_output=True, text=True, env=env, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps({k: v for k, v in result.items() if k not in ("profile", "top")}),
          file=sys.stderr)
    return result


async def _main(args: argparse.Namespace) -> None:
    from snapbus.broker import EmbeddedBroker

    results: list[dict[str, Any]] = []
    data_dir = args.data_dir if args.engine == "kafka" else None
    async with EmbeddedBroker(engine=args.engine, data_dir=data_dir) as broker:  # type: ignore[arg-type]
        bootstrap = broker.bootstrap_servers
        config = await common.new_topic(bootstrap, "scale")
        produce_s = await _produce(bootstrap, config.topic, args.sessions, args.producers)
        print(f"(wrote {args.sessions:,} records in {produce_s:.0f} s)", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            path = os.path.join(tmp, "view.ckpt")
            order = ["bare", "view", "bare", "view", "checkpoint", "checkpoint"]
            if args.profile:
                order.append("profile")
            if args.traced:
                order.append("traced")
            for mode in order:
                r = await asyncio.to_thread(_run_child, mode, bootstrap, config.topic,
                                            args.sessions, path)
                results.append(r)
    summary = {"sessions": args.sessions, "engine": args.engine, "produce_s": produce_s,
               "environment": common.environment(), "runs": results}
    print(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--sessions", type=int, default=10_000_000)
    parser.add_argument("--engine", choices=common.ENGINES, default="kafka")
    parser.add_argument("--producers", type=int, default=os.cpu_count() or 1,
                        help="writer processes (default: one per CPU)")
    parser.add_argument("--data-dir", default=None, help="Kafka's log directory")
    parser.add_argument("--tmp", default=None, help="where the checkpoint file goes")
    parser.add_argument("--profile", action="store_true", help="one view start under cProfile")
    parser.add_argument("--traced", action="store_true",
                        help="one view start under tracemalloc (slow, GBs at 10M)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--topic", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.child, args.bootstrap, args.topic,
                                            args.expected, args.checkpoint))))
        return
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
