"""Records on the wrong partition (written by a producer with another partitioner) are ignored
by every reader, live or starting, so every pod reaches the same state (docs/misplaced-records.md).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from click.testing import CliRunner

from snapbus._partition import partition_of
from snapbus.cli import cli
from snapbus.codec import encode
from snapbus.config import KafkaConfig
from snapbus.publisher import SnapshotPublisher
from snapbus.replay import find_misplaced, history, rebuild
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import DEFAULT_PARTITIONS
from snapbus.view import SnapshotView
from tests.helpers import WAIT_S, eventually, make_snapshot
from tests.test_faults import read_log

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress


def new_view(config: KafkaConfig, **options: Any) -> SnapshotView:
    return SnapshotView(config, fetch_max_wait_ms=20, **options)


def elsewhere(session: WorkspaceSnapshot) -> int:
    """A partition that is not the session's own."""
    return (partition_of(session.key.encode(), DEFAULT_PARTITIONS) + 1) % DEFAULT_PARTITIONS


def state(view: SnapshotView) -> dict[uuid.UUID, WorkspaceSnapshot]:
    return {snapshot.session_id: snapshot for snapshot in view.snapshots()}


async def test_misplaced_records_are_ignored_by_every_view(
    broker: BrokerAddress, topic_name: str, tmp_path: Path
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    kept, deleted, stray = make_snapshot(), make_snapshot(), make_snapshot()
    newer = kept.replace(state="merged")
    checkpoint = tmp_path / "view.ckpt"
    dead_letters = f"{topic_name}-dlq"
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many([kept, deleted])
        async with new_view(config, checkpoint_path=checkpoint) as early:
            await early.barrier(timeout=WAIT_S)
        async with new_view(config, dead_letter_topic=dead_letters) as live:
            await live.barrier(timeout=WAIT_S)
            raw = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
            await raw.start()
            try:  # another partitioner: a newer version, a tombstone, a session only there
                wrong = [
                    await raw.send_and_wait(topic_name, encode(newer), key=kept.key.encode(),
                                            partition=elsewhere(kept)),
                    await raw.send_and_wait(topic_name, None, key=deleted.key.encode(),
                                            partition=elsewhere(deleted)),
                    await raw.send_and_wait(topic_name, encode(stray), key=stray.key.encode(),
                                            partition=elsewhere(stray)),
                ]
            finally:
                await raw.stop()
            await live.barrier(timeout=WAIT_S)
            expected = {kept.session_id: kept, deleted.session_id: deleted}
            assert state(live) == expected
            assert live.get(kept.session_id) == kept
            assert deleted.session_id in live
            assert stray.session_id not in live
            assert len(live) == 2
            assert live.stats.misplaced == 3
            assert live.stats.decode_errors == 0
            assert live.by_state("merged") == []
            assert live.status == "live"

            # fresh views, decoding lazily or not, with a TTL (records kept whole) or not, and
            # one catching up from a checkpoint taken before: all agree with the live one
            for options in ({}, {"decode": "eager"}, {"ttl_s": 3600.0},
                            {"checkpoint_path": checkpoint}):
                async with new_view(config, **options) as fresh:
                    assert state(fresh) == expected, options
                    assert len(fresh) == 2, options
                    assert stray.session_id not in fresh, options
                    assert fresh.stats.misplaced == 3, options
                    if "checkpoint_path" in options:
                        assert fresh.stats.checkpoint_sessions == 2

            # replay, rebuild and history apply the same rule
            assert await rebuild(config) == expected
            assert [e.snapshot for e in await history(config, kept.session_id)] == [kept]
            found = await find_misplaced(config)
            assert sorted((m.partition, m.offset) for m in found) == sorted(
                (md.partition, md.offset) for md in wrong)
            assert {m.key.decode() for m in found} == {kept.key, deleted.key, stray.key}
            for m in found:
                assert m.expected_partition == partition_of(m.key,
                                                           DEFAULT_PARTITIONS)

            # the live view copied them to the dead-letter topic, saying why
            await eventually(lambda: live.stats.dead_lettered == 3, what="dead letters")
        letters = await read_log(broker.bootstrap_servers, dead_letters)
        assert sorted((dict(r.headers)["snapbus.error.reason"],
                       dict(r.headers)["snapbus.source.key"]) for r in letters) == sorted(
            (b"misplaced", s.key.encode()) for s in (kept, deleted, stray))


def test_cli_lists_misplaced_records(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    placed, stray = make_snapshot(), make_snapshot()

    async def publish() -> None:
        async with SnapshotPublisher(config) as publisher:
            await publisher.publish(placed)

    async def misplace() -> Any:
        raw = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        await raw.start()
        try:
            return await raw.send_and_wait(topic_name, None, key=stray.key.encode(),
                                           partition=elsewhere(stray))
        finally:
            await raw.stop()

    asyncio.run(publish())
    base = ["-b", broker.bootstrap_servers, "-t", topic_name, "topic", "misplaced"]
    clean = CliRunner().invoke(cli, base, catch_exceptions=False)
    assert clean.exit_code == 0, clean.output
    assert clean.output == "0 misplaced record(s)\n"

    md = asyncio.run(misplace())
    listed = CliRunner().invoke(cli, base, catch_exceptions=False)
    assert listed.exit_code == 1
    assert listed.output.splitlines() == [
        f"partition {md.partition} offset {md.offset}: tombstone of key {stray.key} belongs on "
        f"partition {partition_of(stray.key.encode(), DEFAULT_PARTITIONS)}",
        "1 misplaced record(s)",
    ]
    as_json = CliRunner().invoke(cli, [*base, "--json"], catch_exceptions=False)
    assert as_json.exit_code == 1
    assert [json.loads(line) for line in as_json.output.splitlines()] == [{
        "partition": md.partition, "offset": md.offset,
        "expected_partition": partition_of(stray.key.encode(), DEFAULT_PARTITIONS),
        "key": stray.key, "timestamp_ms": md.timestamp, "tombstone": True}]
