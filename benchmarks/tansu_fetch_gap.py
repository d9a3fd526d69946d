"""Bare aiokafka: does a tailing consumer skip records that the log holds? (snapbus issue 21)

    python benchmarks/tansu_fetch_gap.py [--engine tansu|kafka] [--seconds 20]

Three producers (separate clients) write single-record batches to ONE partition as fast as
acknowledgements allow; three consumers tail it from the start with a short fetch wait.
Afterwards a fresh consumer reads the whole partition. Without compaction or transactions a
partition's offsets are contiguous, so a tailing consumer that receives offset N+k right after
N (k > 1) skipped records. For each skip the script prints whether the fresh reader has the
skipped offsets (then the broker served a fetch that jumped over records it had acknowledged
but not yet made readable: the consumer's position moved past them for good).

No snapbus code is involved: only aiokafka and the embedded broker.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import pathlib
import sys
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

if __package__ in (None, ""):  # run as a script: the worktree's snapbus, not an installed one
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from snapbus.broker import EmbeddedBroker


async def _produce(bs: str, topic: str, name: str, stop: float, acked: dict[int, bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bs, acks="all", linger_ms=0)
    await producer.start()
    try:
        n = 0
        while time.monotonic() < stop:
            value = f"{name}-{n}".encode()
            md = await (await producer.send(topic, value, key=name.encode(), partition=0))
            acked[md.offset] = value
            n += 1
    finally:
        await producer.stop()


async def _tail(bs: str, topic: str, stop: asyncio.Event, seen: list[int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bs, group_id=None, fetch_max_wait_ms=20,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=50)
            seen.extend(r.offset for r in batch.get(tp, []))
    finally:
        await consumer.stop()


async def _read_all(bs: str, topic: str, end: int) -> dict[int, bytes | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bs, group_id=None, fetch_max_wait_ms=20,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    got: dict[int, bytes | None] = {}
    deadline = time.monotonic() + 30
    try:
        while await consumer.position(tp) < end and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got.update((r.offset, r.value) for r in batch.get(tp, []))
    finally:
        await consumer.stop()
    return got


async def main(engine: str, seconds: float, rounds: int) -> int:
    total_skips = 0
    async with EmbeddedBroker(engine=engine) as broker:  # type: ignore[arg-type]
        bs = broker.bootstrap_servers
        admin = AIOKafkaAdminClient(bootstrap_servers=bs)
        await admin.start()
        for rnd in range(rounds):
            topic = f"gap-{uuid.uuid4().hex[:8]}"
            await admin.create_topics([NewTopic(topic, 1, 1)])
            first = AIOKafkaProducer(bootstrap_servers=bs, acks="all")
            await first.start()
            await (await first.send(topic, b"first", key=b"first", partition=0))  # alone
            await first.stop()
            acked: dict[int, bytes] = {0: b"first"}
            stop_tail = asyncio.Event()
            seen: list[list[int]] = [[], [], []]
            tails = [asyncio.create_task(_tail(bs, topic, stop_tail, s)) for s in seen]
            stop = time.monotonic() + seconds
            await asyncio.gather(*(_produce(bs, topic, f"p{i}", stop, acked) for i in range(3)))
            end = max(acked) + 1
            await asyncio.sleep(1.0)  # let the tails catch up (diagnostic script, not a test)
            stop_tail.set()
            await asyncio.gather(*tails)
            log = await _read_all(bs, topic, end)
            lost = sorted(o for o, v in acked.items() if log.get(o) != v)
            skips = 0
            for i, offsets in enumerate(seen):
                for prev, nxt in itertools.pairwise(offsets):
                    if nxt != prev + 1:
                        skips += 1
                        held = [o for o in range(prev + 1, nxt) if o in log]
                        print(f"round {rnd} tail {i}: offset {prev} then {nxt}: skipped "
                              f"{nxt - prev - 1}, the log holds {len(held)} of them "
                              f"({held[:5]}), acked: {[o in acked for o in held[:5]]}")
                missed = sorted(set(log) - set(offsets))
                if missed and not skips:
                    print(f"round {rnd} tail {i}: missed {missed[:10]} (no jump seen)")
            total_skips += skips
            print(f"{engine} round {rnd}: {len(acked)} acked records, log holds {len(log)}, "
                  f"acked but not in the log: {lost[:10]}, tail skips: {skips}, tails read "
                  f"{[len(s) for s in seen]}", flush=True)
        await admin.close()
    return 1 if total_skips else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("tansu", "kafka"), default="tansu")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.engine, args.seconds, args.rounds)))
