"""Replay against the real broker: rebuild at an instant, bounded windows, history, export.

Phases are separated on record timestamps (the producer's CreateTime, taken from the receipts):
phase k ends at T_k, the largest timestamp among its receipts, and the next phase is only sent
once the wall clock has passed T_k + 50 ms (a condition wait, not a delay). No test sleeps to
synchronise or asserts on durations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner, Result

from snapbus.cli import cli, parse_time
from snapbus.codec import encode
from snapbus.config import KafkaConfig
from snapbus.errors import DecodeError, ValidationError
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.reader import Event
from snapbus.replay import event_to_json, history, rebuild, replay, write_jsonl
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import DEFAULT_PARTITIONS, describe_topic, ensure_topic
from snapbus.view import SnapshotView

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

UTC = datetime.timezone.utc
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
WAIT_S = 30.0
PHASE_GAP_MS = 50
FETCH_WAIT_MS = 20

State = dict[uuid.UUID, WorkspaceSnapshot]


# ---------------------------------------------------------------------------- helpers


def at(ms: int) -> datetime.datetime:
    """The exact instant `ms` milliseconds after the epoch, as an aware UTC datetime."""
    return EPOCH + datetime.timedelta(milliseconds=ms)


def now_ms() -> int:
    return int(time.time() * 1000)


async def wait_past(ms: int) -> None:
    """Wait until the wall clock is past `ms` (a condition wait on the clock)."""
    while now_ms() <= ms:  # noqa: ASYNC110 - nothing to signal: the condition is the clock
        await asyncio.sleep(0.01)


def make_snapshot(session_id: uuid.UUID | None = None, **changes: Any) -> WorkspaceSnapshot:
    fields: dict[str, Any] = {
        "session_id": session_id or uuid.uuid4(),
        "repo_id": uuid.uuid4(),
        "agent_id": "auth0|agent",
        "agent_name": "agent-1",
        "changeset_id": uuid.uuid4(),
        "intent": "refactor the parser ünïcödé 🚀",
        "base_commit": "0123456789abcdef0123456789abcdef01234567",
        "state": "active",
        "mode": "ephemeral",
    }
    fields.update(changes)
    return WorkspaceSnapshot(**fields)


def new_topic() -> str:
    return f"test-replay-{uuid.uuid4().hex[:12]}"


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in events]


def by_partition(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
    """Offsets per partition, in the order given."""
    out: dict[int, list[int]] = {}
    for partition, offset in pairs:
        out.setdefault(partition, []).append(offset)
    return out


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


async def view_state(config: KafkaConfig) -> State:
    async with SnapshotView(config, fetch_max_wait_ms=FETCH_WAIT_MS,
                            ensure_topic=False) as view:
        assert view.status == "live"
        return {s.session_id: s for s in view.snapshots()}


# ---------------------------------------------------------------------------- the phased log


@dataclasses.dataclass(frozen=True)
class Published:
    receipt: Receipt
    snapshot: WorkspaceSnapshot | None
    phase: int

    @property
    def where(self) -> tuple[int, int]:
        return (self.receipt.partition, self.receipt.offset)

    @property
    def ts(self) -> int:
        return self.receipt.timestamp_ms


@dataclasses.dataclass(frozen=True)
class Phased:
    config: KafkaConfig
    records: list[Published]
    """Every record of the topic, in publish order."""
    models: list[State]
    """The expected state after each phase."""
    boundaries: list[int]
    """T_k: the largest record timestamp of each phase."""
    sessions: list[uuid.UUID]
    ghost: uuid.UUID
    """A session that only ever got a tombstone."""

    def window(self, lo: int | None, hi: int | None) -> list[Published]:
        return [r for r in self.records
                if (lo is None or r.ts >= lo) and (hi is None or r.ts < hi)]

    def lookup(self) -> dict[tuple[int, int], Published]:
        return {r.where: r for r in self.records}

    def of(self, session_id: uuid.UUID) -> list[Published]:
        return sorted((r for r in self.records if r.receipt.session_id == session_id),
                      key=lambda r: r.where)


Op = tuple[uuid.UUID, WorkspaceSnapshot | None]


@pytest.fixture(scope="module")
async def phased(broker: BrokerAddress) -> Phased:
    """Four phases of creates, updates, touches and evictions (with re-creations) on 30 sessions.

    Each phase sends at most one record per session; phases are separated on the record
    timestamps.
    """
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=new_topic())
    s = [uuid.uuid4() for _ in range(30)]
    ghost = uuid.uuid4()
    model: State = {}
    models: list[State] = []
    boundaries: list[int] = []
    records: list[Published] = []

    def update(sid: uuid.UUID, **changes: Any) -> Op:
        return (sid, model[sid].replace(**changes))

    phases: list[Any] = [
        # 1: create 20 sessions
        lambda: [(sid, make_snapshot(sid, intent=f"p1 {i} ünïcödé 🚀"))
                  for i, sid in enumerate(s[:20])],
        # 2: update 10, create 10 more, evict 5, and a tombstone for a session nobody knows
        lambda: [update(sid, state="submitted", intent="p2") for sid in s[:10]]
        + [(sid, make_snapshot(sid, intent="p2 new")) for sid in s[20:]]
        + [(sid, None) for sid in s[10:15]] + [(ghost, None)],
        # 3: evict 5, re-create 3 of those evicted in phase 2, update 5, touch one
        lambda: [(sid, None) for sid in s[:5]]
        + [(sid, make_snapshot(sid, intent="p3 again", state="paused")) for sid in s[10:13]]
        + [update(sid, intent=f"p3 step {i}") for i, sid in enumerate(s[20:25])]
        + [(s[15], model[s[15]])],
        # 4: re-create one evicted in phase 3, update a re-created one, evict, update
        lambda: [(s[0], make_snapshot(s[0], intent="p4 reborn", mode="persistent")),
                 update(s[10], state="merged"), (s[20], None), update(s[5], intent="p4")],
    ]
    async with SnapshotPublisher(config) as publisher:
        for number, build in enumerate(phases, 1):
            if boundaries:
                await wait_past(boundaries[-1] + PHASE_GAP_MS)
            ops: list[Op] = build()
            assert len({sid for sid, _ in ops}) == len(ops)  # one record per session and phase
            # One at a time: aiokafka 0.14 gives every record of a multi-record batch the
            # first record's timestamp in its metadata, so only single-record batches give
            # receipts whose timestamp_ms is the record's own CreateTime.
            receipts = [await publisher.publish(snap) if snap is not None
                        else await publisher.evict(sid) for sid, snap in ops]
            for (sid, snap), receipt in zip(ops, receipts, strict=True):
                assert receipt.session_id == sid
                assert receipt.timestamp_ms >= 0
                records.append(Published(receipt, snap, number))
                if snap is None:
                    model.pop(sid, None)
                else:
                    model[sid] = snap
            stamps = [r.timestamp_ms for r in receipts]
            if boundaries:
                assert min(stamps) > boundaries[-1]  # the phases really are apart in time
            boundaries.append(max(stamps))
            models.append(dict(model))
    assert len({r.where for r in records}) == len(records)
    return Phased(config, records, models, boundaries, s, ghost)


def check_events(events: list[Event], expected: list[Published], phased: Phased) -> None:
    """`events` are exactly `expected` (by partition and offset), in offset order per partition,
    each with the content that was published."""
    wanted = by_partition(sorted(r.where for r in expected))
    got = by_partition([(e.partition, e.offset) for e in events])
    assert got == wanted
    lookup = phased.lookup()
    for event in events:
        record = lookup[(event.partition, event.offset)]
        assert event.session_id == record.receipt.session_id
        assert event.snapshot == record.snapshot
        assert event.tombstone == (record.snapshot is None)
        assert event.timestamp_ms == record.ts
        assert event.timestamp == record.receipt.timestamp


# ---------------------------------------------------------------------------- rebuild


async def test_rebuild_at_every_phase_boundary(phased: Phased) -> None:
    config = phased.config
    first = min(r.ts for r in phased.records)
    assert await rebuild(config, as_of=at(first - 1)) == {}
    assert await rebuild(config, as_of=at(first - 1) + datetime.timedelta(microseconds=999)) \
        == {}
    for k, (boundary, model) in enumerate(zip(phased.boundaries, phased.models, strict=True)):
        assert await rebuild(config, as_of=at(boundary)) == model, f"phase {k + 1}"
    # an instant inside the gap after phase 2 (sub-millisecond part included) still shows it
    inside = at(phased.boundaries[1]) + datetime.timedelta(milliseconds=PHASE_GAP_MS // 2,
                                                           microseconds=999)
    assert await rebuild(config, as_of=inside) == phased.models[1]
    # the evicted-then-re-created sessions are present exactly when they should be
    s0, s10 = phased.sessions[0], phased.sessions[10]
    assert [s0 in m for m in phased.models] == [True, True, False, True]
    assert [s10 in m for m in phased.models] == [True, False, True, True]

    final = await rebuild(config)
    assert final == phased.models[-1]
    assert final == await view_state(config)
    assert await rebuild(config, as_of=datetime.datetime.now(UTC)) == final


async def test_rebuild_rejects_naive_datetimes(phased: Phased) -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        await rebuild(phased.config, as_of=datetime.datetime(2026, 1, 1))
    with pytest.raises(ValidationError, match="timezone-aware"):
        await collect(replay(phased.config, since=datetime.datetime(2026, 1, 1)))


# ---------------------------------------------------------------------------- replay windows


async def test_replay_time_windows_are_exact(phased: Phased) -> None:
    config = phased.config
    stamps = sorted(r.ts for r in phased.records)
    phase_start = {k: min(r.ts for r in phased.records if r.phase == k) for k in (1, 2, 3, 4)}
    windows: list[tuple[int | None, int | None]] = [
        (None, None),
        (phase_start[2], phase_start[4]),  # exactly phases 2 and 3
        (stamps[len(stamps) // 4], stamps[3 * len(stamps) // 4]),  # bounds on record stamps
        (stamps[len(stamps) // 3], None),
        (None, stamps[len(stamps) // 2]),
        (phased.boundaries[0], phased.boundaries[0] + 1),  # one millisecond
        (phased.boundaries[0] + 1, phase_start[2]),  # the gap: nothing
    ]
    for lo, hi in windows:
        events = await collect(replay(
            config, since=None if lo is None else at(lo), until=None if hi is None else at(hi)))
        expected = phased.window(lo, hi)
        check_events(events, expected, phased)
    assert len(phased.window(phase_start[2], phase_start[4])) \
        == sum(r.phase in (2, 3) for r in phased.records)


async def test_replay_offset_bounds_are_exact(phased: Phased) -> None:
    offsets = by_partition(sorted(r.where for r in phased.records))
    since = dict.fromkeys(range(DEFAULT_PARTITIONS), 0)
    until = dict.fromkeys(range(DEFAULT_PARTITIONS), 0)
    for p, offs in offsets.items():
        since[p] = offs[len(offs) // 3]
        until[p] = offs[2 * len(offs) // 3] if len(offs) > 1 else offs[-1] + 1
    in_range = [r for r in phased.records
                if since[r.receipt.partition] <= r.receipt.offset < until[r.receipt.partition]]
    assert in_range
    events = await collect(replay(phased.config, since=since, until=until))
    check_events(events, in_range, phased)

    # open on one side
    events = await collect(replay(phased.config, until=until))
    check_events(events, [r for r in phased.records
                          if r.receipt.offset < until[r.receipt.partition]], phased)
    events = await collect(replay(phased.config, since=since))
    check_events(events, [r for r in phased.records
                          if r.receipt.offset >= since[r.receipt.partition]], phased)

    # offsets and a time bound together
    cut = phased.boundaries[1]
    events = await collect(replay(phased.config, since=since, until=at(cut)))
    check_events(events, [r for r in in_range + [r for r in phased.records
                                                 if r.receipt.offset >= until[r.receipt.partition]]
                          if r.receipt.offset >= since[r.receipt.partition] and r.ts < cut],
                 phased)


async def test_replay_since_after_every_record_yields_nothing(phased: Phased) -> None:
    last = max(r.ts for r in phased.records)
    assert await collect(replay(phased.config, since=at(last + 1))) == []
    later = datetime.datetime.now(UTC) + datetime.timedelta(days=1)
    assert await collect(replay(phased.config, since=later)) == []
    assert await collect(replay(phased.config, until=at(min(r.ts for r in phased.records)))) \
        == []
    beyond = dict.fromkeys(range(DEFAULT_PARTITIONS), 10**9)
    assert await asyncio.wait_for(collect(replay(phased.config, since=beyond)), WAIT_S) == []


async def test_replay_reports_progress(phased: Phased) -> None:
    calls: list[tuple[int, int]] = []
    events = await collect(replay(phased.config,
                                  progress=lambda done, total: calls.append((done, total))))
    assert len(events) == len(phased.records)
    assert calls
    assert calls[-1] == (len(phased.records), len(phased.records))
    assert all(done <= total for done, total in calls)


async def test_replay_ends_while_another_publisher_keeps_writing(broker: BrokerAddress) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=new_topic())
    stop = asyncio.Event()
    written: list[Receipt] = []

    async def writer() -> None:
        async with SnapshotPublisher(config, ensure_topic=False) as publisher:
            while not stop.is_set():
                written.extend(await publisher.publish_many(
                    make_snapshot(intent="live") for _ in range(25)))

    async with SnapshotPublisher(config) as publisher:
        prefill = await publisher.publish_many(make_snapshot() for _ in range(300))
    task = asyncio.create_task(writer())
    try:
        while len(written) < 50:  # the writer is going
            assert not task.done()
            await asyncio.sleep(0.01)
        acknowledged = {(r.partition, r.offset) for r in prefill + written}
        events = await asyncio.wait_for(
            collect(replay(config, fetch_max_wait_ms=FETCH_WAIT_MS)), WAIT_S)
        assert not task.done()  # still writing when the replay ended
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
    got = [(e.partition, e.offset) for e in events]
    assert len(got) == len(set(got))
    for offs in by_partition(got).values():
        assert offs == sorted(offs)
    # everything acknowledged before the replay began is in it; nothing that was never written
    assert acknowledged <= set(got)
    assert set(got) <= {(r.partition, r.offset) for r in prefill + written}


async def test_replay_ends_when_every_event_read_adds_a_record(broker: BrokerAddress) -> None:
    """A replay that chased the log's growing end would never finish here."""
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=new_topic())
    async with SnapshotPublisher(config, linger_ms=0) as publisher:
        before = await publisher.publish_many(make_snapshot() for _ in range(60))

        async def feed() -> list[Event]:
            seen = []
            async for event in replay(config, fetch_max_wait_ms=FETCH_WAIT_MS):
                seen.append(event)
                await publisher.publish(make_snapshot(intent="fed"))
            return seen

        events = await asyncio.wait_for(feed(), WAIT_S)
    assert {(r.partition, r.offset) for r in before} <= {(e.partition, e.offset) for e in events}


# ---------------------------------------------------------------------------- history


async def test_history_of_a_session_oldest_first(phased: Phased) -> None:
    s0, s10, s29 = phased.sessions[0], phased.sessions[10], phased.sessions[29]
    for sid, shape in ((s0, [True, True, False, True]), (s10, [True, False, True, True]),
                       (s29, [True]), (phased.ghost, [False])):
        events = await history(phased.config, sid)
        expected = phased.of(sid)
        assert [(e.partition, e.offset) for e in events] == [r.where for r in expected]
        assert [e.snapshot for e in events] == [r.snapshot for r in expected]
        assert [e.snapshot is not None for e in events] == shape
        assert all(e.session_id == sid for e in events)
        assert [e.timestamp_ms for e in events] == sorted(e.timestamp_ms for e in events)
    # s0: created, updated, deleted, re-created with other content
    events = await history(phased.config, str(s0).upper())
    first, last = events[0].snapshot, events[-1].snapshot
    assert first is not None
    assert first.intent == "p1 0 ünïcödé 🚀"
    assert last is not None
    assert last.intent == "p4 reborn"
    # bounded
    later = await history(phased.config, s0, since=at(phased.boundaries[0] + 1))
    assert [e.offset for e in later] == [e.offset for e in events[1:]]
    assert await history(phased.config, uuid.uuid4()) == []
    with pytest.raises(ValidationError):
        await history(phased.config, "not-a-uuid")


async def test_the_former_call_forms_still_work_with_a_deprecation_warning(
        phased: Phased, monkeypatch: pytest.MonkeyPatch) -> None:
    # until 0.3: history(session_id[, config]), and servers and topic given as keywords
    config, s0 = phased.config, phased.sessions[0]
    with pytest.warns(DeprecationWarning, match=r"history\(config, session_id\)"):
        assert await history(s0, config) == await history(config, s0)  # type: ignore[arg-type]
    monkeypatch.setenv("SNAPBUS_BOOTSTRAP_SERVERS", config.bootstrap_servers)
    monkeypatch.setenv("SNAPBUS_TOPIC", config.topic)
    with pytest.warns(DeprecationWarning, match=r"history\(config, session_id\)"):
        assert await history(s0) == await history(config, s0)  # type: ignore[arg-type]
    other = KafkaConfig("localhost:1", "not-this-topic")  # (overridden by the keywords)
    with pytest.warns(DeprecationWarning, match="pass a KafkaConfig first"):
        events = await collect(replay(other, bootstrap_servers=config.bootstrap_servers,
                                      topic=config.topic))
    def where(event: Event) -> tuple[int, int]:
        return event.partition, event.offset
    assert sorted(events, key=where) == sorted(await collect(replay(config)), key=where)
    assert events
    with pytest.warns(DeprecationWarning, match=r"rebuild\(KafkaConfig"):
        state = await rebuild(other, bootstrap_servers=config.bootstrap_servers,
                              topic=config.topic)
    assert state == await rebuild(config)


# ---------------------------------------------------------------------------- export / import


async def test_jsonl_export_imports_into_an_equal_topic(phased: Phased, tmp_path: Path) -> None:
    path = tmp_path / "export.jsonl"
    with path.open("w", encoding="utf-8") as out:
        count = await write_jsonl(replay(phased.config), out)
    assert count == len(phased.records)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == count
    lookup = phased.lookup()
    for line in lines:
        record = lookup[(line["partition"], line["offset"])]
        assert line["session_id"] == str(record.receipt.session_id)
        assert line["timestamp_ms"] == record.ts
        assert datetime.datetime.fromisoformat(line["timestamp"]) == at(record.ts)
        if record.snapshot is None:
            assert line["snapshot"] is None
        else:
            assert WorkspaceSnapshot.from_dict(line["snapshot"]) == record.snapshot
    assert "ünïcödé 🚀" in path.read_text(encoding="utf-8")  # written as text, not escaped

    target = phased.config.replace(topic=new_topic())
    result = await asyncio.to_thread(run, "-b", target.bootstrap_servers, "-t", target.topic,
                                     "import", str(path))
    assert result.exit_code == 0, result.output
    assert f"imported {count} event(s) into {target.topic}" in result.stdout
    original = await view_state(phased.config)
    assert original == phased.models[-1]
    assert await view_state(target) == original


def test_event_to_json_shape() -> None:
    snapshot = make_snapshot()
    event = Event(snapshot.key, snapshot, 3, 17, 1_700_000_000_123)
    line = event_to_json(event)
    assert line == {"session_id": str(snapshot.session_id), "snapshot": snapshot.to_dict(),
                    "partition": 3, "offset": 17,
                    "timestamp": "2023-11-14T22:13:20.123000+00:00",
                    "timestamp_ms": 1_700_000_000_123}
    tombstone = event_to_json(Event(snapshot.key, None, 0, 1, -1))
    assert tombstone["snapshot"] is None
    assert tombstone["timestamp"] is None


# ---------------------------------------------------------------------------- bad records


async def test_bad_records_are_skipped_or_raise(broker: BrokerAddress,
                                                caplog: pytest.LogCaptureFixture) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=new_topic())
    await ensure_topic(config)
    a1, b1 = make_snapshot(intent="a1"), make_snapshot(intent="b1")
    a2 = a1.replace(intent="a2")
    async with SnapshotPublisher(config, ensure_topic=False) as publisher:
        good = await publisher.publish_many([a1, b1])
        raw = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await raw.start()
        try:
            key = a1.key.encode()
            bad = [
                await raw.send_and_wait(config.topic, b"not avro at all", key=key),
                await raw.send_and_wait(config.topic, b"\xc3\x01" + b"\x00" * 8 + b"junk",
                                        key=key),
                await raw.send_and_wait(config.topic, encode(b1), key=b"not-a-uuid"),
                await raw.send_and_wait(config.topic, encode(b1), key=key),  # key mismatch
            ]
        finally:
            await raw.stop()
        good += [await publisher.publish(a2), await publisher.evict(b1.session_id)]
    assert {md.partition for md in bad[:2] + bad[3:]} == {good[0].partition}

    with caplog.at_level(logging.WARNING, logger="snapbus.replay"):
        events = await collect(replay(config))
    assert [(e.partition, e.offset) for e in events if e.partition == good[0].partition] \
        == sorted((r.partition, r.offset) for r in good if r.partition == good[0].partition)
    assert {(e.partition, e.offset) for e in events} == {(r.partition, r.offset) for r in good}
    assert [e.snapshot for e in events if e.session_id == a1.session_id] == [a1, a2]
    assert sum("skipping bad record" in r.getMessage() for r in caplog.records) == len(bad)
    assert await rebuild(config) == {a1.session_id: a2}
    assert [e.snapshot for e in await history(config, a1.session_id)] == [a1, a2]

    with pytest.raises(DecodeError):
        await collect(replay(config, errors="raise"))
    with pytest.raises(ValidationError, match="errors"):
        await collect(replay(config, errors="ignore"))


# ---------------------------------------------------------------------------- history topic


async def test_history_topic_receives_every_change_and_is_read_by_default(
        broker: BrokerAddress) -> None:
    servers = broker.bootstrap_servers
    config = KafkaConfig(bootstrap_servers=servers, topic=new_topic(), history_topic=new_topic())
    assert config.history_topic is not None
    history_only = KafkaConfig(bootstrap_servers=servers, topic=config.history_topic)
    a1, b1 = make_snapshot(intent="a1"), make_snapshot(intent="b1")
    a2, a3 = a1.replace(state="submitted"), make_snapshot(a1.session_id, intent="a3")
    async with SnapshotPublisher(config) as publisher:  # creates both topics
        await publisher.publish_many([a1, b1])
        await publisher.publish(a2)
        await publisher.evict(a1.session_id)
        await publisher.publish(a3)
        await publisher.evict(b1.session_id)

    info = await describe_topic(history_only)
    assert info.cleanup_policy == "delete"
    assert not info.compacted
    assert "retention.ms" in info.configs
    assert (await describe_topic(config)).compacted

    # a record only on the snapshot topic tells which topic is read
    stray = make_snapshot(intent="only on the snapshot topic")
    raw = AIOKafkaProducer(bootstrap_servers=servers)
    await raw.start()
    try:
        await raw.send_and_wait(config.topic, encode(stray), key=stray.key.encode())
    finally:
        await raw.stop()

    expected_a: list[WorkspaceSnapshot | None] = [a1, a2, None, a3]
    events = await history(config, a1.session_id)
    assert [e.snapshot for e in events] == expected_a
    assert [e.snapshot for e in await history(config, b1.session_id)] == [b1, None]

    replayed = await collect(replay(config))
    assert stray.session_id not in {e.session_id for e in replayed}
    assert len(replayed) == 6
    direct = await collect(replay(history_only))
    assert sorted((e.partition, e.offset, e.session_id, e.snapshot) for e in replayed) \
        == sorted((e.partition, e.offset, e.session_id, e.snapshot) for e in direct)
    assert await rebuild(config) == {a1.session_id: a3}

    snapshot_topic = await collect(replay(config, use_history=False))
    assert stray.session_id in {e.session_id for e in snapshot_topic}
    assert len(snapshot_topic) == 7
    assert await rebuild(config, use_history=False) == {a1.session_id: a3,
                                                        stray.session_id: stray}
    assert [e.snapshot for e in await history(config, a1.session_id, use_history=False)] \
        == expected_a

    # the CLI reads the history topic when given one
    base = ["-b", servers, "-t", config.topic]
    result = await asyncio.to_thread(run, *base, "--history-topic", config.history_topic,
                                     "history", str(a1.session_id), "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["snapshot"] for line in result.stdout.splitlines()] \
        == [None if s is None else s.to_dict() for s in expected_a]
    result = await asyncio.to_thread(run, *base, "--history-topic", config.history_topic,
                                     "replay")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 6
    result = await asyncio.to_thread(run, *base, "replay")
    assert len(result.stdout.splitlines()) == 7


# ---------------------------------------------------------------------------- CLI


def cli_base(phased: Phased) -> list[str]:
    return ["-b", phased.config.bootstrap_servers, "-t", phased.config.topic]


def where(line: dict[str, Any]) -> tuple[int, int]:
    return (line["partition"], line["offset"])


def iso(ms: int) -> str:
    return at(ms).isoformat()


def test_cli_replay_jsonl_table_and_output_file(phased: Phased, tmp_path: Path) -> None:
    lo = min(r.ts for r in phased.records if r.phase == 2)
    hi = min(r.ts for r in phased.records if r.phase == 4)
    expected = phased.window(lo, hi)
    window = ["--since", iso(lo), "--until", iso(hi)]

    result = run(*cli_base(phased), "replay", *window, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    got = by_partition([(line["partition"], line["offset"]) for line in lines])
    assert got == by_partition(sorted(r.where for r in expected))
    lookup = phased.lookup()
    for line in lines:
        record = lookup[(line["partition"], line["offset"])]
        assert line["snapshot"] == (None if record.snapshot is None
                                    else record.snapshot.to_dict())
    assert f"{len(expected)} event(s)" in result.stderr

    out = tmp_path / "window.jsonl"
    result = run(*cli_base(phased), "replay", *window, "--output", str(out), "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(written, key=where) == sorted(lines, key=where)

    result = run(*cli_base(phased), "replay", *window, "--format", "table")
    assert result.exit_code == 0, result.output
    for record in expected:
        assert str(record.receipt.session_id) in result.stdout
        assert f"{record.receipt.partition}@{record.receipt.offset}" in result.stdout
    assert result.stdout.count("DELETED") == sum(r.snapshot is None for r in expected)
    assert f"{len(expected)} event(s)" in result.stderr

    # relative times: everything was published within the last day, nothing in the future
    result = run(*cli_base(phased), "replay", "--since", "-1d")
    assert len(result.stdout.splitlines()) == len(phased.records)
    result = run(*cli_base(phased), "replay", "--since", "now")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_cli_history(phased: Phased) -> None:
    s0 = phased.sessions[0]
    expected = phased.of(s0)
    result = run(*cli_base(phased), "history", str(s0))
    assert result.exit_code == 0, result.output
    assert result.stdout.count("DELETED") == 1
    assert result.stdout.count(str(s0)) == len(expected) == 4
    assert "p4 reborn" in result.stdout

    result = run(*cli_base(phased), "history", str(s0), "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["partition"], line["offset"]) for line in lines] == [r.where for r in expected]
    assert [line["snapshot"] is None for line in lines] == [False, False, True, False]

    unknown = str(uuid.uuid4())
    assert_one_line_error(run(*cli_base(phased), "history", unknown), unknown)
    assert_one_line_error(run(*cli_base(phased), "history", unknown, "--json"), unknown)
    result = run(*cli_base(phased), "history", "nope")
    assert result.exit_code == 2
    assert "SESSION_ID" in result.stderr


def test_cli_ls_as_of(phased: Phased) -> None:
    for k in (0, 2):
        result = run(*cli_base(phased), "ls", "--as-of", iso(phased.boundaries[k]), "--json")
        assert result.exit_code == 0, result.output
        listed = json.loads(result.stdout)
        assert sorted(listed, key=lambda d: d["session_id"]) \
            == sorted((s.to_dict() for s in phased.models[k].values()),
                      key=lambda d: d["session_id"])
    before = at(min(r.ts for r in phased.records) - 1)
    result = run(*cli_base(phased), "ls", "--as-of",
                 before.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    result = run(*cli_base(phased), "ls", "--as-of", iso(phased.boundaries[1]),
                 "--state", "submitted", "--json")
    assert {d["session_id"] for d in json.loads(result.stdout)} \
        == {str(sid) for sid, s in phased.models[1].items() if s.state == "submitted"}


@pytest.mark.parametrize(("args", "option", "text"), [
    (["replay", "--since", "yesterday"], "--since", "yesterday"),
    (["replay", "--until", "2026-13-45"], "--until", "2026-13-45"),
    (["ls", "--as-of", "last week"], "--as-of", "last week"),
    (["replay", "--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"],
     "--since", "before --until"),
    (["replay", "--since", "now", "--until", "-1h"], "--since", "before --until"),
])
def test_cli_bad_times_exit_2(args: list[str], option: str, text: str) -> None:
    result = run("-b", "127.0.0.1:9", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert option in result.stderr
    assert text in result.stderr


# ---------------------------------------------------------------------------- parse_time


NOW = datetime.datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-24T10:00:00Z", NOW),
    ("2026-11-24T10:00:00.250Z", NOW + datetime.timedelta(milliseconds=250)),
    ("2026-11-24T12:00:00+02:00", NOW),
    ("2026-11-24T05:30:00-04:30", NOW),
    ("2026-11-24T10:00:00", NOW),
    ("2026-11-24 10:00", NOW),
    ("2026-11-24", NOW.replace(hour=0)),
    ("now", NOW),
    ("  now ", NOW),
    ("-15m", NOW - datetime.timedelta(minutes=15)),
    ("-2h", NOW - datetime.timedelta(hours=2)),
    ("-1.5d", NOW - datetime.timedelta(hours=36)),
    ("-30s", NOW - datetime.timedelta(seconds=30)),
    ("-1w", NOW - datetime.timedelta(days=7)),
])
def test_parse_time(text: str, expected: datetime.datetime) -> None:
    parsed = parse_time(text, now=NOW)
    assert parsed == expected
    assert parsed.utcoffset() is not None


def test_parse_time_defaults_to_the_current_time() -> None:
    before = datetime.datetime.now(UTC)
    parsed = parse_time("-1h")
    after = datetime.datetime.now(UTC)
    assert before - datetime.timedelta(hours=1) <= parsed <= after - datetime.timedelta(hours=1)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-45", "", "15m", "-15x", "-m",
                                  "+15m", "10:00 tomorrow", "2026-11-24T25:00:00Z"])
def test_parse_time_rejects_garbage(text: str) -> None:
    with pytest.raises(ValidationError, match="cannot read time"):
        parse_time(text, now=NOW)
