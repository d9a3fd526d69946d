"""WorkspaceCache (the upstream cache's verbs over a publisher and a view) on the real broker."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from snapbus.cache import WorkspaceCache
from snapbus.config import KafkaConfig
from snapbus.errors import PublishError, TopicError, ValidationError
from snapbus.publisher import SnapshotPublisher
from snapbus.view import SnapshotView
from tests.helpers import make_snapshot

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

WAIT_S = 30.0


def new_cache(config: KafkaConfig, **publisher_options: Any) -> WorkspaceCache:
    return WorkspaceCache(
        config,
        publisher=SnapshotPublisher(config, **publisher_options),
        view=SnapshotView(config, fetch_max_wait_ms=20),
        write_timeout_s=WAIT_S,
    )


async def test_cache_verbs_read_their_own_writes(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshot = make_snapshot()
    sid = snapshot.session_id

    async with new_cache(config) as cache:
        assert cache.get_workspace(sid) is None

        receipt = await cache.cache_workspace(sid, snapshot)
        assert receipt.session_id == sid
        assert cache.get_workspace(sid) == snapshot  # visible as soon as the call returns
        assert cache.get_workspace(str(sid).upper()) == snapshot

        updated = snapshot.replace(state="submitted")
        await cache.cache_workspace(str(sid), updated)
        assert cache.get_workspace(sid) == updated

        touched = await cache.touch(sid)
        assert touched is not None
        assert touched.partition == receipt.partition
        assert touched.offset > receipt.offset
        assert cache.get_workspace(sid) == updated

        evicted = await cache.evict(sid)
        assert evicted.tombstone is True
        assert cache.get_workspace(sid) is None
        assert await cache.touch(sid) is None  # nothing to renew
        await cache.evict(sid)  # evicting again is harmless

        stats = cache.view.stats
        assert stats.tombstones == 2
        assert stats.records_applied == 5
        assert stats.decode_errors == 0


async def test_cache_rejects_bad_writes_before_sending(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshot = make_snapshot()

    async with new_cache(config) as cache:
        with pytest.raises(ValidationError):
            await cache.cache_workspace(uuid.uuid4(), snapshot)  # the id is not the snapshot's
        with pytest.raises(ValidationError):
            await cache.cache_workspace("not-a-uuid", snapshot)
        with pytest.raises(ValidationError):
            await cache.cache_workspace(snapshot.session_id, snapshot.to_dict())  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await cache.evict("not-a-uuid")
        with pytest.raises(ValidationError):
            cache.get_workspace("not-a-uuid")

        await cache.view.barrier(timeout=WAIT_S)
        assert cache.view.stats.records_applied == 0
        assert len(cache.view) == 0


async def test_writes_of_one_pod_reach_another(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshots = [make_snapshot(agent_name=f"agent-{i}") for i in range(5)]

    async with new_cache(config.replace(client_id="pod-a")) as pod_a, new_cache(
        config.replace(client_id="pod-b")
    ) as pod_b:
        for snapshot in snapshots:
            await pod_a.cache_workspace(snapshot.session_id, snapshot)
        await pod_b.evict(snapshots[0].session_id)

        await pod_a.view.barrier(timeout=WAIT_S)
        await pod_b.view.barrier(timeout=WAIT_S)
        for pod in (pod_a, pod_b):
            assert pod.get_workspace(snapshots[0].session_id) is None
            for snapshot in snapshots[1:]:
                assert pod.get_workspace(snapshot.session_id) == snapshot


async def test_failed_start_stops_what_was_started(
    broker: BrokerAddress, topic_name: str
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic_name, 3, 1)])  # cleanup.policy=delete
    finally:
        await admin.close()
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    # the publisher accepts the topic, the view refuses it: the publisher must be stopped again
    cache = new_cache(config, allow_non_compacted=True)
    with pytest.raises(TopicError, match=r"cleanup\.policy"):
        await cache.start()
    with pytest.raises(PublishError, match="stopped"):
        await cache.publisher.publish(make_snapshot())
    assert cache.view.status == "stopped"
    await cache.stop()
    await cache.stop()
