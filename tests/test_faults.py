"""Reliability under faults: nothing acknowledged is lost, nothing hangs, bad input changes nothing.

Every client here talks to the broker through a `FaultProxy` (the broker advertises the
proxy's address, so the connections clients open after bootstrapping go through it too), which
cuts connections, refuses them (an outage), delays or black-holes bytes. The broker crash test
uses a durable broker (S3 storage on moto) and kills it with SIGKILL.

The model of what the topic must hold is `WriteModel`: for each session the acknowledged record
with the highest offset wins; a publish that raised may or may not be stored. Writers that
re-publish every failed write until it is acknowledged are compared strictly.

No test sleeps to synchronise: they wait for conditions with timeouts, `barrier()` and
`wait_for()`. Holding a fault for a while is the fault itself (an outage lasts some time).
Time bounds asserted are generous and only prove that calls give up instead of hanging.
"""

from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from snapbus.broker import EmbeddedBroker
from snapbus.codec import MARKER, decode, encode
from snapbus.config import KafkaConfig
from snapbus.errors import (
    ConfigError,
    KafkaUnavailableError,
    PublishError,
    TopicError,
    ValidationError,
    ViewError,
)
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import SnapshotView
from tests.faultproxy import (
    FaultProxy,
    Value,
    WriteModel,
    eventually,
    free_port,
    make_snapshot,
)
from tests.helpers import KEYLESS_RECORDS_STORED, new_broker, topic_partitions

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_aiokafka")]

FETCH_WAIT_MS = 20
WAIT_S = 30.0
Fault = Literal["outage", "stall"]


# ---------------------------------------------------------------------------- fixtures




# ---------------------------------------------------------------------------- helpers


def new_view(config: KafkaConfig, **options: Any) -> SnapshotView:
    options.setdefault("fetch_max_wait_ms", FETCH_WAIT_MS)
    return SnapshotView(config, **options)


async def write(publisher: SnapshotPublisher, model: WriteModel, session_id: uuid.UUID,
                value: Value, *, until_acked: bool = True, attempts: int = 100) -> Receipt | None:
    """Publish `value` (None: evict) and record the outcome in `model`.

    With `until_acked`, a failed publish is repeated (which is safe) until it is acknowledged.
    """
    for _ in range(attempts):
        try:
            if value is None:
                receipt = await publisher.evict(session_id)
            else:
                receipt = await publisher.publish(value)
        except PublishError:
            model.fail(session_id, value)
            if not until_acked:
                return None
            continue
        model.ack(receipt, value)
        return receipt
    raise AssertionError(f"publish of {session_id} not acknowledged in {attempts} attempts")


async def read_log(bootstrap_servers: str, topic: str,
                   timeout: float = WAIT_S) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic`, read with a raw consumer up to the high watermarks."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=FETCH_WAIT_MS,
    )
    partitions = await topic_partitions(bootstrap_servers, topic)
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)

        async def done() -> bool:
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is None or await consumer.position(tp) < hw:
                    return False
            return True

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await done():
            if loop.time() > deadline:
                raise AssertionError(f"could not read {topic!r} to its end in {timeout} s")
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def view_state(view: SnapshotView) -> tuple[dict[uuid.UUID, WorkspaceSnapshot], int, int,
                                            dict[int, int]]:
    stats = view.stats
    return ({s.session_id: s for s in view.snapshots()}, stats.records_applied,
            stats.decode_errors, stats.last_offsets)


def begin_fault(proxy: FaultProxy, fault: Fault) -> None:
    if fault == "outage":
        proxy.refuse()
        proxy.cut()
    else:
        proxy.stall()


# ---------------------------------------------------------------------------- publisher


async def test_acked_publishes_survive_cuts_and_latency(
    proxy: FaultProxy, topic_name: str
) -> None:
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    model = WriteModel()
    rng = random.Random(20240501)
    bases = [make_snapshot(agent_name=f"agent-{i}") for i in range(40)]
    cuts_before = proxy.counters.connections_cut
    async with SnapshotPublisher(config, delivery_timeout_s=3) as publisher, \
            new_view(config) as view:
        for step in range(300):
            if step % 20 == 10:
                proxy.cut()
            if step == 100:
                proxy.latency(25)
            if step == 200:
                proxy.latency(0)
            base = rng.choice(bases)
            value = None if rng.random() < 0.1 else base.replace(intent=f"step {step}")
            await write(publisher, model, base.session_id, value)
        await view.barrier(timeout=WAIT_S)
        assert model.mismatches(view, strict=True) == []
        assert len(view) == len(model.expected())
        assert view.status == "live"
        applied = view.stats.records_applied
    assert proxy.counters.connections_cut > cuts_before
    assert model.acked_writes == 300

    # each record of the log applied exactly once: none skipped, none applied twice
    assert applied == len(await read_log(proxy.address, topic_name))

    # a view started afterwards sees the same
    async with new_view(config) as fresh:
        assert fresh.status == "live"
        assert model.mismatches(fresh, strict=True) == []


@pytest.mark.kafka
async def test_idempotent_publisher_stores_each_record_once_in_order_under_cuts(
    proxy: FaultProxy, topic_name: str
) -> None:
    # Connections cut while produce requests are in flight: the client sends those batches
    # again. The idempotent producer (on by default where the broker allows it) makes the
    # broker store each once and in order, so the log holds every session's versions in
    # publish order and no value twice (with idempotence=False this run stored 35 of 150
    # versions of a session twice)
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    sessions = [make_snapshot(agent_name=f"agent-{i}") for i in range(8)]
    rounds, per_round = 30, 5
    rng = random.Random(20261205)
    published = asyncio.Event()
    failed_rounds = 0
    async with SnapshotPublisher(config, linger_ms=2, delivery_timeout_s=WAIT_S) as publisher:
        assert publisher.idempotent
        await publisher.publish_many(sessions)
        proxy.latency(15)  # a produce request is in flight for at least 30 ms

        async def cut_while_publishing() -> None:
            while not published.is_set():
                # fault injection at random moments, not a synchronisation
                await asyncio.sleep(rng.uniform(0.05, 0.25))
                proxy.cut()

        cutter = asyncio.create_task(cut_while_publishing())
        try:
            for r in range(rounds):
                # several versions of every session in flight at once, in version order
                batch = [s.replace(intent=f"v{r * per_round + v}")
                         for v in range(per_round) for s in sessions]
                try:
                    await publisher.publish_many(batch)
                except PublishError:
                    failed_rounds += 1
        finally:
            published.set()
            await cutter
        proxy.heal()
    assert proxy.counters.cuts > 10
    records = await read_log(proxy.address, topic_name)
    versions: dict[bytes, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert record.value is not None
        intent = decode(record.value).intent
        if intent.startswith("v"):
            versions.setdefault(record.key or b"", []).append(int(intent[1:]))
    everything = list(range(rounds * per_round))
    for session in sessions:
        found = versions[session.key.encode()]
        assert len(found) == len(set(found)), f"duplicates: {found}"
        assert found == sorted(found), f"out of order: {found}"
        if not failed_rounds:
            assert found == everything


@pytest.mark.parametrize("fault", ["stall", "outage"])
async def test_publish_during_fault_fails_in_time_then_recovers(
    proxy: FaultProxy, topic_name: str, fault: Fault
) -> None:
    delivery_timeout_s = 1.5
    bound = 3 * delivery_timeout_s
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    model = WriteModel()
    loop = asyncio.get_running_loop()
    async with SnapshotPublisher(config, delivery_timeout_s=delivery_timeout_s) as publisher, \
            new_view(config) as view:
        kept = make_snapshot()
        await write(publisher, model, kept.session_id, kept)
        await view.barrier(timeout=WAIT_S)

        begin_fault(proxy, fault)
        doomed = [make_snapshot(agent_name=f"doomed-{i}") for i in range(3)]
        calls: list[tuple[list[tuple[uuid.UUID, Value]], Callable[[], Awaitable[Any]]]] = [
            ([(doomed[0].session_id, doomed[0])], lambda: publisher.publish(doomed[0])),
            ([(s.session_id, s) for s in doomed[1:]], lambda: publisher.publish_many(doomed[1:])),
            ([(kept.session_id, None)], lambda: publisher.evict(kept.session_id)),
        ]
        for attempted, call in calls:
            started = loop.time()
            with pytest.raises(PublishError) as info:
                # the outer bound only turns a hang into a failure
                await asyncio.wait_for(call(), bound + 10)
            elapsed = loop.time() - started
            assert elapsed < bound, f"gave up after {elapsed:.1f} s, over {bound} s"
            message = str(info.value)
            assert topic_name in message
            assert "may or may not be stored" in message
            for session_id, value in attempted:
                model.fail(session_id, value)
        assert view.get(kept.session_id) == kept  # the view serves the last known state
        proxy.heal()

        # publishing works again, with the same publisher
        after = make_snapshot(agent_name="after")
        receipt = await asyncio.wait_for(publisher.publish(after), WAIT_S)
        model.ack(receipt, after)
        await view.wait_for(receipt, timeout=WAIT_S)
        await view.barrier(timeout=WAIT_S)
        assert view.get(after.session_id) == after
        assert model.mismatches(view) == []
    async with new_view(config) as fresh:
        assert model.mismatches(fresh) == []


# ---------------------------------------------------------------------------- view


@pytest.mark.parametrize("fault", ["outage", "stall"])
async def test_view_degrades_during_fault_and_recovers_without_restart(
    proxy: FaultProxy, topic_name: str, fault: Fault
) -> None:
    stale_after_s = 1.0
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    model = WriteModel()
    rng = random.Random(7)
    bases = [make_snapshot(agent_name=f"agent-{i}") for i in range(20)]
    async with SnapshotPublisher(config, delivery_timeout_s=3) as publisher, \
            new_view(config, stale_after_s=stale_after_s) as view:
        # writes with connection cuts in between
        for step in range(60):
            if step % 10 == 5:
                proxy.cut()
            base = rng.choice(bases)
            await write(publisher, model, base.session_id, base.replace(intent=f"a{step}"))
        await view.barrier(timeout=WAIT_S)
        assert model.mismatches(view, strict=True) == []
        assert view.status == "live"

        # the fault is held until the view reports it
        begin_fault(proxy, fault)
        await eventually(lambda: view.status == "degraded", WAIT_S, "status degraded")
        await eventually(lambda: view.stats.staleness_s > stale_after_s, WAIT_S, "staleness")
        stats = view.stats
        assert stats.status == "degraded"
        assert stats.staleness_s > stale_after_s
        assert view.status_reason is not None
        assert "no answer from the broker" in view.status_reason
        assert model.mismatches(view, strict=True) == []  # still serving the last known state
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(asyncio.TimeoutError):  # (the timeout bounds the whole call)
            await view.barrier(timeout=0.5)
        assert loop.time() - began < 3.0
        across = asyncio.create_task(view.barrier(timeout=WAIT_S))  # waits out the fault
        proxy.heal()

        await eventually(lambda: view.status == "live", WAIT_S, "status live after the fault")
        await across
        assert view.status_reason is None
        for step in range(30):
            base = rng.choice(bases)
            value = None if step % 7 == 0 else base.replace(intent=f"b{step}")
            await write(publisher, model, base.session_id, value)
        await view.barrier(timeout=WAIT_S)
        assert view.status == "live"
        assert model.mismatches(view, strict=True) == []
        assert len(view) == len(model.expected())
        applied, decode_errors = view.stats.records_applied, view.stats.decode_errors
    assert decode_errors == 0
    assert applied == len(await read_log(proxy.address, topic_name))


async def test_view_fails_with_cause_when_unreachable_too_long(
    proxy: FaultProxy, topic_name: str
) -> None:
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    snapshot = make_snapshot()
    async with SnapshotPublisher(config) as publisher:
        receipt = await publisher.publish(snapshot)
    view = new_view(config, stale_after_s=0.5, fail_after_s=2.0)
    await view.start()
    try:
        await view.wait_for(receipt, timeout=WAIT_S)
        proxy.refuse()
        proxy.cut()
        pending = asyncio.create_task(view.barrier())
        await eventually(lambda: view.status == "failed", WAIT_S, "status failed")
        reason = view.status_reason
        assert reason is not None
        assert "no answer from the broker" in reason
        assert "fail_after_s=2" in reason
        assert view.stats.status == "failed"
        assert view.stats.status_reason == reason

        # a wait pending when it failed, and every new one, raise ViewError with the cause
        with pytest.raises(ViewError, match="no answer from the broker"):
            await asyncio.wait_for(pending, 10)
        with pytest.raises(ViewError, match="no answer from the broker"):
            await asyncio.wait_for(view.barrier(), 10)
        with pytest.raises(ViewError, match="no answer from the broker"):
            await asyncio.wait_for(view.wait_for(receipt), 10)
        proxy.accept()
    finally:
        await view.stop()


async def test_cancelled_start_leaves_nothing_running(
    proxy: FaultProxy, topic_name: str
) -> None:
    """A caller's timeout around `start()` stops the view: no read loop, no connection left."""
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish(make_snapshot())  # (so that catching up needs a fetch)
    await eventually(lambda: proxy.active_connections == 0, WAIT_S, "publisher disconnected")
    view = new_view(config)
    proxy.latency(300)  # the first fetch answers >= 0.6 s after the read loop starts
    starting = asyncio.create_task(view.start())
    await eventually(lambda: view.status == "catching_up", WAIT_S, "view catching up")
    proxy.stall()  # (and that answer never comes)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert view.status == "stopped"
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("snapbus-view")] == []
    proxy.heal()
    await eventually(lambda: proxy.active_connections == 0, WAIT_S, "view disconnected")
    with pytest.raises(ViewError, match="cannot be restarted"):
        await view.start()


@pytest.mark.kafka  # (alters the topic's configs under the view)
async def test_the_topic_check_reuses_its_connection(
    network: tuple[FaultProxy, EmbeddedBroker], proxy: FaultProxy, topic_name: str
) -> None:
    # a view checks its topic every topic_check_s over one admin connection, not a new
    # connection (and, on a secured cluster, a new handshake) each time
    _, broker = network
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)  # (not proxied)
    await admin.start()

    async def set_policy(policy: str) -> None:
        await admin.alter_configs([ConfigResource(
            ConfigResourceType.TOPIC, topic_name, {"cleanup.policy": policy})])

    try:
        async with new_view(config, topic_check_s=0.05) as view:

            async def checked(policy: str, status: str) -> None:
                await set_policy(policy)
                await eventually(lambda: view.status == status, WAIT_S, f"a check saw {policy}")

            await checked("delete", "degraded")
            opened = proxy.counters.connections
            await checked("compact", "live")
            await checked("delete", "degraded")
            await checked("compact", "live")
            assert proxy.counters.connections == opened
    finally:
        await admin.close()


# ---------------------------------------------------------------------------- broker crash


@pytest.mark.timeout(240)
async def test_broker_crash_loses_nothing_acked(topic_name: str) -> None:
    async with new_broker(durable=True) as broker:
        config = KafkaConfig(broker.bootstrap_servers, topic_name, connect_timeout_s=20)
        model = WriteModel()
        stop = asyncio.Event()
        bases = [make_snapshot(agent_name=f"agent-{i}") for i in range(40)]

        async def writer(publisher: SnapshotPublisher, mine: list[WorkspaceSnapshot],
                         seed: int) -> None:
            rng = random.Random(seed)
            step = 0
            while not stop.is_set():
                base = rng.choice(mine)
                value = None if rng.random() < 0.1 else base.replace(intent=f"{seed}-{step}")
                await write(publisher, model, base.session_id, value)
                step += 1

        publishers = [SnapshotPublisher(config, delivery_timeout_s=3, linger_ms=20)
                      for _ in range(2)]
        views = [new_view(config, fetch_max_wait_ms=100, stale_after_s=1.0) for _ in range(2)]
        for client in (*publishers, *views):
            await client.start()
        try:
            tasks = [asyncio.create_task(writer(p, bases[i::2], i))
                     for i, p in enumerate(publishers)]
            await eventually(lambda: model.acked_writes >= 150, 60, "writes before the crash")
            await broker.kill()
            await eventually(lambda: all(v.status == "degraded" for v in views), WAIT_S,
                             "views degraded while the broker is down")
            await eventually(lambda: model.failed_writes >= 2, WAIT_S,
                             "publishes failing while the broker is down")
            failed_before = model.failed_writes
            await broker.start()
            acked_at_restart = model.acked_writes
            await eventually(lambda: model.acked_writes >= acked_at_restart + 150, 90,
                             "writes after the restart")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            for publisher in publishers:
                await publisher.stop()
            for view in views:
                await view.barrier(timeout=90)
                assert model.mismatches(view, strict=True) == []
                assert len(view) == len(model.expected())
                assert view.status == "live"
            print(f"\ncrash: {model.acked_writes} acked, {model.failed_writes} failed "
                  f"({failed_before} before the restart), resyncs "
                  f"{[v.stats.resyncs for v in views]}")
        finally:
            stop.set()
            for client in (*publishers, *views):
                await client.stop()
        async with new_view(config, fetch_max_wait_ms=100, start_timeout_s=90) as fresh:
            assert fresh.status == "live"
            assert model.mismatches(fresh, strict=True) == []


# ---------------------------------------------------------------------------- poison pills

POISON_COUNT = 10_000
POISON_KINDS = ("garbage", "empty", "unknown_fingerprint", "bad_key", "mismatched_key")
EXPECTED_REASON = {
    "garbage": "bad_marker",
    "empty": "empty",
    "unknown_fingerprint": "unknown_fingerprint",
    "bad_key": "bad_key",
    "mismatched_key": "invalid_field",
}


@pytest.mark.timeout(240)
async def test_poison_pills_at_volume_are_skipped_counted_and_dead_lettered(
    proxy: FaultProxy, topic_name: str
) -> None:
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    dead_letter_topic = f"{topic_name}.dlq"
    rng = random.Random(99)
    bases = [make_snapshot(agent_name=f"agent-{i}") for i in range(50)]
    latest: dict[uuid.UUID, WorkspaceSnapshot] = {}
    big = "x" * 2000  # poison values of a few KB: keeping them would show in memory

    def poison(i: int) -> tuple[str, bytes | None, bytes]:
        kind = POISON_KINDS[i % len(POISON_KINDS)]
        victim = rng.choice(bases)  # poison under the key of a live session
        if kind == "garbage":
            return kind, victim.key.encode(), b"\x00garbage " + rng.randbytes(rng.randrange(3000))
        if kind == "empty":
            return kind, victim.key.encode(), b""
        valid = encode(victim.replace(intent=f"{big} poison {i}"))
        if kind == "unknown_fingerprint":
            return kind, victim.key.encode(), MARKER + rng.randbytes(8) + valid[10:]
        if kind == "bad_key":
            keyless = i % 2 and KEYLESS_RECORDS_STORED
            return kind, (None if keyless else f"not-a-uuid-{i}".encode()), valid
        return kind, make_snapshot().key.encode(), valid  # value about another session

    async with SnapshotPublisher(config) as publisher:
        for base in bases:
            latest[base.session_id] = base
        await publisher.publish_many(bases)
    sent: dict[tuple[int, int], tuple[str, bytes | None, int, int]] = {}
    view = new_view(config, dead_letter_topic=dead_letter_topic)
    await view.start()
    not_live: list[str] = []
    watching = True

    async def watch_status() -> None:
        while watching:
            if view.status != "live":
                not_live.append(f"{view.status}: {view.status_reason}")
            await asyncio.sleep(0.01)

    try:
        await view.barrier(timeout=WAIT_S)
        applied_before = view.stats.records_applied
        gc.collect()
        tracemalloc.start()
        memory_before = tracemalloc.get_traced_memory()[0]
        watcher = asyncio.create_task(watch_status())

        raw = AIOKafkaProducer(bootstrap_servers=proxy.address, acks="all", linger_ms=5)
        await raw.start()
        poison_bytes = 0
        good_sent = 0
        try:
            pending: list[tuple[asyncio.Future[Any], str, bytes | None, bytes]] = []
            for i in range(POISON_COUNT):
                kind, key, value = poison(i)
                poison_bytes += len(value)
                pending.append((await raw.send(topic_name, value, key=key), kind, key, value))
                if i % 40 == 0:  # a good update every 40 poison records
                    base = rng.choice(bases)
                    update = base.replace(intent=f"good {i}")
                    latest[base.session_id] = update
                    await raw.send(topic_name, encode(update), key=update.key.encode())
                    good_sent += 1
                if len(pending) >= 1000:
                    for future, kind, key, value in pending:
                        md = await future
                        sent[(md.partition, md.offset)] = (kind, key, len(value),
                                                           zlib.crc32(value))
                    pending.clear()
            for future, kind, key, value in pending:
                md = await future
                sent[(md.partition, md.offset)] = (kind, key, len(value), zlib.crc32(value))
            del pending
            await raw.flush()
        finally:
            await raw.stop()

        await view.barrier(timeout=120)
        await eventually(lambda: view.stats.dead_lettered == POISON_COUNT, 120,
                         "every bad record dead-lettered")
        watching = False
        await watcher
        del raw
        gc.collect()
        memory_after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        growth = memory_after - memory_before

        stats = view.stats
        assert not_live == []
        assert view.status == "live"
        assert stats.decode_errors == POISON_COUNT
        assert stats.records_applied == applied_before + good_sent
        assert stats.dead_lettered == POISON_COUNT
        for session_id, snapshot in latest.items():
            assert view.get(session_id) == snapshot  # the last good snapshot is intact
        assert len(view) == len(bases)
        print(f"\npoison: {POISON_COUNT} bad records ({poison_bytes / 1e6:.1f} MB), "
              f"{good_sent} good updates, traced memory growth {growth / 1e6:.2f} MB")
        assert growth < 20e6, f"memory grew by {growth / 1e6:.1f} MB"
    finally:
        watching = False
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        await view.stop()

    # the dead-letter topic holds every bad record, with its source coordinates and reason
    letters = await read_log(proxy.address, dead_letter_topic, timeout=120)
    assert len(letters) == POISON_COUNT
    seen: set[tuple[int, int]] = set()
    for letter in letters:
        headers = dict(letter.headers)
        assert headers["snapbus.source.topic"] == topic_name.encode()
        source = (int(headers["snapbus.source.partition"]), int(headers["snapbus.source.offset"]))
        assert source in sent, f"dead letter for {source}, which was not poison"
        kind, key, size, crc = sent[source]
        assert letter.key == f"{topic_name}:{source[0]}:{source[1]}".encode()
        assert headers["snapbus.error.reason"] == EXPECTED_REASON[kind].encode(), kind
        assert headers["snapbus.source.key"] == (key or b"")
        assert headers["snapbus.error.message"]
        value = letter.value or b""
        assert (len(value), zlib.crc32(value)) == (size, crc)
        seen.add(source)
    assert seen == set(sent)


async def test_bad_latest_records_found_by_a_starting_view_are_dead_lettered_as_they_are(
    proxy: FaultProxy, topic_name: str
) -> None:
    # the initial replay keeps only each key's latest value, not its record: a bad one is
    # looked up in the log again, so it is reported and dead-lettered with its own offset
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    dead_letter_topic = f"{topic_name}.dlq"
    bases = [make_snapshot(agent_name=f"agent-{i}") for i in range(6)]
    valid = encode(make_snapshot())
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many(bases)
    poison: list[tuple[str, bytes | None, bytes]] = [
        ("garbage", bases[0].key.encode(), b"\x00 not avro"),
        ("empty", bases[1].key.encode(), b""),
        ("unknown_fingerprint", bases[2].key.encode(), MARKER + b"\xee" * 8 + valid[10:]),
        ("bad_key", b"not-a-uuid", valid),
        ("mismatched_key", bases[3].key.encode(), valid),
    ]
    if KEYLESS_RECORDS_STORED:
        poison.append(("bad_key", None, valid))
    sent: dict[tuple[int, int], tuple[str, bytes | None]] = {}
    raw = AIOKafkaProducer(bootstrap_servers=proxy.address, acks="all")
    await raw.start()
    try:
        for kind, key, value in poison:
            md = await (await raw.send(topic_name, value, key=key))
            sent[(md.partition, md.offset)] = (kind, key)
        update = bases[4].replace(state="merged")  # a good record after them all
        await (await raw.send(topic_name, encode(update), key=update.key.encode()))
    finally:
        await raw.stop()

    async with new_view(config, dead_letter_topic=dead_letter_topic) as view:
        assert view.status == "live"
        assert view.stats.decode_errors == len(poison)
        for base in bases:  # the last good snapshot of every poisoned session
            assert view.get(base.session_id) == (update if base is bases[4] else base)
        assert len(view) == len(bases)
        await eventually(lambda: view.stats.dead_lettered == len(poison), WAIT_S,
                         "every bad latest record dead-lettered")

    letters = await read_log(proxy.address, dead_letter_topic)
    found = {}
    for letter in letters:
        headers = dict(letter.headers)
        source = (int(headers["snapbus.source.partition"]), int(headers["snapbus.source.offset"]))
        found[source] = headers["snapbus.error.reason"].decode()
        kind, key = sent[source]
        assert headers["snapbus.source.key"] == (key or b"")
    assert found == {source: EXPECTED_REASON[kind] for source, (kind, _) in sent.items()}


# ---------------------------------------------------------------------------- bad input


async def test_bad_input_is_rejected_clearly_and_changes_nothing(
    proxy: FaultProxy, topic_name: str
) -> None:
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    delete_topic = f"{topic_name}-delete"
    admin = AIOKafkaAdminClient(bootstrap_servers=proxy.address)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(delete_topic, 3, 1,
                                            topic_configs={"cleanup.policy": "delete"})])
    finally:
        await admin.close()
    unreachable = KafkaConfig(f"127.0.0.1:{free_port()}", topic_name, connect_timeout_s=1)
    quick = config.replace(connect_timeout_s=1)
    loop = asyncio.get_running_loop()

    async with SnapshotPublisher(config, max_value_bytes=2000) as publisher, \
            new_view(config) as view:
        seeded = [make_snapshot(agent_name=f"agent-{i}") for i in range(5)]
        await publisher.publish_many(seeded)
        await view.barrier(timeout=WAIT_S)
        before = view_state(view)
        log_before = len(await read_log(proxy.address, topic_name))
        fresh = make_snapshot(agent_name="never stored")
        oversized = make_snapshot(intent="x" * 5000)

        async def start(client: SnapshotPublisher | SnapshotView) -> None:
            try:
                await client.start()
            finally:
                await client.stop()

        async def with_fault(apply: Callable[[], None], call: Awaitable[Any]) -> None:
            apply()
            try:
                await call
            finally:
                proxy.heal()

        def sync(func: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
            async def call() -> Any:
                return func()
            return call

        cases: list[tuple[str, Callable[[], Awaitable[Any]], type[Exception], list[str]]] = [
            # malformed UUIDs
            ("session id", sync(lambda: make_snapshot(session_id="1234-not-a-uuid")),
             ValidationError, ["session_id", "not a valid UUID", "1234-not-a-uuid"]),
            ("empty repo id", sync(lambda: make_snapshot(repo_id=" ")),
             ValidationError, ["repo_id", "empty"]),
            ("changeset id type", sync(lambda: make_snapshot(changeset_id=42)),
             ValidationError, ["changeset_id", "int"]),
            ("evict id", lambda: publisher.evict("not-a-uuid"),
             ValidationError, ["session_id", "not-a-uuid"]),
            ("view read id", sync(lambda: view.get("{broken")),
             ValidationError, ["session_id", "{broken"]),
            # non-string fields and non-snapshots
            ("agent id type", sync(lambda: make_snapshot(agent_id=None)),
             ValidationError, ["agent_id", "must be a string", "NoneType"]),
            ("intent bytes", sync(lambda: make_snapshot(intent=b"bytes")),
             ValidationError, ["intent", "must be a string", "bytes"]),
            ("publish a dict", lambda: publisher.publish(fresh.to_dict()),  # type: ignore[arg-type]
             ValidationError, ["WorkspaceSnapshot", "dict"]),
            ("publish_many with one bad item",
             lambda: publisher.publish_many([fresh, "oops"]),  # type: ignore[list-item]
             ValidationError, ["WorkspaceSnapshot", "str"]),
            # oversized intent
            ("oversized", lambda: publisher.publish(oversized),
             ValidationError, ["2000-byte limit", "intent", str(oversized.session_id)]),
            ("publish_many with one oversized", lambda: publisher.publish_many([fresh, oversized]),
             ValidationError, ["2000-byte limit"]),
            # bad topic names
            ("topic with space", sync(lambda: KafkaConfig(proxy.address, "bad topic")),
             ValidationError, ["invalid topic name", "'bad topic'"]),
            ("topic too long", sync(lambda: config.replace(topic="t" * 250)),
             ValidationError, ["invalid topic name", "1-249 characters"]),
            ("topic ..", sync(lambda: config.replace(topic="..")),
             ValidationError, ["invalid topic name", "'..'"]),
            ("dead-letter topic", sync(lambda: new_view(config, dead_letter_topic="dlq/x")),
             ValidationError, ["invalid topic name", "'dlq/x'"]),
            ("bootstrap without port", sync(lambda: KafkaConfig("localhost", topic_name)),
             ConfigError, ["invalid bootstrap server", "'localhost'", "host:port"]),
            # a topic that is not compacted
            ("publisher on delete topic",
             lambda: start(SnapshotPublisher(config.replace(topic=delete_topic))),
             TopicError, [delete_topic, "cleanup.policy=delete", "not compact"]),
            ("view on delete topic", lambda: start(new_view(config.replace(topic=delete_topic))),
             TopicError, [delete_topic, "cleanup.policy=delete", "not compact"]),
            # no broker there, a broker that refuses connections, one that never answers
            ("publisher, nothing listening", lambda: start(SnapshotPublisher(unreachable)),
             KafkaUnavailableError, ["cannot reach Kafka", unreachable.bootstrap_servers]),
            ("view, nothing listening", lambda: start(new_view(unreachable)),
             KafkaUnavailableError, ["cannot reach Kafka", unreachable.bootstrap_servers]),
            ("publisher, connections refused",
             lambda: with_fault(proxy.refuse, start(SnapshotPublisher(quick))),
             KafkaUnavailableError, ["cannot reach Kafka", proxy.address]),
            ("view, black hole", lambda: with_fault(proxy.stall, start(new_view(quick))),
             KafkaUnavailableError, ["cannot reach Kafka", proxy.address]),
        ]
        for name, call, error, needles in cases:
            started = loop.time()
            with pytest.raises(error) as info:
                await asyncio.wait_for(call(), 30)  # a hang fails the test instead
            assert loop.time() - started < 15, f"{name}: took {loop.time() - started:.1f} s"
            message = str(info.value)
            assert "\n" not in message, f"{name}: not one line: {message!r}"
            for needle in needles:
                assert needle in message, f"{name}: {needle!r} not in {message!r}"
            await view.barrier(timeout=WAIT_S)
            assert view_state(view) == before, f"{name} changed the view"
        assert fresh.session_id not in view
        assert len(await read_log(proxy.address, topic_name)) == log_before
        assert await read_log(proxy.address, delete_topic) == []
