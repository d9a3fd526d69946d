"""SnapshotView against the real broker: convergence, read-your-writes, changes, bad records.

No test sleeps to synchronise: they wait on `wait_for(receipt)`, `barrier()`, change streams, or
`eventually(predicate)` (a condition wait with a timeout).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import random
import socket
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from snapbus import reader as reader_module
from snapbus.codec import MARKER, encode
from snapbus.config import KafkaConfig
from snapbus.errors import (
    KafkaUnavailableError,
    TopicError,
    ValidationError,
    ViewError,
)
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.reader import PartitionReader
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import DEFAULT_PARTITIONS, ensure_topic
from snapbus.view import _APPLY_CHUNK, Change, ChangeStream, SnapshotView
from tests.helpers import KEYLESS_RECORDS_STORED, eventually, list_topics, make_snapshot

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

FETCH_WAIT_MS = 20
WAIT_S = 30.0
SMALL_FETCHES = {"fetch_max_bytes": 512, "max_partition_fetch_bytes": 512}
"""Consumer options that make a replay take many fetches (a few records each)."""


# ---------------------------------------------------------------------------- helpers


def new_view(config: KafkaConfig, **options: Any) -> SnapshotView:
    return SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS, **options)


async def next_change(stream: ChangeStream, timeout: float = WAIT_S) -> Change:
    return await asyncio.wait_for(stream.__anext__(), timeout)


async def create_plain_topic(bootstrap_servers: str, topic: str) -> None:
    """A topic without configs: the default ``delete`` cleanup policy."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        await admin.close()


async def collect(stream: ChangeStream, into: list[Change]) -> None:
    async for change in stream:
        into.append(change)


# ---------------------------------------------------------------------------- the model


Pair = tuple[WorkspaceSnapshot | None, WorkspaceSnapshot | None]


@dataclasses.dataclass(frozen=True)
class Op:
    kind: Literal["publish", "touch", "evict"]
    session_id: uuid.UUID
    snapshot: WorkspaceSnapshot | None = None


@dataclasses.dataclass
class Plan:
    ops: dict[uuid.UUID, list[Op]]
    """Each session's operations, in the order they are published."""
    model: dict[uuid.UUID, WorkspaceSnapshot]
    """The expected final state: every session's last snapshot unless evicted last."""
    expected_changes: dict[uuid.UUID, list[Pair]]
    """Each session's expected (old, new) changes, in order."""
    repos: list[uuid.UUID]
    agents: list[str]
    states: list[str]

    @property
    def total_ops(self) -> int:
        return sum(len(ops) for ops in self.ops.values())

    @property
    def evictions(self) -> int:
        return sum(op.kind == "evict" for ops in self.ops.values() for op in ops)


def plan_workload(seed: int, sessions: int = 40, ops: int = 600) -> Plan:
    """Random session lifecycles: create, update state/intent/owner, touch, evict, re-create."""
    rng = random.Random(seed)

    def rand_uuid() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    repos = [rand_uuid() for _ in range(5)]
    agents = [f"auth0|{i:04d}" for i in range(6)]
    states = ["active", "submitted", "merged", "abandoned", "paused-by-newer-pod"]
    session_ids = [rand_uuid() for _ in range(sessions)]

    def fresh(session_id: uuid.UUID) -> WorkspaceSnapshot:
        agent = rng.choice(agents)
        return WorkspaceSnapshot(
            session_id=session_id,
            repo_id=rng.choice(repos),
            agent_id=agent,
            agent_name=f"agent-{agents.index(agent)}",
            changeset_id=rand_uuid(),
            intent=rng.choice(["", "fix bug", "ünïcödé 🚀", "x" * rng.randrange(1, 300)]),
            base_commit=f"{rng.getrandbits(160):040x}",
            state=rng.choice(states),
            mode=rng.choice(["ephemeral", "persistent"]),
        )

    current: dict[uuid.UUID, WorkspaceSnapshot] = {}
    planned: dict[uuid.UUID, list[Op]] = {sid: [] for sid in session_ids}
    changes: dict[uuid.UUID, list[Pair]] = {sid: [] for sid in session_ids}
    for _ in range(ops):
        sid = rng.choice(session_ids)
        old = current.get(sid)
        roll = rng.random()
        new: WorkspaceSnapshot | None
        if old is None:
            if roll < 0.1:  # tombstone of a session nobody knows
                planned[sid].append(Op("evict", sid))
                continue
            new = fresh(sid)
            planned[sid].append(Op("publish", sid, new))
        elif roll < 0.3:
            new = old.replace(state=rng.choice(states))  # may equal old: no change then
            planned[sid].append(Op("publish", sid, new))
        elif roll < 0.5:
            new = old.replace(intent=f"step {rng.randrange(10**6)}")
            planned[sid].append(Op("publish", sid, new))
        elif roll < 0.6:
            agent = rng.choice(agents)
            new = old.replace(repo_id=rng.choice(repos), agent_id=agent)
            planned[sid].append(Op("publish", sid, new))
        elif roll < 0.75:
            new = old
            planned[sid].append(Op("touch", sid, old))
        else:
            new = None
            planned[sid].append(Op("evict", sid))
        if new is None:
            current.pop(sid, None)
        else:
            current[sid] = new
        if old != new:
            changes[sid].append((old, new))
    return Plan(planned, current, changes, repos, agents, states)


@dataclasses.dataclass
class Capture:
    """What one view answered, taken while it was live."""

    content: dict[uuid.UUID, WorkspaceSnapshot]
    length: int
    by_repo: dict[uuid.UUID, list[WorkspaceSnapshot]]
    by_agent: dict[str, list[WorkspaceSnapshot]]
    by_state: dict[str, list[WorkspaceSnapshot]]
    selected: dict[tuple[uuid.UUID, str, str], list[WorkspaceSnapshot]]
    records_applied: int
    tombstones: int
    decode_errors: int


def capture(view: SnapshotView, plan: Plan) -> Capture:
    content = {sid: view[sid] for sid in view}
    stats = view.stats
    return Capture(
        content=content,
        length=len(view),
        by_repo={r: view.by_repo(r) for r in plan.repos},
        by_agent={a: view.by_agent(a) for a in plan.agents},
        by_state={s: view.by_state(s) for s in plan.states},
        selected={(r, a, s): view.select(repo_id=r, agent_id=a, state=s)
                  for r, a, s in itertools.product(plan.repos, plan.agents, plan.states)},
        records_applied=stats.records_applied,
        tombstones=stats.tombstones,
        decode_errors=stats.decode_errors,
    )


@dataclasses.dataclass
class WorkloadResult:
    plan: Plan
    running: list[Capture]
    """The views that followed the topic while it was written."""
    late: Capture
    """A view started after every write."""
    changes: list[list[Change]]
    """Every change each running view streamed, subscribed before the first write."""
    warm_up_records: int
    """Tombstones of unknown sessions written before the workload (see `warm_up`)."""


async def warm_up(publisher: SnapshotPublisher, partitions: int, seed: int) -> int:
    """Write two records to every partition, one at a time; return how many were written.

    Works around a bug of the embedded broker (Tansu 0.6.0, memory storage): when several
    producers write the very first records of a fresh partition concurrently, a record at
    offset 0 or 1 is sometimes acknowledged and counted in the high watermark but never served
    by fetches (about 1 run in 30 of this workload with one record per partition here; one
    lost record that a later write of the same session hid still showed as an applied count
    one short). Later writes are not affected. The records are tombstones of sessions nobody
    knows: they change no view and no stream.
    """
    rng = random.Random(seed)
    partitioner = DefaultPartitioner()
    written: dict[int, int] = {}
    while len(written) < partitions or min(written.values()) < 2:
        session_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        partition = partitioner(str(session_id).encode(), list(range(partitions)), [])
        if written.get(partition, 0) < 2:
            receipt = await publisher.evict(session_id)
            assert receipt.partition == partition
            written[partition] = written.get(partition, 0) + 1
    return sum(written.values())


async def run_session(publisher: SnapshotPublisher, ops: list[Op]) -> None:
    for op in ops:
        if op.kind == "evict":
            receipt = await publisher.evict(op.session_id)
        elif op.kind == "touch":
            assert op.snapshot is not None
            receipt = await publisher.touch(op.snapshot)
        else:
            assert op.snapshot is not None
            receipt = await publisher.publish(op.snapshot)
        assert receipt.session_id == op.session_id


@pytest.fixture(scope="module")
async def workload(broker: BrokerAddress) -> WorkloadResult:
    """3 publishers and 3 views (separate clients) over one topic, driven by a seeded plan.

    Each session belongs to one publisher, which publishes its operations in order (awaiting
    each acknowledgement), so the per-session order is the plan's order. Sessions run
    concurrently, within and across publishers.
    """
    plan = plan_workload(seed=20240611)
    config = KafkaConfig(broker.bootstrap_servers, f"test-{uuid.uuid4().hex[:12]}")
    await ensure_topic(config)
    publishers = [SnapshotPublisher(config.replace(client_id=f"pod-{i}")) for i in range(3)]
    views = [new_view(config.replace(client_id=f"view-{i}")) for i in range(3)]
    collected: list[list[Change]] = [[] for _ in views]
    collectors: list[asyncio.Task[None]] = []
    try:
        for publisher in publishers:
            await publisher.start()
        warm_up_records = await warm_up(publishers[0], DEFAULT_PARTITIONS, seed=1)
        for view, into in zip(views, collected, strict=True):
            await view.start()
            collectors.append(asyncio.create_task(collect(view.changes(), into)))

        session_ids = sorted(plan.ops)
        await asyncio.gather(*(
            run_session(publishers[i % len(publishers)], plan.ops[sid])
            for i, sid in enumerate(session_ids)
        ))

        await asyncio.gather(*(view.barrier(timeout=WAIT_S) for view in views))
        running = [capture(view, plan) for view in views]
        for view in views:
            assert view.status == "live"

        # small fetches make the replay take many round trips, so that start() returning
        # complete is really tested (the broker may return a whole partition per fetch)
        late_view = new_view(
            config.replace(client_id="view-late"), consumer_options={"fetch_max_bytes": 4096}
        )
        async with late_view:
            assert late_view.status == "live"
            late = capture(late_view, plan)
    finally:
        for view in views:
            await view.stop()  # ends the change streams
        for publisher in publishers:
            await publisher.stop()
        done, pending = await asyncio.wait(collectors, timeout=WAIT_S) if collectors else ((), ())
        for task in pending:
            task.cancel()
    assert not pending, "change streams did not end when their views stopped"
    for task in done:
        task.result()
    return WorkloadResult(plan, running, late, collected, warm_up_records)


async def test_plan_is_a_real_workout(workload: WorkloadResult) -> None:
    """The seeded plan exercises every lifecycle path (guards the other tests' meaning)."""
    plan = workload.plan
    kinds = [op.kind for ops in plan.ops.values() for op in ops]
    assert plan.total_ops == 600
    assert {"publish", "touch", "evict"} <= set(kinds)
    recreated = [
        sid for sid, ops in plan.ops.items()
        if any(a.kind == "evict" and b.kind == "publish" for a, b in itertools.pairwise(ops))
    ]
    assert recreated, "some session should be evicted and created again"
    assert 0 < len(plan.model) < len(plan.ops)  # some sessions end evicted, some alive


async def test_every_view_converges_to_the_model(workload: WorkloadResult) -> None:
    model = workload.plan.model
    for view in workload.running:
        assert view.content == model
        assert view.length == len(model)
        assert view.decode_errors == 0
        # every record of the log was applied, touches and unknown tombstones included
        assert view.records_applied == workload.plan.total_ops + workload.warm_up_records
        assert view.tombstones == workload.plan.evictions + workload.warm_up_records


async def test_indexes_match_the_model(workload: WorkloadResult) -> None:
    model = workload.plan.model
    for view in [*workload.running, workload.late]:
        for repo, found in view.by_repo.items():
            expected = {s.session_id for s in model.values() if s.repo_id == repo}
            assert {s.session_id for s in found} == expected
            assert sorted(found, key=str) == sorted(
                (model[sid] for sid in expected), key=str
            )
        for agent, found in view.by_agent.items():
            expected = {s.session_id for s in model.values() if s.agent_id == agent}
            assert {s.session_id for s in found} == expected
            assert len(found) == len(expected)
        for state, found in view.by_state.items():
            expected = {s.session_id for s in model.values() if s.state == state}
            assert {s.session_id for s in found} == expected
            assert len(found) == len(expected)
        for (repo, agent, state), found in view.selected.items():
            expected = {s.session_id for s in model.values()
                        if (s.repo_id, s.agent_id, s.state) == (repo, agent, state)}
            assert {s.session_id for s in found} == expected
            assert len(found) == len(expected)
        assert sum(len(v) for v in view.selected.values()) == len(model)
        # every live session is found by each index
        assert sum(len(v) for v in view.by_repo.values()) == len(model)
        assert sum(len(v) for v in view.by_agent.values()) == len(model)
        assert sum(len(v) for v in view.by_state.values()) == len(model)


async def test_late_view_equals_views_that_ran_throughout(workload: WorkloadResult) -> None:
    late = workload.late
    for view in workload.running:
        assert late.content == view.content
        assert late.length == view.length
        for repo in view.by_repo:
            assert set(late.by_repo[repo]) == set(view.by_repo[repo])
        for agent in view.by_agent:
            assert set(late.by_agent[agent]) == set(view.by_agent[agent])
        for state in view.by_state:
            assert set(late.by_state[state]) == set(view.by_state[state])
    assert late.content == workload.plan.model
    assert late.decode_errors == 0


async def test_change_streams_chain_per_session(workload: WorkloadResult) -> None:
    plan = workload.plan
    for changes in workload.changes:
        per_session: dict[uuid.UUID, list[Change]] = {}
        for change in changes:
            if change.new is not None:
                assert change.new.session_id == change.session_id
            if change.old is not None:
                assert change.old.session_id == change.session_id
            assert change.old != change.new  # an equal republish is not a change
            per_session.setdefault(change.session_id, []).append(change)
        for sid, chain in per_session.items():
            assert chain[0].old is None  # the topic was empty when the stream subscribed
            for before, after in itertools.pairwise(chain):
                assert after.old == before.new
            assert chain[-1].new == plan.model.get(sid)
        # exactly the changes the plan implies: touches and unknown tombstones produce none
        expected = {sid: pairs for sid, pairs in plan.expected_changes.items() if pairs}
        got = {sid: [(c.old, c.new) for c in chain] for sid, chain in per_session.items()}
        assert got == expected
        # sessions alive at the end but never changed cannot exist; evicted ones end in None
        for sid in plan.ops:
            if sid not in per_session:
                assert sid not in plan.model


# ---------------------------------------------------------------------------- read your writes


async def test_wait_for_receipt_gives_read_your_writes(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    rng = random.Random(7)
    async with SnapshotPublisher(config) as publisher, new_view(config) as first, new_view(
        config.replace(client_id="other-pod")
    ) as second:
        sessions = [make_snapshot() for _ in range(5)]
        for step in range(30):
            snapshot = rng.choice(sessions).replace(intent=f"step {step}")
            receipt = await publisher.publish(snapshot)
            for view in (first, second):
                await view.wait_for(receipt, timeout=WAIT_S)
                assert view.get(snapshot.session_id) == snapshot
                assert view[snapshot.session_id] == snapshot
            sessions = [snapshot if s.session_id == snapshot.session_id else s
                        for s in sessions]
            # a receipt already applied returns at once
            await first.wait_for(receipt, timeout=WAIT_S)

        gone = sessions[0]
        receipt = await publisher.evict(gone.session_id)
        for view in (first, second):
            await view.wait_for(receipt, timeout=WAIT_S)
            assert gone.session_id not in view
            assert view.get(gone.session_id) is None

        # barrier(): everything acknowledged before the call is visible after it
        batch = [s.replace(state="merged") for s in sessions[1:]]
        await publisher.publish_many(batch)
        for view in (first, second):
            await view.barrier(timeout=WAIT_S)
            for snapshot in batch:
                assert view.get(snapshot.session_id) == snapshot
            assert len(view) == len(batch)


async def test_idle_barrier_takes_one_round_trip_not_fetch_waits(
    broker: BrokerAddress, topic_name: str
) -> None:
    # The view long-polls for 10 s; a barrier that waited for its own fetches would take
    # about two of those. One that asks the broker for the log ends returns at once.
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config) as publisher:
        sessions = [make_snapshot() for _ in range(20)]
        await publisher.publish_many(sessions)
        async with SnapshotView(config, fetch_max_wait_ms=10_000) as view:
            loop = asyncio.get_running_loop()
            for _ in range(3):
                began = loop.time()
                await view.barrier(timeout=WAIT_S)
                assert loop.time() - began < 2.0
            assert {s.session_id for s in sessions} == set(view)


async def test_barrier_falls_back_to_its_own_fetches(
    broker: BrokerAddress, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # when the log ends cannot be asked (a leader unknown, a request failed), the target comes
    # from the view's next fetch responses: still everything acknowledged before the call
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        async def no_log_ends() -> None:
            return None

        monkeypatch.setattr(view._reader, "log_ends", no_log_ends)
        for round_ in range(3):
            batch = [make_snapshot(agent_name=f"agent-{round_}") for _ in range(10)]
            await publisher.publish_many(batch)
            await view.barrier(timeout=WAIT_S)
            for snapshot in batch:
                assert view.get(snapshot.session_id) == snapshot


async def test_wait_for_rejects_receipt_of_another_topic(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    foreign = Receipt("some-other-topic", 0, 0, -1, str(uuid.uuid4()))
    async with new_view(config) as view:
        with pytest.raises(ViewError, match="some-other-topic"):
            await view.wait_for(foreign, timeout=WAIT_S)


# ---------------------------------------------------------------------------- changes


async def test_changes_skip_touches_and_unknown_tombstones(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshot = make_snapshot()
    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        stream = view.changes()

        await publisher.publish(snapshot)
        assert await next_change(stream) == Change(snapshot.session_id, None, snapshot)

        # none of these changes anything; the next change seen must be the update after them
        await publisher.touch(snapshot)
        await publisher.publish(snapshot)
        await publisher.publish_many([snapshot, snapshot])
        await publisher.evict(uuid.uuid4())
        updated = snapshot.replace(state="submitted")
        await publisher.publish(updated)
        assert await next_change(stream) == Change(snapshot.session_id, snapshot, updated)

        await publisher.evict(snapshot.session_id)
        await publisher.evict(snapshot.session_id)  # already gone: no second change
        await publisher.publish(snapshot)
        assert await next_change(stream) == Change(snapshot.session_id, updated, None)
        assert await next_change(stream) == Change(snapshot.session_id, None, snapshot)

        # the view counts them all as applied records nonetheless
        await view.barrier(timeout=WAIT_S)
        assert view.stats.records_applied == 10
        assert view.stats.tombstones == 3

        # a stream subscribed later sees only later changes
        later = view.changes()
        final = snapshot.replace(intent="last")
        await publisher.publish(final)
        assert await next_change(later) == Change(snapshot.session_id, snapshot, final)
        assert await next_change(stream) == Change(snapshot.session_id, snapshot, final)

    # stopping the view ends the streams
    with pytest.raises(StopAsyncIteration):
        await next_change(stream)
    with pytest.raises(StopAsyncIteration):
        await next_change(later)


async def test_closed_stream_unsubscribes(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        async with view.changes() as stream:
            pass
        with pytest.raises(StopAsyncIteration):
            await next_change(stream)
        # the view goes on applying records with no subscriber
        receipt = await publisher.publish(make_snapshot())
        await view.wait_for(receipt, timeout=WAIT_S)
        assert len(view) == 1


async def test_slow_change_subscriber_gets_an_error_not_a_gap(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshots = [make_snapshot() for _ in range(5)]
    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        stream = view.changes(max_pending=3)
        await publisher.publish_many(snapshots)
        await view.barrier(timeout=WAIT_S)

        received = [await next_change(stream) for _ in range(3)]
        assert {c.new for c in received} <= set(snapshots)
        assert all(c.old is None for c in received)
        with pytest.raises(ViewError, match="fell more than 3"):
            await next_change(stream)
        with pytest.raises(StopAsyncIteration):
            await next_change(stream)

        # the view itself is unaffected
        assert view.status == "live"
        assert {view[s.session_id] for s in snapshots} == set(snapshots)


# ---------------------------------------------------------------------------- bad records


async def test_poison_records_are_counted_and_skipped(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    goods = [make_snapshot(agent_name=f"agent-{i}") for i in range(5)]
    garbage, empty, unknown_schema, truncated, mismatched = goods
    stranger = make_snapshot()
    valid = encode(stranger)
    poison: list[tuple[bytes | None, bytes]] = [
        (garbage.key.encode(), b"\x00\x01 definitely not avro"),
        (empty.key.encode(), b""),
        (unknown_schema.key.encode(), MARKER + b"\xde\xad\xbe\xef\xde\xad\xbe\xef" + valid[10:]),
        (truncated.key.encode(), encode(truncated.replace(state="merged"))[:-4]),
        (mismatched.key.encode(), valid),  # the value is about another session
        (b"not-a-uuid", valid),
        (stranger.key.upper().encode(), valid),  # not the canonical key form
    ]
    if KEYLESS_RECORDS_STORED:
        poison.append((None, valid))

    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        await publisher.publish_many(goods)
        await view.barrier(timeout=WAIT_S)
        applied_before = view.stats.records_applied
        assert applied_before == len(goods)

        raw = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        await raw.start()
        try:
            sent = [await raw.send(topic_name, value, key=key) for key, value in poison]
            await asyncio.gather(*sent)
        finally:
            await raw.stop()

        await view.barrier(timeout=WAIT_S)
        stats = view.stats
        assert view.status == "live"
        assert stats.status == "live"
        assert stats.decode_errors == len(poison)
        assert stats.records_applied == applied_before
        for good in goods:
            assert view.get(good.session_id) == good
        assert stranger.session_id not in view
        assert len(view) == len(goods)

        # good records after the poison are applied as usual
        fixed = garbage.replace(state="submitted")
        receipt = await publisher.publish(fixed)
        await view.wait_for(receipt, timeout=WAIT_S)
        assert view.get(garbage.session_id) == fixed
        assert view.status == "live"

    # a view replaying the same log from scratch reaches the same state; it decodes only each
    # session's latest record, so the garbage one, replaced by `fixed`, is not even looked at
    async with new_view(config, decode="eager") as replayed:
        assert replayed.status == "live"
        assert replayed.stats.decode_errors == len(poison) - 1
        assert replayed.get(garbage.session_id) == fixed
        for good in goods[1:]:
            assert replayed.get(good.session_id) == good
        assert len(replayed) == len(goods)

    # decoding lazily, the truncated value's indexed fields read fine: it is found bad on
    # first read, is absent from then on, and the session's last good snapshot is restored
    # from the log (docs/bad-values.md)
    async with new_view(config) as lazy:
        assert lazy.stats.decode_errors == len(poison) - 2
        assert lazy.get(truncated.session_id) is None
        await eventually(lambda: lazy.get(truncated.session_id) == truncated,
                         what="the last good snapshot restored")
        await eventually(lambda: lazy.stats.decode_errors == len(poison) - 1,
                         what="the bad record reported")
        assert lazy.by_state("merged") == []  # the bad value's state is no longer indexed
        for good in goods[1:]:
            assert lazy.get(good.session_id) == good
        assert len(lazy) == len(goods)


# ---------------------------------------------------------------------------- topic checks


async def test_missing_topic_without_ensure_raises_and_does_not_create(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    view = new_view(config, ensure_topic=False)

    with pytest.raises(TopicError, match="does not exist"):
        await view.start()

    assert view.status == "stopped"
    assert topic_name not in await list_topics(broker.bootstrap_servers)
    await view.stop()  # harmless after a failed start


async def test_delete_policy_topic_is_refused(broker: BrokerAddress, topic_name: str) -> None:
    await create_plain_topic(broker.bootstrap_servers, topic_name)
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    view = new_view(config)
    with pytest.raises(TopicError, match=r"cleanup\.policy"):
        await view.start()
    assert view.status == "stopped"

    # an explicit opt-out reads it anyway
    async with new_view(config, allow_non_compacted=True) as accepting:
        assert accepting.status == "live"
        assert len(accepting) == 0


async def test_view_ensures_a_missing_topic_compacted(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with new_view(config) as view:
        assert view.status == "live"
        assert len(view) == 0
        await view.barrier(timeout=WAIT_S)
    info = await ensure_topic(config)
    assert info.compacted is True
    assert info.created is False


async def test_unreachable_cluster_raises_unavailable(topic_name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = KafkaConfig(f"127.0.0.1:{port}", topic_name, connect_timeout_s=1.0)
    for ensure in (True, False):
        view = new_view(config, ensure_topic=ensure)
        # the bound is generous: the point is that start gives up instead of hanging
        with pytest.raises(KafkaUnavailableError):
            await asyncio.wait_for(view.start(), timeout=15)
        assert view.status == "stopped"
        await view.stop()


# ---------------------------------------------------------------------------- lifecycle, stats


async def test_stats_and_status(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshots = [make_snapshot(state="active" if i % 2 else "merged") for i in range(10)]
    async with SnapshotPublisher(config) as publisher:
        receipts = await publisher.publish_many(snapshots)
        for snapshot in snapshots[:3]:
            await publisher.evict(snapshot.session_id)
        await publisher.evict(uuid.uuid4())  # unknown: applied, deletes nothing
        await publisher.touch(snapshots[5])

        view = new_view(config)
        assert view.status == "starting"
        assert view.stats.status == "starting"
        await view.start()
        try:
            # start returns once the view holds everything written before it
            assert view.status == "live"
            stats = view.stats
            assert stats.status_reason is None
            assert stats.catch_up_seconds is not None
            assert stats.sessions == 7 == len(view)
            assert stats.records_applied + stats.records_superseded == 15
            assert stats.tombstones == 4
            assert stats.decode_errors == 0
            for receipt in receipts:
                assert stats.last_offsets[receipt.partition] >= receipt.offset

            more = [make_snapshot() for _ in range(2)]
            await publisher.publish_many(more)
            await view.barrier(timeout=WAIT_S)
            stats = view.stats
            assert stats.sessions == 9
            assert stats.records_applied + stats.records_superseded == 17
            assert set(stats.lag) == set(range(DEFAULT_PARTITIONS))
            assert all(lag == 0 for lag in stats.lag.values()), stats.lag
            assert stats.status == "live"
        finally:
            await view.stop()
    assert view.status == "stopped"
    assert view.stats.status == "stopped"
    await view.stop()  # twice is fine


async def test_start_returns_complete_when_replay_takes_many_fetches(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshots = [make_snapshot() for _ in range(60)]
    async with SnapshotPublisher(config, linger_ms=0, partitions=2) as publisher:
        for snapshot in snapshots:  # one batch each
            await publisher.publish(snapshot)
        await publisher.evict(snapshots[0].session_id)

    async with new_view(config, consumer_options=SMALL_FETCHES) as view:
        # no barrier, no wait: start itself returned only once the replay was complete
        assert view.status == "live"
        assert len(view) == len(snapshots) - 1
        assert {view[s.session_id] for s in snapshots[1:]} == set(snapshots[1:])
        assert snapshots[0].session_id not in view
        assert view.stats.records_applied + view.stats.records_superseded == len(snapshots) + 1


async def test_slow_start_degrades_then_goes_live(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshots = [make_snapshot() for _ in range(60)]
    async with SnapshotPublisher(config, linger_ms=0) as publisher:
        for snapshot in snapshots:  # one batch each: catching up takes many small fetches
            await publisher.publish(snapshot)

    # a start timeout of zero cannot be met: start returns degraded and replay goes on
    view = new_view(config, start_timeout_s=0.0, consumer_options=SMALL_FETCHES)
    await view.start()
    try:
        assert view.status == "degraded"
        assert view.status_reason is not None
        assert "not complete" in view.status_reason
        assert view.stats.catch_up_seconds is None

        await eventually(lambda: view.status == "live")
        assert view.status_reason is None
        assert view.stats.catch_up_seconds is not None
        assert len(view) == len(snapshots)
        assert {view[s.session_id] for s in snapshots} == set(snapshots)
    finally:
        await view.stop()


async def test_stop_fails_pending_waits(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config) as publisher:
        receipt = await publisher.publish(make_snapshot())
    future_receipt = dataclasses.replace(receipt, offset=receipt.offset + 1_000_000)

    view = new_view(config)
    await view.start()
    pending = asyncio.create_task(view.wait_for(future_receipt))
    await asyncio.sleep(0)  # let the task run up to its wait (a yield, not a delay)
    assert not pending.done()

    await view.stop()
    with pytest.raises(ViewError, match="stopped"):
        await asyncio.wait_for(pending, WAIT_S)
    await view.stop()

    with pytest.raises(ViewError):
        await view.wait_for(receipt)
    with pytest.raises(ViewError):
        await view.barrier()
    with pytest.raises(ViewError):
        await view.start()  # a stopped view cannot be restarted


async def test_wait_before_start_raises(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    view = new_view(config)
    receipt = Receipt(topic_name, 0, 0, -1, str(uuid.uuid4()))
    with pytest.raises(ViewError, match="not running"):
        await view.wait_for(receipt)
    with pytest.raises(ViewError, match="not running"):
        await view.barrier()
    await view.stop()


# ---------------------------------------------------------------------------- reads


async def test_reads_accept_uuid_forms_and_reject_garbage(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshot = make_snapshot()
    sid = snapshot.session_id
    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        await view.wait_for(await publisher.publish(snapshot), timeout=WAIT_S)

        for form in (sid, str(sid), str(sid).upper(), sid.hex, "{" + str(sid) + "}",
                     f"urn:uuid:{sid}"):
            assert view.get(form) == snapshot, form
            assert view[form] == snapshot
            assert form in view
        assert list(view) == [sid]
        assert view.snapshots() == [snapshot]

        for bad in ("not-a-uuid", "", "   ", str(sid) + "0", 42, None, b"bytes", [str(sid)], {}):
            with pytest.raises(ValidationError):
                view.get(bad)  # type: ignore[arg-type]
            assert bad not in view
        assert object() not in view

        unknown = uuid.uuid4()
        assert unknown not in view
        assert view.get(unknown) is None
        assert view.get(str(unknown), snapshot) is snapshot
        with pytest.raises(KeyError):
            view[unknown]

        assert view.by_repo(snapshot.repo_id) == [snapshot]
        assert view.by_repo(str(snapshot.repo_id).upper()) == [snapshot]
        assert view.by_repo(uuid.uuid4()) == []
        with pytest.raises(ValidationError):
            view.by_repo("not-a-uuid")
        assert view.by_agent(snapshot.agent_id) == [snapshot]
        assert view.by_agent("nobody") == []
        assert view.by_state("active") == [snapshot]
        assert view.by_state("merged") == []


async def test_reads_by_uuid_follow_deletes_and_returns(
    broker: BrokerAddress, topic_name: str
) -> None:
    # a read by uuid.UUID remembers the id's text: that must never outlive the session
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    repo = uuid.uuid4()
    snapshot = make_snapshot(repo_id=repo)
    sid = snapshot.session_id

    def fresh(u: uuid.UUID) -> uuid.UUID:  # an equal UUID that is another object
        return uuid.UUID(int=u.int)

    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        await view.wait_for(await publisher.publish(snapshot), timeout=WAIT_S)
        for _ in range(2):  # the first read by UUID, then the remembered one
            assert view.get(fresh(sid)) == snapshot
            assert view[fresh(sid)] == snapshot
            assert fresh(sid) in view
            assert view.by_repo(fresh(repo)) == [snapshot]

        await view.wait_for(await publisher.evict(sid), timeout=WAIT_S)
        assert view.get(fresh(sid)) is None
        assert fresh(sid) not in view
        with pytest.raises(KeyError):
            view[fresh(sid)]
        assert view.by_repo(fresh(repo)) == []

        again = snapshot.replace(intent="back again")
        await view.wait_for(await publisher.publish(again), timeout=WAIT_S)
        assert view.get(fresh(sid)) == again
        assert view[fresh(sid)] == again
        assert fresh(sid) in view
        assert view.by_repo(fresh(repo)) == [again]


async def test_stopped_view_is_freed_at_once_and_its_snapshots_still_read(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    written = [make_snapshot(agent_name=f"agent-{i}") for i in range(20)]
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many(written)
    async with new_view(config) as view:
        kept = view.snapshots()  # (decodes them: they outlive the view)
    enabled = gc.isenabled()
    gc.disable()  # no reference cycle may keep a stopped view's state alive
    try:
        ref = weakref.ref(view)
        del view
        assert ref() is None
    finally:
        if enabled:
            gc.enable()
    assert sorted(kept, key=lambda s: s.key) == sorted(written, key=lambda s: s.key)


async def test_index_groups_stay_exact_as_they_grow_and_shrink(
    broker: BrokerAddress, topic_name: str
) -> None:
    # small groups are kept as lists and large ones as sets: cross that line both ways
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    repo = uuid.uuid4()
    sessions = [make_snapshot(repo_id=repo, agent_id=f"agent-{i % 2}") for i in range(40)]
    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        for count in (1, 5, 33, 40):
            await publisher.publish_many(sessions[:count])
            await view.barrier(timeout=WAIT_S)
            assert sorted(s.key for s in view.by_repo(repo)) == sorted(
                s.key for s in sessions[:count])
        for gone in range(40):
            await publisher.evict(sessions[gone].session_id)
            if gone in (5, 20, 30, 38, 39):
                await view.barrier(timeout=WAIT_S)
                left = sessions[gone + 1:]
                assert sorted(s.key for s in view.by_repo(repo)) == sorted(s.key for s in left)
                assert sorted(s.key for s in view.select(repo_id=repo, agent_id="agent-1")) \
                    == sorted(s.key for s in left if s.agent_id == "agent-1")
        assert view.by_repo(repo) == []
        assert view.by_agent("agent-0") == []


@pytest.mark.parametrize("raw", [True, False])
async def test_fast_path_and_getmany_give_the_same_view(
    broker: BrokerAddress, topic_name: str, raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # snapbus reads aiokafka's fetch buffer itself (read_committed, the only isolation it
    # uses); with an aiokafka it does not know it goes through getmany: the same view
    if not raw:
        monkeypatch.setattr(reader_module, "_raw_fetch_supported", lambda consumer: False)
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    written = [make_snapshot(agent_name=f"agent-{i}") for i in range(30)]
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many(written[:20])
        async with new_view(config) as view:
            assert view._reader._raw == raw
            receipts = await publisher.publish_many(written[20:])
            await view.wait_for(receipts[-1], timeout=WAIT_S)
            await view.barrier(timeout=WAIT_S)
            assert sorted(view.snapshots(), key=lambda s: s.key) == sorted(
                written, key=lambda s: s.key)


@pytest.mark.parametrize("raw", [True, False])
async def test_read_returns_with_the_next_fetch_already_sent(
    broker: BrokerAddress, topic_name: str, raw: bool
) -> None:
    # While a view works through what one read returned and more records wait, the broker
    # should be reading them: a replay then fetches and applies at once, not in turn
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotPublisher(config, linger_ms=0) as publisher:
        await publisher.publish_many([make_snapshot() for _ in range(40)])
    reader = PartitionReader(config, consumer_options=SMALL_FETCHES)
    await reader.open()
    reader._raw = raw  # the fast path, or getmany
    try:
        connections = reader._consumer._client._conns.values()
        reads = 0
        while not reader.caught_up_to_start():
            if await reader.read(timeout_ms=100) and any(reader.lag().values()):
                reads += 1
                written = [type(request).__name__ for conn in connections
                           for _, request, _ in conn._requests]
                assert any(name.startswith("FetchRequest") for name in written), \
                    f"read returned before the next fetch was sent (awaiting answers: {written})"
        assert reads > 1
    finally:
        await reader.close()


async def test_a_read_applied_in_part_counts_as_unread(
    broker: BrokerAddress, topic_name: str, tmp_path: Path
) -> None:
    # A live view applies a large read in chunks and lets other coroutines run in between,
    # while the reader's positions already count the whole read. Meanwhile, wait_for must not
    # return for a record not applied yet, nor a checkpoint claim it: a restart from that
    # checkpoint would never read it
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    burst = [make_snapshot() for _ in range(3 * _APPLY_CHUNK)]
    path = tmp_path / "view.ckpt"
    async with SnapshotPublisher(config, partitions=1) as publisher, new_view(config) as view:
        consumer = view._reader._consumer
        consumer.pause(*consumer.assignment())  # the burst then comes in one read on resume
        await eventually(lambda: not consumer._fetcher._in_flight
                         and not consumer._fetcher._records, what="fetches drained")
        receipts = await publisher.publish_many(burst)
        last, receipt = burst[-1], receipts[-1]

        async def in_the_window(act: Any) -> bool:
            """Run `act` once the reader's position is past `last` and the view lacks it."""
            while last.session_id not in view:
                if view._reader.positions.get(receipt.partition, 0) > receipt.offset:
                    await act()
                    return True
                await asyncio.sleep(0)
            return False

        async def wait_then_read() -> None:
            await view.wait_for(receipt, timeout=WAIT_S)
            assert view.get(last.session_id) == last, "wait_for returned before the apply"

        async def save() -> None:
            await view.save_checkpoint(path)

        watchers = asyncio.gather(in_the_window(wait_then_read), in_the_window(save))
        view._reader.resume()
        assert await asyncio.wait_for(watchers, WAIT_S) == [True, True]
    async with new_view(config, checkpoint_path=path) as restarted:
        assert restarted.stats.checkpoint_sessions is not None
        assert restarted.get(last.session_id) == last
        assert len(restarted) == len(burst)
