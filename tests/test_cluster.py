"""snapbus on a three-node Apache Kafka cluster: replication and broker faults under load.

One cluster for the module (``EmbeddedBroker(engine="kafka", nodes=3)``: three KRaft nodes,
each a broker and a controller); every test runs on its own topic (3 partitions, replication
factor 3, ``min.insync.replicas=2`` as `ensure_topic` makes it) and finds every node running:
killed or stopped nodes are started again before the next test. A steady publish load
(`tests.clusterload.Load`) runs through every fault; afterwards every acknowledged publish must
be in every view (`WriteModel`), publishes that failed must have raised `PublishError` within
the delivery timeout, and the views must converge without a restart.

Node 3's client listener is advertised at a `FaultProxy` (``client_proxy``) for the whole module,
so every client reaches node 3 through it (bootstrap aside); the brokers replicate over their own
INTERNAL listener and the controllers over CONTROLLER, which the proxy does not front.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from snapbus.broker import EmbeddedBroker
from snapbus.config import KafkaConfig
from snapbus.errors import BrokerError, PublishError
from snapbus.publisher import SnapshotPublisher
from snapbus.topic import ensure_topic
from snapbus.view import SnapshotView
from tests.clusterload import Load, converged, in_sync, leaders
from tests.faultproxy import FaultProxy
from tests.helpers import WAIT_S, eventually, make_snapshot

pytestmark = [pytest.mark.kafka, pytest.mark.cluster, pytest.mark.usefixtures("quiet_aiokafka")]

DELIVERY_S = 20.0
"""The publishers' delivery timeout: longer than a leader election after a crash (the
controller fences a silent broker after ``broker.session.timeout.ms``, 9 s by default)."""
RECOVERY_S = 90.0
"""Bound of waits for a node to come back and catch up (a JVM start on a busy machine)."""


CUT_NODE = 3
"""The node whose client listener is reached through `client_proxy`."""


@pytest.fixture(scope="module")
async def client_proxy() -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of node 3's client listener (its target is set once the cluster
    has picked its ports, at its first start)."""
    async with FaultProxy("127.0.0.1", 0, capture=True) as proxy:
        yield proxy


@pytest.fixture(scope="module")
async def cluster(client_proxy: FaultProxy) -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(engine="kafka", nodes=3,
                              advertised_ports={CUT_NODE: client_proxy.port}) as started:
        client_proxy.target_port = int(started.node_address(CUT_NODE).rsplit(":", 1)[1])
        yield started


@pytest.fixture
async def config(cluster: EmbeddedBroker, topic_name: str) -> KafkaConfig:
    """A fresh replicated topic on a cluster whose three nodes all run."""
    await cluster.start()  # (whatever the last test left down)
    config = KafkaConfig(bootstrap_servers=cluster.bootstrap_servers, topic=topic_name)
    await ensure_topic(config, partitions=3)
    await eventually(lambda: in_sync(cluster.bootstrap_servers, topic_name, 3),
                     RECOVERY_S, "three in-sync replicas")
    return config


def views(config: KafkaConfig, count: int = 2, **options: object) -> list[SnapshotView]:
    return [SnapshotView(config, fetch_max_wait_ms=20, **options)  # type: ignore[arg-type]
            for _ in range(count)]


async def settle(load: Load, watched: list[SnapshotView], config: KafkaConfig) -> None:
    """Stop the load; check what every fault test promises."""
    await load.stop()
    assert load.acked > 0
    for outcome in load.outcomes:
        if outcome.error is not None:
            assert outcome.took_s <= DELIVERY_S + 2.0, outcome
            assert outcome.error.retriable
    for view in watched:
        await view.barrier(timeout=WAIT_S)
    try:
        await eventually(lambda: converged(load.model, watched), WAIT_S, "views converged")
    except AssertionError:
        problems = [p for view in watched for p in load.model.mismatches(view)]
        raise AssertionError(f"{len(problems)} mismatches, e.g. {problems[:3]}") from None
    async with SnapshotView(config, fetch_max_wait_ms=20) as fresh:
        assert load.model.mismatches(fresh) == []


async def test_ensure_topic_replicates(cluster: EmbeddedBroker, topic_name: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """Three replicas, min.insync.replicas=2, a leader for every partition on return; a topic
    with one replica found on a cluster is named in one warning line."""
    await cluster.start()
    config = KafkaConfig(bootstrap_servers=cluster.bootstrap_servers, topic=topic_name)
    info = await ensure_topic(config, partitions=6)
    assert (info.created, info.replication_factor, info.brokers) == (True, 3, 3)
    assert info.configs["min.insync.replicas"] == "2"
    assert all(leader >= 0 for leader in (await leaders(cluster.bootstrap_servers,
                                                        topic_name)).values())
    again = await ensure_topic(config)
    assert (again.created, again.replication_factor) == (False, 3)

    single = config.replace(topic=f"{topic_name}-single")
    info = await ensure_topic(single, partitions=2, replication_factor=1)
    assert (info.replication_factor, info.configs["min.insync.replicas"]) == (1, "1")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="snapbus.topic"):
        await ensure_topic(single)
    warnings = [r for r in caplog.records if r.name == "snapbus.topic"]
    assert len(warnings) == 1
    assert "replication factor 1 on a cluster of 3 brokers" in warnings[0].getMessage()


async def test_leader_killed_under_load(cluster: EmbeddedBroker, config: KafkaConfig) -> None:
    """SIGKILL the leader of partition 0 while publishing: publishes stall for the election
    (or fail with PublishError within the delivery timeout), nothing acknowledged is lost, and
    the views converge without a restart."""
    watched = views(config)
    async with SnapshotPublisher(config, delivery_timeout_s=DELIVERY_S) as publisher, \
            watched[0], watched[1]:
        load = Load(publisher)
        load.start()
        await eventually(lambda: load.acked >= 50, WAIT_S, "load running")
        victim = (await leaders(cluster.bootstrap_servers, config.topic))[0]
        await cluster.kill(victim)
        killed_at, acked_at_kill = time.monotonic(), load.acked
        await eventually(lambda: load.acked >= acked_at_kill + 100, RECOVERY_S,
                         "publishing goes on through the new leaders")
        assert victim not in (await leaders(cluster.bootstrap_servers, config.topic)).values()
        await cluster.start()
        await eventually(lambda: in_sync(cluster.bootstrap_servers, config.topic, 3),
                         RECOVERY_S, "the restarted node back in sync")
        await settle(load, watched, config)
        assert load.longest_stall_s(killed_at) < DELIVERY_S


async def test_rolling_restart_under_load(cluster: EmbeddedBroker,
                                          config: KafkaConfig) -> None:
    """Stop and start each node in turn (a rolling upgrade) while publishing: nothing
    acknowledged is lost; wait_for and barrier keep their promises at every step."""
    watched = views(config)
    async with SnapshotPublisher(config, delivery_timeout_s=DELIVERY_S) as publisher, \
            watched[0], watched[1]:
        load = Load(publisher)
        load.start()
        await eventually(lambda: load.acked >= 30, WAIT_S, "load running")
        for node_id in cluster.node_ids:
            acked_before = load.acked
            await cluster.stop(node_id)
            receipt = await publisher.publish(marker := make_snapshot())
            load.model.ack(receipt, marker)
            for view in watched:
                await view.wait_for(receipt, timeout=WAIT_S)
                assert view.get(marker.session_id) == marker
            await cluster.start()
            await eventually(lambda: in_sync(cluster.bootstrap_servers, config.topic, 3),
                             RECOVERY_S, f"node {node_id} back in sync")
            await eventually(lambda: load.acked > acked_before,  # noqa: B023
                             WAIT_S, "load goes on")
            snapshot = {sid: value for sid, value in load.model.expected().items()
                        if value.intent.startswith("version ")}
            for view in watched:
                await view.barrier(timeout=WAIT_S)
                # everything acknowledged before the barrier is visible (or newer)
                for sid, value in snapshot.items():
                    seen = view.get(sid)
                    assert seen is not None
                    assert int(seen.intent.split()[1]) >= int(value.intent.split()[1])
        await settle(load, watched, config)


async def test_two_of_three_down_refuses_writes(cluster: EmbeddedBroker,
                                                config: KafkaConfig) -> None:
    """With two nodes down a publish cannot reach two in-sync replicas: it raises a retriable
    PublishError; a publisher still stops (within its delivery timeout); views keep serving
    what they had and say they are degraded; all recovers."""
    watched = views(config, stale_after_s=3.0)
    impatient = SnapshotPublisher(config, delivery_timeout_s=5.0)
    async with SnapshotPublisher(config, delivery_timeout_s=DELIVERY_S) as publisher, \
            impatient, watched[0], watched[1]:
        before = make_snapshot()
        receipt = await publisher.publish(before)
        for view in watched:
            await view.wait_for(receipt, timeout=WAIT_S)
        # the leader of partition 0 goes down, so that partition has none (views fall behind)
        leader = (await leaders(cluster.bootstrap_servers, config.topic))[0]
        down = [leader, next(n for n in cluster.node_ids if n != leader)]
        for node_id in down:
            await cluster.kill(node_id)
        refused = make_snapshot()
        began = time.monotonic()
        with pytest.raises(PublishError) as raised:
            await impatient.publish(refused)
        assert time.monotonic() - began < 5.0 + 2.0
        assert raised.value.retriable
        assert "may or may not be stored" in str(raised.value)
        assert "min.insync.replicas" in str(raised.value)
        # its record is still pending in the client: stopping must not wait for the cluster
        await asyncio.wait_for(impatient.stop(), 5.0 + 5.0)
        await eventually(lambda: all(v.status == "degraded" for v in watched), WAIT_S,
                         "views degraded")
        for view in watched:
            assert view.get(before.session_id) == before
            assert view.health().reason
        await cluster.start()
        after = make_snapshot()
        receipt = await publisher.publish(after)
        for view in watched:
            await view.wait_for(receipt, timeout=RECOVERY_S)
            assert view.get(after.session_id) == after
            assert view.get(refused.session_id) in (None, refused)
        await eventually(lambda: all(v.status == "live" for v in watched), WAIT_S,
                         "views live again")


async def test_controller_leader_lost(cluster: EmbeddedBroker, config: KafkaConfig) -> None:
    """SIGKILL the active controller under load: the quorum elects another, topics can still
    be created, nothing acknowledged is lost."""
    watched = views(config)
    async with SnapshotPublisher(config, delivery_timeout_s=DELIVERY_S) as publisher, \
            watched[0], watched[1]:
        load = Load(publisher)
        load.start()
        await eventually(lambda: load.acked >= 30, WAIT_S, "load running")
        controller = cluster.quorum_leader()
        assert controller in cluster.node_ids
        await cluster.kill(controller)
        await eventually(lambda: cluster.quorum_leader() not in (None, controller),
                         RECOVERY_S, "a new active controller")
        acked = load.acked
        await eventually(lambda: load.acked >= acked + 50, RECOVERY_S, "load goes on")
        await cluster.start()
        await eventually(lambda: in_sync(cluster.bootstrap_servers, config.topic, 3),
                         RECOVERY_S, "the old controller back in sync")
        created = await ensure_topic(config.replace(topic=f"{config.topic}-after"),
                                     partitions=2)
        assert (created.created, created.replication_factor) == (True, 3)
        await settle(load, watched, config)


CUT_DELIVERY_S = 5.0
"""The publishers' delivery timeout while a node is cut off: how long a publish to one of its
partitions may take before it raises."""


@pytest.mark.parametrize("fault", ["refused", "black-holed"])
async def test_node_cut_off_from_clients(cluster: EmbeddedBroker, client_proxy: FaultProxy,
                                         config: KafkaConfig, fault: str) -> None:
    """Cut node 3 off from the clients only (its connections refused, or black-holed: bytes
    held, sockets open) under load. It stays the leader of its partitions (the controller and
    the other brokers still reach it), so those are unavailable to clients for the cut:
    publishes to them raise a retriable PublishError within the delivery timeout; publishes to
    the other partitions all succeed; views keep serving, follow the other partitions, and say
    they are degraded; after the cut heals, everything converges without a restart."""
    config = config.replace(bootstrap_servers=cluster.listeners["PLAINTEXT"])  # (as advertised)
    led = await leaders(cluster.bootstrap_servers, config.topic)
    cut = {p for p, node_id in led.items() if node_id == CUT_NODE}
    assert 0 < len(cut) < len(led), led
    # only clients come through the proxy: the other brokers' replica fetchers (client id
    # "broker-N-fetcher-M") reach node 3 on its INTERNAL listener, which the cut spares
    assert client_proxy.captured
    assert not [c for c in client_proxy.captured if b"-fetcher-" in c]
    watched = views(config, stale_after_s=3.0)
    async with SnapshotPublisher(config, delivery_timeout_s=CUT_DELIVERY_S) as publisher, \
            watched[0], watched[1]:
        load = Load(publisher)
        load.start()
        await eventually(lambda: len(load.partitions()) == len(load.sessions), WAIT_S,
                         "every session written once")
        partition_of = load.partitions()
        cut_sessions = {sid for sid, p in partition_of.items() if p in cut}
        if fault == "refused":
            client_proxy.refuse()
            client_proxy.cut()
        else:
            client_proxy.stall()
        cut_at = time.monotonic()
        try:
            # (each writer publishes one at a time, so it waits out the delivery timeout
            # whenever its next session is on a cut partition: the load slows, never stops)
            await eventually(lambda: len([o for o in load.outcomes
                                          if o.began >= cut_at and o.error is None]) >= 10,
                             WAIT_S, "publishing goes on through the other nodes")
            await eventually(lambda: len({o.session_id for o in load.outcomes
                                          if o.began >= cut_at and o.error}) >= 3,
                             CUT_DELIVERY_S + WAIT_S, "publishes to the cut partitions fail")
            await eventually(lambda: all(v.status == "degraded" for v in watched), WAIT_S,
                             "views degraded")
            for view in watched:
                assert "no answer from the broker" in (view.health().reason or "")

            def served(view: SnapshotView) -> bool:
                """Every acknowledged write of the reachable partitions is in the view (a cut
                partition's acknowledged writes the view had not read yet must wait)."""
                return all(view.get(sid) == value for sid, (_, value) in load.model.acked.items()
                           if sid not in cut_sessions)

            await eventually(lambda: all(served(v) for v in watched), WAIT_S,
                             "views follow the reachable partitions")
            assert not [o for o in load.outcomes
                        if o.began >= cut_at and o.error is None
                        and o.session_id in cut_sessions], "a cut partition took a write"
        finally:
            client_proxy.heal()
        healed_at = time.monotonic()
        during = [o for o in load.outcomes if o.began >= cut_at and o.ended < healed_at]
        reachable = [o for o in during if o.session_id not in cut_sessions]
        assert all(o.error is None for o in reachable)
        assert max(o.took_s for o in reachable) < 2.0  # (not held up by the cut node)
        assert all(o.error is not None for o in during if o.session_id in cut_sessions)
        for o in load.outcomes:
            if o.error is not None:
                assert o.took_s <= CUT_DELIVERY_S + 2.0, o
                assert o.error.retriable
                assert "may or may not be stored" in str(o.error)
        await eventually(lambda: any(o.began >= healed_at and o.error is None
                                     for o in load.outcomes if o.session_id in cut_sessions),
                         WAIT_S, "the cut partitions take writes again")
        await eventually(lambda: all(v.status == "live" for v in watched), WAIT_S,
                         "views live again")
        await settle(load, watched, config)


def test_cluster_options_checked() -> None:
    """`nodes` is a Kafka option, at least one; a cluster picks its own ports."""
    with pytest.raises(BrokerError, match="nodes"):
        EmbeddedBroker(nodes=3)
    with pytest.raises(BrokerError, match="at least one"):
        EmbeddedBroker(engine="kafka", nodes=0)
    with pytest.raises(BrokerError, match="needs nodes=1"):
        EmbeddedBroker(engine="kafka", nodes=3, port=9092)
    with pytest.raises(BrokerError, match="no node 4"):
        EmbeddedBroker(engine="kafka", nodes=3, advertised_ports={4: 9092})
    with pytest.raises(BrokerError, match="advertised_ports needs engine='kafka'"):
        EmbeddedBroker(advertised_ports={1: 9092})
