"""ensure_topic / describe_topic against the real broker, and topic-name validation."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from snapbus.config import KafkaConfig
from snapbus.errors import KafkaUnavailableError, TopicError, ValidationError
from snapbus.topic import DEFAULT_PARTITIONS, describe_topic, ensure_topic
from tests.helpers import list_topics

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress


async def create_plain_topic(bootstrap_servers: str, topic: str, partitions: int = 3) -> None:
    """Create a topic without configs, i.e. with the default ``delete`` cleanup policy."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_ensure_creates_compacted_topic(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    info = await ensure_topic(config)

    assert info.name == topic_name
    assert info.created is True
    assert info.compacted is True
    assert info.cleanup_policy == "compact"
    assert info.partitions == DEFAULT_PARTITIONS
    assert topic_name in await list_topics(broker.bootstrap_servers)

    described = await describe_topic(config)
    assert described.name == topic_name
    assert described.compacted is True
    assert described.partitions == DEFAULT_PARTITIONS
    assert described.created is False
    assert described.configs.get("cleanup.policy") == "compact"


async def test_ensure_with_partition_count_and_extra_configs(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    info = await ensure_topic(config, partitions=3, extra_configs={"segment.ms": "3600000"})

    assert info.partitions == 3
    assert info.compacted is True
    assert info.configs.get("segment.ms") == "3600000"


async def test_ensure_is_idempotent(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    first = await ensure_topic(config, partitions=4)
    second = await ensure_topic(config, partitions=7)  # an existing topic is never changed

    assert first.created is True
    assert second.created is False
    assert (second.partitions, second.compacted) == (4, True)


async def test_concurrent_ensure_is_safe(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    infos = await asyncio.gather(*(ensure_topic(config, partitions=5) for _ in range(3)))

    assert all(info.compacted for info in infos)
    assert {info.partitions for info in infos} == {5}
    assert topic_name in await list_topics(broker.bootstrap_servers)
    assert (await describe_topic(config)).partitions == 5


async def test_existing_delete_topic_is_refused(broker: BrokerAddress, topic_name: str) -> None:
    await create_plain_topic(broker.bootstrap_servers, topic_name, partitions=3)
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    with pytest.raises(TopicError, match=r"cleanup\.policy"):
        await ensure_topic(config)

    info = await ensure_topic(config, allow_non_compacted=True)
    assert info.compacted is False
    assert info.cleanup_policy == "delete"
    assert info.partitions == 3
    assert info.created is False

    described = await describe_topic(config)
    assert (described.compacted, described.cleanup_policy) == (False, "delete")


async def test_describe_missing_topic_does_not_create_it(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)

    with pytest.raises(TopicError, match="does not exist"):
        await describe_topic(config)

    assert topic_name not in await list_topics(broker.bootstrap_servers)


@pytest.mark.parametrize("call", ["describe", "ensure"])
async def test_unreachable_cluster_raises_unavailable(call: str) -> None:
    config = KafkaConfig(f"127.0.0.1:{closed_port()}", "whatever", connect_timeout_s=1.0)
    operation = describe_topic(config) if call == "describe" else ensure_topic(config)

    # the bound is generous: the point is that the call gives up instead of hanging
    with pytest.raises(KafkaUnavailableError) as info:
        await asyncio.wait_for(operation, timeout=15)

    assert info.value.retriable is True
    assert "127.0.0.1" in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "has space", "slash/topic", "ümlaut", "a" * 250, "colon:topic", None, 42],
)
def test_invalid_topic_names_are_rejected(name: object) -> None:
    with pytest.raises(ValidationError) as info:
        KafkaConfig("127.0.0.1:9092", name)  # type: ignore[arg-type]
    assert info.value.field == "topic"


@pytest.mark.parametrize("name", ["a", "snapbus.workspace-sessions", "A_b-c.9", "x" * 249])
def test_valid_topic_names_are_accepted(name: str) -> None:
    assert KafkaConfig("127.0.0.1:9092", name).topic == name


@pytest.mark.parametrize(("policy", "configs", "window"), [
    ("compact", {}, 86_400_000),  # not reported (some brokers report only what was set)
    ("compact", {"delete.retention.ms": "1000"}, 1000),
    ("compact,delete", {"delete.retention.ms": "5000", "retention.ms": "2000"}, 2000),
    ("compact,delete", {"delete.retention.ms": "5000", "retention.ms": "-1"}, 5000),
    ("compact", {"delete.retention.ms": "5000", "retention.ms": "2000"}, 5000),
])
def test_tombstone_retention_is_the_shortest_window_that_applies(
    policy: str, configs: dict[str, str], window: int
) -> None:
    from snapbus.topic import TopicInfo
    assert TopicInfo("t", 1, policy, {"cleanup.policy": policy, **configs}
                     ).tombstone_retention_ms == window


async def test_ensure_refuses_extra_configs_that_are_not_compacted(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    with pytest.raises(TopicError, match=r"cleanup\.policy=delete"):
        await ensure_topic(config, extra_configs={"cleanup.policy": "delete"})
    assert topic_name not in await list_topics(broker.bootstrap_servers)  # nothing created
    info = await ensure_topic(config, extra_configs={"cleanup.policy": "compact,delete"})
    assert info.compacted
