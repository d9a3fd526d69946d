"""Broker faults on a three-node Apache Kafka cluster, measured under a steady publish load.

    python benchmarks/cluster_faults.py --runs 3

One cluster (``EmbeddedBroker(engine="kafka", nodes=3)``), a fresh topic per run (3 partitions,
replication factor 3, min.insync.replicas=2), three writers at about 50 publishes/s each
(`tests.clusterload.Load`, acks=all, delivery timeout 20 s) and two views following. Faults:

- ``leader-kill``: SIGKILL the leader of partition 0.
- ``controller-kill``: SIGKILL the active KRaft controller.
- ``rolling-restart``: stop (SIGTERM, controlled shutdown) and start each node in turn.
- ``two-down``: SIGKILL two of three nodes for 10 s, then start them again.
- ``client-cut``: black-hole node 3's client traffic for 10 s (a `tests.faultproxy.FaultProxy`
  in front of its client listener holds every byte, sockets open), then let it flow again.
  Replication and the controllers use their own listeners, so node 3 stays the leader of its
  partitions: those are unavailable to clients for the cut. The proxy is there (for every
  fault of the run) only when this fault is selected.

Per fault, the median of the runs (and the worst): acknowledged writes missing from a fresh
view afterwards (must be 0), the longest time without an acknowledged publish after the fault
began, the views' largest staleness during it, and the time from the fault until every view
held every acknowledged write (the load stops at the first acknowledgement after the fault
ends; killed nodes are started again after that measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snapbus.broker import EmbeddedBroker
from snapbus.config import KafkaConfig
from snapbus.publisher import SnapshotPublisher
from snapbus.topic import ensure_topic
from snapbus.view import SnapshotView
from tests.clusterload import Load, Watch, converged, in_sync, leaders
from tests.faultproxy import FaultProxy
from tests.helpers import eventually

FAULTS = ("leader-kill", "controller-kill", "rolling-restart", "two-down", "client-cut")
WAIT_S = 120.0
CUT_NODE = 3
PROXY: FaultProxy | None = None
"""In front of node CUT_NODE's client listener when ``client-cut`` is selected."""


async def _flowing(load: Load, more: int = 10) -> None:
    acked = load.acked
    await eventually(lambda: load.acked >= acked + more, WAIT_S, "publishing again")


async def run_once(cluster: EmbeddedBroker, fault: str) -> dict[str, float]:
    await cluster.start()
    config = KafkaConfig(bootstrap_servers=cluster.listeners["PLAINTEXT"],  # (as advertised)
                         topic=f"faults-{uuid.uuid4().hex[:8]}")
    await ensure_topic(config, partitions=3)
    await eventually(lambda: in_sync(cluster.bootstrap_servers, config.topic, 3), WAIT_S)
    views = [SnapshotView(config, fetch_max_wait_ms=20) for _ in range(2)]
    async with SnapshotPublisher(config, delivery_timeout_s=20.0) as publisher, \
            views[0], views[1]:
        load = Load(publisher)
        load.start()
        await eventually(lambda: load.acked >= 50, WAIT_S)
        watch = Watch(views)
        async with watch.running():
            began = time.monotonic()
            await FAULT_STEPS[fault](cluster, config, load)
            await load.stop()
            await eventually(lambda: converged(load.model, views), WAIT_S, "converged")
            converged_s = time.monotonic() - began
        stall = load.longest_stall_s(began)
        await cluster.start()
        async with SnapshotView(config, fetch_max_wait_ms=20) as fresh:
            lost = len([p for p in load.model.mismatches(fresh)
                        if "never written" not in p])
    return {"lost": lost, "stall_s": stall, "staleness_s": watch.max_staleness_s,
            "converged_s": converged_s, "acked": load.acked, "failed": len(load.errors)}


async def _leader_kill(cluster: EmbeddedBroker, config: KafkaConfig, load: Load) -> None:
    victim = (await leaders(cluster.bootstrap_servers, config.topic))[0]
    await cluster.kill(victim)
    await _flowing(load)


async def _controller_kill(cluster: EmbeddedBroker, config: KafkaConfig, load: Load) -> None:
    controller = cluster.quorum_leader()
    assert controller is not None
    await cluster.kill(controller)
    await eventually(lambda: cluster.quorum_leader() not in (None, controller), WAIT_S)
    await _flowing(load)


async def _rolling_restart(cluster: EmbeddedBroker, config: KafkaConfig, load: Load) -> None:
    for node_id in cluster.node_ids:
        await cluster.stop(node_id)
        await cluster.start()
        await eventually(lambda: in_sync(cluster.bootstrap_servers, config.topic, 3), WAIT_S)
    await _flowing(load)


async def _two_down(cluster: EmbeddedBroker, config: KafkaConfig, load: Load) -> None:
    leader = (await leaders(cluster.bootstrap_servers, config.topic))[0]
    down = [leader, next(n for n in cluster.node_ids if n != leader)]
    for node_id in down:
        await cluster.kill(node_id)
    await asyncio.sleep(10.0)  # (the outage being measured)
    await cluster.start()
    await _flowing(load)


async def _client_cut(cluster: EmbeddedBroker, config: KafkaConfig, load: Load) -> None:
    assert PROXY is not None
    led = await leaders(cluster.bootstrap_servers, config.topic)
    assert CUT_NODE in led.values(), led  # (else the cut would cost nothing)
    PROXY.stall()
    await asyncio.sleep(10.0)  # (the cut being measured)
    PROXY.heal()
    await _flowing(load)


FAULT_STEPS: dict[str, Callable[[EmbeddedBroker, KafkaConfig, Load], Awaitable[None]]] = {
    "leader-kill": _leader_kill,
    "controller-kill": _controller_kill,
    "rolling-restart": _rolling_restart,
    "two-down": _two_down,
    "client-cut": _client_cut,
}


async def main(runs: int, faults: list[str]) -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("snapbus").setLevel(logging.CRITICAL)
    print("| fault | runs | acked writes lost | longest publish stall (s) | "
          "max view staleness (s) | all views converged after (s) | publishes failed |")
    print("|---|---|---|---|---|---|---|")
    global PROXY
    if "client-cut" in faults:
        PROXY = FaultProxy("127.0.0.1", 0)
        await PROXY.start()
    try:
        await _run_faults(runs, faults)
    finally:
        if PROXY is not None:
            await PROXY.stop()


async def _run_faults(runs: int, faults: list[str]) -> None:
    advertised = {CUT_NODE: PROXY.port} if PROXY is not None else None
    async with EmbeddedBroker(engine="kafka", nodes=3, advertised_ports=advertised) as cluster:
        if PROXY is not None:
            PROXY.target_port = int(cluster.node_address(CUT_NODE).rsplit(":", 1)[1])
        for fault in faults:
            results = [await run_once(cluster, fault) for _ in range(runs)]

            def cell(key: str, results: list[dict[str, float]] = results) -> str:
                values = [r[key] for r in results]
                return f"{statistics.median(values):.1f} (max {max(values):.1f})"

            lost = sum(int(r["lost"]) for r in results)
            failed = sum(int(r["failed"]) for r in results)
            acked = sum(int(r["acked"]) for r in results)
            print(f"| {fault} | {runs} | {lost} of {acked} | {cell('stall_s')} | "
                  f"{cell('staleness_s')} | {cell('converged_s')} | {failed} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--faults", nargs="*", choices=FAULTS, default=list(FAULTS))
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.faults))
