"""What a repair restores, and what happens when it fails, without a broker (`Repairs`)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from aiokafka.structs import TopicPartition

from snapbus._dead_letters import BadRecords
from snapbus._partition import partition_of
from snapbus._repair import Repairs
from snapbus._stash import Stashed
from snapbus.codec import default_codec, encode
from snapbus.config import KafkaConfig
from snapbus.reader import PartitionReader
from snapbus.snapshot import WorkspaceSnapshot
from tests.helpers import make_snapshot

CONFIG = KafkaConfig("127.0.0.1:9", "sessions")
PARTITIONS = 12


def repairs(settled: Mapping[int, int] | None,
            restored: list[tuple[str, WorkspaceSnapshot | None]]) -> Repairs:
    reader = PartitionReader(CONFIG)  # (never opened: only its partition count is used)
    reader._tps = {p: TopicPartition(CONFIG.topic, p) for p in range(PARTITIONS)}
    return Repairs(CONFIG, default_codec(), reader, BadRecords(CONFIG, None),
                   lambda key, snapshot, _: restored.append((key, snapshot)),
                   lambda: settled, fetch_max_wait_ms=20)


def versions(session: WorkspaceSnapshot, offsets: list[int]) -> list[Stashed]:
    return [Stashed(session.key.encode(), encode(session.replace(intent=f"at {offset}")),
                    offset, 0) for offset in offsets]


def test_a_repair_restores_nothing_the_view_has_fetched_but_not_applied() -> None:
    # The view applies a read in chunks, with awaits between: records it fetched but has not
    # applied yet are the view's to apply, in order. Restoring one of them first would show
    # the session going back when the older ones are then applied.
    session = make_snapshot()
    home = partition_of(session.key.encode(), PARTITIONS)
    restored: list[tuple[str, WorkspaceSnapshot | None]] = []
    repair = repairs({home: 25}, restored)
    repair.want(session.key)
    found = {(home, session.key.encode()): versions(session, [10, 20, 30])}
    repair._repaired(dict(repair.wanted), set(), set(), found)
    assert [(key, s.intent if s else None) for key, s in restored] == [(session.key, "at 20")]
    assert not repair.wanted


def test_a_repair_of_a_gone_view_restores_nothing() -> None:
    session = make_snapshot()
    home = partition_of(session.key.encode(), PARTITIONS)
    restored: list[tuple[str, WorkspaceSnapshot | None]] = []
    repair = repairs(None, restored)
    repair.want(session.key)
    repair._repaired(dict(repair.wanted), set(), set(),
                     {(home, session.key.encode()): versions(session, [10])})
    assert restored == []


async def test_a_repair_task_that_dies_leaves_its_error_for_the_read_loop() -> None:
    restored: list[tuple[str, WorkspaceSnapshot | None]] = []
    repair = repairs({}, restored)

    async def broken() -> None:
        raise RuntimeError("a bug in the repair")

    repair._run = broken  # type: ignore[method-assign]
    repair.want(make_snapshot().key)
    repair.start()
    assert repair.task is not None
    with pytest.raises(RuntimeError):
        await repair.task
    # (its done callback was added first, so it ran before this await resumed)
    assert isinstance(repair.error, RuntimeError)


def test_dead_letters_waiting_are_bounded_and_the_rest_counted() -> None:
    # A dead-letter topic that cannot be written must not hold up the read loop nor grow
    # without bound: letters beyond MAX_PENDING are counted and dropped.
    from snapbus._dead_letters import MAX_PENDING
    from snapbus.errors import DecodeError

    bad = BadRecords(CONFIG, "sessions.dead-letters")
    record = Stashed(b"not-a-uuid", b"garbage", 7, 0)
    for _ in range(MAX_PENDING + 5):
        bad.bad(3, record, DecodeError("bad key", reason="bad_key"))
    assert bad.decode_errors == MAX_PENDING + 5
    assert bad.dropped == 5
    assert bad.pending()
    bad.send()  # (no producer: not started; nothing is sent and nothing waits)
    assert not bad.pending()
