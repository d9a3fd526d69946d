"""The view is a guest: it never switches the host's cyclic garbage collector (issue 16, item 4).

snapbus used to disable the collector process-wide from the start of a replay until it was
applied (across awaits, so the host's own coroutines ran without it), and toggled it from a
worker thread while loading a checkpoint. Now it never calls any of `gc`'s process-wide
switches; docs/gc.md has the measured cost.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from snapbus import KafkaConfig, SnapshotPublisher, SnapshotView, checkpoint
from tests.conftest import BrokerAddress
from tests.helpers import WAIT_S, make_snapshot

SWITCHES = ("disable", "enable", "set_threshold", "freeze", "unfreeze")
"""`gc`'s calls that change the collector for the whole process."""


@pytest.fixture
def gc_switches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every call of one of `SWITCHES` while the test runs, with the thread that made it."""
    calls: list[str] = []
    for name in SWITCHES:
        real = getattr(gc, name)

        def spy(*args: Any, _name: str = name, _real: Any = real) -> Any:
            calls.append(f"gc.{_name}{args} in thread {threading.current_thread().name}")
            return _real(*args)

        monkeypatch.setattr(gc, name, spy)
    enabled, thresholds = gc.isenabled(), gc.get_threshold()
    yield calls
    assert (gc.isenabled(), gc.get_threshold()) == (enabled, thresholds)


async def _start_watched(view: SnapshotView) -> list[tuple[bool, tuple[int, ...]]]:
    """Start `view` while another task (the host's) samples the collector's state at each of
    its turns; return the samples."""
    seen: list[tuple[bool, tuple[int, ...]]] = []
    done = asyncio.Event()

    async def host() -> None:
        while not done.is_set():
            seen.append((gc.isenabled(), gc.get_threshold()))
            await asyncio.sleep(0)

    sampler = asyncio.create_task(host())
    try:
        await view.start()
    finally:
        done.set()
        await sampler
    return seen


@pytest.mark.parametrize("decode", ["eager", "lazy"])
async def test_a_starting_view_leaves_the_collector_alone(
    broker: BrokerAddress, topic_name: str, tmp_path: Path, gc_switches: list[str],
    decode: Literal["eager", "lazy"],
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshots = [make_snapshot(agent_name=f"agent-{i % 7}") for i in range(3000)]
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many(snapshots)
    before = (gc.isenabled(), gc.get_threshold())
    assert before[0], "the test needs the collector enabled, as a host has it"
    path = tmp_path / "view.ckpt"

    # a full replay: many fetches, so the host's task runs between them
    view = SnapshotView(config, decode=decode, fetch_max_wait_ms=20, start_timeout_s=WAIT_S)
    seen = await _start_watched(view)
    try:
        assert len(view) == len(snapshots)
        if decode == "lazy":
            for snapshot in snapshots[:1000]:  # decoded now: kept as fields in the checkpoint
                assert view.get(snapshot.session_id) == snapshot
        await view.save_checkpoint(path)
    finally:
        await view.stop()
    assert len(seen) > 1  # (the host did run during the start)
    assert set(seen) == {before}

    # a start from the checkpoint: the file is read in a worker thread, sessions rebuilt
    restarted = SnapshotView(config, decode=decode, fetch_max_wait_ms=20,
                             start_timeout_s=WAIT_S, checkpoint_path=path)
    seen = await _start_watched(restarted)
    try:
        assert restarted.stats.checkpoint_sessions == len(snapshots)
        assert restarted.get(snapshots[0].session_id) == snapshots[0]
    finally:
        restarted._checkpoint_path = None  # (no save on stop: the test is about the start)
        await restarted.stop()
    assert len(seen) > 1
    assert set(seen) == {before}
    assert gc_switches == []


def test_reading_a_checkpoint_leaves_the_collector_alone(
    tmp_path: Path, gc_switches: list[str]
) -> None:
    snapshots = [make_snapshot() for _ in range(100)]
    saved = checkpoint.Checkpoint(
        "sessions", 3, {0: 100}, {s.key: s._values() for s in snapshots}, ({}, {}, {}), {},
        1_700_000_000_000, b"", 1_700_000_000_000)
    path = tmp_path / "view.ckpt"
    checkpoint.write_checkpoint(path, saved)
    assert checkpoint.read_checkpoint(path, topic="sessions", partitions=3) == saved
    assert gc_switches == []
