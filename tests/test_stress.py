"""Stress: 3 publishers and 3 views through a fault proxy injecting seeded random faults.

For about 20 s, three publishers write to the same 150 sessions (concurrently, so a session's
winner is decided by offsets) while three views follow the topic, and the proxy cuts
connections, causes short outages, black holes (stalls) and latency spikes at random (seeded:
``STRESS_SEED`` in the environment replays another schedule). Then the faults stop, the
publishers flush and stop, each view passes a barrier, and each must equal the model of
acknowledged writes: for each session the acked record with the highest offset wins; a publish
that raised may or may not be stored, so its value is also accepted for its session (it can
even land after a newer acknowledged write of another publisher). Lost writes must be 0.

A report is printed (``pytest -s``): operations, faults injected, acked and failed writes, lost
writes, and the largest staleness any view reported.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from snapbus.config import KafkaConfig
from snapbus.errors import PublishError
from snapbus.publisher import SnapshotPublisher
from snapbus.view import SnapshotView
from tests.faultproxy import WriteModel, eventually, make_snapshot, proxied_broker

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_aiokafka")]

SEED = int(os.environ.get("STRESS_SEED", "20240501"))
DURATION_S = 20.0
SESSIONS = 150
PUBLISHERS = 3
VIEWS = 3


@pytest.mark.timeout(180)
async def test_stress_random_faults_lose_no_acked_write(topic_name: str) -> None:
    rng = random.Random(SEED)
    bases = [make_snapshot(agent_name=f"agent-{i}", state=rng.choice(["active", "merged"]))
             for i in range(SESSIONS)]
    model = WriteModel()
    ops = {"publish": 0, "evict": 0, "read": 0}
    largest_staleness = 0.0
    degraded_seen = 0
    stop = asyncio.Event()

    async with proxied_broker() as (proxy, _):
        config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
        publishers = [SnapshotPublisher(config, delivery_timeout_s=1.0) for _ in range(PUBLISHERS)]
        views = [SnapshotView(config, fetch_max_wait_ms=20, stale_after_s=1.0)
                 for _ in range(VIEWS)]
        for client in (*publishers, *views):
            await client.start()

        async def publish_loop(index: int, publisher: SnapshotPublisher) -> None:
            local = random.Random(SEED * 31 + index)
            step = 0
            while not stop.is_set():
                base = local.choice(bases)
                step += 1
                value = None if local.random() < 0.1 else base.replace(intent=f"p{index}-{step}")
                ops["evict" if value is None else "publish"] += 1
                try:
                    if value is None:
                        receipt = await publisher.evict(base.session_id)
                    else:
                        receipt = await publisher.publish(value)
                except PublishError:
                    model.fail(base.session_id, value)
                    continue
                model.ack(receipt, value)

        async def read_loop() -> None:
            nonlocal largest_staleness, degraded_seen
            local = random.Random(SEED + 7)
            while not stop.is_set():
                for view in views:
                    view.get(local.choice(bases).session_id)
                    view.by_state("active")
                    ops["read"] += 2
                    stats = view.stats
                    largest_staleness = max(largest_staleness, stats.staleness_s)
                    degraded_seen += stats.status == "degraded"
                await asyncio.sleep(0.02)

        async def fault_loop() -> None:
            local = random.Random(SEED + 13)
            while not stop.is_set():
                await asyncio.sleep(local.uniform(0.2, 1.0))  # healthy time between faults
                roll = local.random()
                if roll < 0.65:
                    proxy.cut()
                elif roll < 0.8:
                    await proxy.outage(local.uniform(0.3, 2.5))
                elif roll < 0.9:
                    proxy.stall()
                    await asyncio.sleep(local.uniform(0.3, 2.0))  # the black hole's length
                    proxy.unstall()
                else:
                    proxy.latency(local.uniform(20, 200))
                    await asyncio.sleep(local.uniform(0.3, 1.0))  # the spike's length
                    proxy.latency(0)

        tasks = [asyncio.create_task(publish_loop(i, p)) for i, p in enumerate(publishers)]
        tasks += [asyncio.create_task(read_loop()), asyncio.create_task(fault_loop())]
        try:
            await asyncio.sleep(DURATION_S)  # the length of the stress run
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            proxy.heal()
            for publisher in publishers:
                await publisher.stop()  # flushes whatever a failed publish left queued
            for view in views:
                await view.barrier(timeout=60)
            await eventually(lambda: all(v.status == "live" for v in views), 30, "views live")
            lost = {f"view {i}": model.mismatches(view) for i, view in enumerate(views)}
            strict = [len(model.mismatches(view, strict=True)) for view in views]
            async with SnapshotView(config, fetch_max_wait_ms=20) as fresh:
                lost["fresh view"] = model.mismatches(fresh)
        finally:
            stop.set()
            proxy.heal()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in (*publishers, *views):
                await client.stop()

    counters = proxy.counters
    uncertain = len(model.maybe)
    print(
        f"\nstress (seed {SEED}, {DURATION_S:g} s): operations {sum(ops.values())} {ops}; "
        f"faults injected {counters.faults} (cuts {counters.cuts}, outages {counters.outages}, "
        f"stalls {counters.stalls}, latency spikes {counters.latency_changes}; "
        f"{counters.connections_cut} connections "
        f"cut, {counters.refused} refused); "
        f"acked writes {model.acked_writes}, failed writes {model.failed_writes} "
        f"({uncertain} sessions with an uncertain write, views differing from the acked winner "
        f"there: {strict}); lost writes {sum(len(v) for v in lost.values())}; "
        f"largest staleness {largest_staleness:.2f} s ({degraded_seen} degraded samples)"
    )
    assert counters.cuts > 0
    assert model.acked_writes > 0
    for name, problems in lost.items():
        assert problems == [], f"{name} lost acked writes: {problems[:5]}"
