"""Repairs of a bad latest value run beside the live tail, read only what they need, and retry
(docs/bad-values.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from snapbus import _repair as repair_module
from snapbus._partition import partition_of
from snapbus.codec import encode
from snapbus.config import KafkaConfig
from snapbus.errors import SnapbusError
from snapbus.publisher import SnapshotPublisher
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import DEFAULT_PARTITIONS
from snapbus.view import SnapshotView
from tests.faultproxy import FaultProxy
from tests.helpers import WAIT_S, eventually, make_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_aiokafka")]

SESSIONS = 5000




def new_view(config: KafkaConfig, **options: Any) -> SnapshotView:
    return SnapshotView(config, fetch_max_wait_ms=20, **options)


async def seed(config: KafkaConfig, sessions: int) -> tuple[WorkspaceSnapshot, bytes]:
    """Publish `sessions` sessions, then a bad latest value (its indexed fields still read
    fine) of one of them; return that session's last good snapshot and the bad value."""
    snapshots = [make_snapshot(agent_name=f"agent-{i}") for i in range(sessions)]
    async with SnapshotPublisher(config) as publisher:
        for start in range(0, sessions, 1000):
            await publisher.publish_many(snapshots[start:start + 1000])
    good = snapshots[sessions // 2]
    bad = encode(good.replace(state="merged"))[:-4]  # (a truncated Avro body)
    raw = AIOKafkaProducer(bootstrap_servers=config.bootstrap_servers, acks="all")
    await raw.start()
    try:
        await raw.send_and_wait(config.topic, bad, key=good.key.encode())
    finally:
        await raw.stop()
    return good, bad


ReadKeys = Any


async def test_repair_runs_beside_the_live_tail_and_reads_one_partition(
    proxy: FaultProxy, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=10)
    good, _ = await seed(config, SESSIONS)
    read_keys: ReadKeys = repair_module.read_keys
    asked: list[Mapping[int, Collection[bytes | None]]] = []
    found: list[int] = []
    release = asyncio.Event()
    returned: list[bool] = []

    async def held(cfg: KafkaConfig, wanted: Mapping[int, Collection[bytes | None]],
                   until: Mapping[int, int], **options: Any) -> Any:
        asked.append(wanted)
        result = await read_keys(cfg, wanted, until, **options)
        found.append(sum(map(len, result.values())))
        await release.wait()  # the repair has read the log; hold it there
        returned.append(True)  # (what the view does with it runs before the next await)
        return result

    monkeypatch.setattr(repair_module, "read_keys", held)
    async with SnapshotPublisher(config) as publisher, new_view(config) as view:
        assert view.status == "live"
        assert len(view) == SESSIONS
        assert view.get(good.session_id) is None  # found bad: absent until repaired
        await eventually(lambda: found, what="the repair read the log")
        # it read only the session's partition, and kept only that session's records
        assert asked == [{partition_of(good.key.encode(), DEFAULT_PARTITIONS): {good.key.encode()}}]
        assert found == [2]  # its good record and the bad one

        # live updates keep flowing while the repair is held
        update = make_snapshot()
        receipt = await publisher.publish(update)
        await view.wait_for(receipt, timeout=WAIT_S)
        assert view.get(update.session_id) == update
        assert view.get(good.session_id) is None
        # the session itself, updated meanwhile, keeps its update, not what the repair found
        changed = good.replace(intent="changed while repairing")
        receipt = await publisher.publish(changed)
        await view.wait_for(receipt, timeout=WAIT_S)
        assert view.get(good.session_id) == changed
        assert not returned

        release.set()
        await eventually(lambda: returned, what="the repair done")
        assert view.get(good.session_id) == changed
        assert view.status == "live"
        await eventually(lambda: view.stats.decode_errors == 1, what="the bad record reported")


async def test_a_broker_error_during_repair_is_retried(
    proxy: FaultProxy, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = KafkaConfig(proxy.address, topic_name, connect_timeout_s=2)
    good, _ = await seed(config, 200)
    read_keys: ReadKeys = repair_module.read_keys
    errors: list[BaseException] = []

    async def broken_once(cfg: KafkaConfig, wanted: Mapping[int, Collection[bytes | None]],
                          until: Mapping[int, int], **options: Any) -> Any:
        if errors:
            return await read_keys(cfg, wanted, until, **options)
        proxy.refuse()  # the broker is unreachable while the repair reads
        proxy.cut()
        try:
            return await read_keys(cfg, wanted, until, **options)
        except Exception as exc:
            errors.append(exc)
            raise
        finally:
            proxy.accept()

    monkeypatch.setattr(repair_module, "read_keys", broken_once)
    async with new_view(config) as view:
        assert view.get(good.session_id) is None
        await eventually(lambda: view.get(good.session_id) == good,
                         what="the last good snapshot restored after the error")
        assert len(errors) == 1
        assert isinstance(errors[0], SnapbusError)
        assert errors[0].retriable
        assert view.stats.decode_errors == 1
        await eventually(lambda: view.status == "live", what="live again")
