"""Ensure and describe the compacted snapshot topic.

The topic must use ``cleanup.policy=compact``: with ``delete`` the broker drops old segments
after the retention time and sessions that were not updated in a while silently vanish from
every view rebuilt after that. `ensure_topic` creates a missing topic compacted and refuses an
existing one that is not (unless told to allow it).

Topics are only looked up with whole-cluster metadata requests: some brokers auto-create any
topic named in a Metadata request, with the wrong configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from snapbus._kafka import KAFKA_ERRORS, admin_client, open_admin_client, translate
from snapbus.config import KafkaConfig
from snapbus.errors import KafkaUnavailableError, SnapbusError, TopicError

__all__ = ["DEFAULT_DELETE_RETENTION_MS", "DEFAULT_PARTITIONS", "TopicInfo", "describe_topic",
           "ensure_topic"]

DEFAULT_PARTITIONS = 12
"""Partitions of a topic created by snapbus (the view reads all of them)."""

DEFAULT_DELETE_RETENTION_MS = 86_400_000
"""Kafka's default ``delete.retention.ms`` (24 h): taken when the broker does not report it."""

LEADERS_TIMEOUT_S = 30.0
"""How long `ensure_topic` waits for every partition of a topic it created to have a leader."""

log = logging.getLogger("snapbus.topic")


@dataclasses.dataclass(frozen=True, slots=True)
class TopicInfo:
    """What the cluster says about the snapshot topic."""

    name: str
    """The topic name."""
    partitions: int
    """Number of partitions."""
    cleanup_policy: str
    """``compact``, ``delete`` or ``compact,delete``; ``delete`` when not set (Kafka's default)."""
    configs: dict[str, str]
    """Topic configs the broker reported (some brokers report only those set at creation)."""
    created: bool = False
    """True when `ensure_topic` created the topic just now."""
    replication_factor: int = 1
    """Replicas of the least replicated partition (from metadata)."""
    brokers: int = 1
    """Brokers in the cluster's metadata."""

    @property
    def compacted(self) -> bool:
        """Whether compaction is among the cleanup policies."""
        return "compact" in self.cleanup_policy.split(",")

    @property
    def tombstone_retention_ms(self) -> int:
        """How long the broker surely keeps a tombstone after it reached the log (ms).

        Compaction drops a tombstone ``delete.retention.ms`` after the cleaner first saw it,
        which is never before it was written; a ``delete`` policy drops whole segments after
        ``retention.ms``. The smaller of the two that apply; Kafka's default 24 h when the
        broker reports neither (some brokers report only the configs set at creation).
        """
        window = _int_config(self.configs, "delete.retention.ms", DEFAULT_DELETE_RETENTION_MS)
        if "delete" in self.cleanup_policy.split(","):
            retention = _int_config(self.configs, "retention.ms", -1)
            if retention >= 0:
                window = min(window, retention)
        return window


def _int_config(configs: dict[str, str], name: str, default: int) -> int:
    try:
        return int(configs[name])
    except (KeyError, ValueError):
        return default


def _topic_error(exc: BaseException, config: KafkaConfig, doing: str) -> SnapbusError:
    """`translate`, but a broker's refusal that is not about reaching it is a `TopicError`."""
    error = translate(exc, config, f"{doing} topic {config.topic!r}")
    if type(error) is KafkaUnavailableError and not error.retriable:
        return TopicError(str(error))
    return error


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    partitions: int
    replication_factor: int
    leaderless: int
    """Partitions without a leader (or reported with an error)."""
    brokers: int


async def _layout(admin: Any, topic: str) -> _Layout | None:
    for entry in await admin.describe_topics(None):  # all topics: never auto-creates
        if entry["topic"] == topic:
            parts = entry["partitions"]
            return _Layout(
                partitions=len(parts),
                replication_factor=min((len(p["replicas"]) for p in parts), default=0),
                leaderless=sum(1 for p in parts if p["error_code"] or p["leader"] < 0),
                brokers=await _broker_count(admin),
            )
    return None


async def _broker_count(admin: Any) -> int:
    return max(1, len((await admin.describe_cluster())["brokers"]))


async def _configs(admin: Any, topic: str) -> dict[str, str] | None:
    """The topic's configs; None when the broker asked does not know the topic (yet: on a
    cluster, brokers learn of a new topic moments apart)."""
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    configs: dict[str, str] = {}
    for response in responses:
        for resource in response.resources:
            error_code, error_message = resource[0], resource[1]
            if error_code:
                error = for_code(error_code)
                if error is UnknownTopicOrPartitionError:
                    return None
                raise TopicError(f"cannot read configs of topic {topic!r}: {error.__name__} "
                                 f"{error_message or ''}".rstrip())
            for entry in resource[4]:
                name, value = entry[0], entry[1]
                if value is not None:
                    configs[str(name)] = str(value)
    return configs


async def _describe(admin: Any, topic: str, *, created: bool = False) -> TopicInfo | None:
    layout = await _layout(admin, topic)
    if layout is None:
        return None
    configs = await _configs(admin, topic)
    if configs is None:
        return None
    policy = configs.get("cleanup.policy", "delete")
    return TopicInfo(topic, layout.partitions, policy, configs, created,
                     layout.replication_factor, layout.brokers)


async def _wait_for_leaders(admin: Any, topic: str) -> None:
    """Wait until every partition of a topic just created has a leader: before, a producer's
    first records or a view's first fetch meet "no leader" errors (Kafka elects leaders a
    moment after CreateTopics answers)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEADERS_TIMEOUT_S
    while True:
        layout = await _layout(admin, topic)
        if layout is not None and layout.partitions and not layout.leaderless:
            return
        if loop.time() > deadline:
            missing = "all" if layout is None else f"{layout.leaderless} of {layout.partitions}"
            raise TopicError(f"topic {topic!r} was created but {missing} partitions have no "
                             f"leader after {LEADERS_TIMEOUT_S:g} s: check the brokers")
        await asyncio.sleep(0.05)


async def describe_topic(config: KafkaConfig) -> TopicInfo:
    """Return the topic's partitions and configuration.

    Raises:
        TopicError: the topic does not exist.
        KafkaUnavailableError: the cluster cannot be reached.
    """
    async with admin_client(config) as admin:
        try:
            info = await _describe(admin, config.topic)
        except KAFKA_ERRORS as exc:
            raise _topic_error(exc, config, "describing") from exc
    if info is None:
        raise TopicError(
            f"topic {config.topic!r} does not exist on {config.bootstrap_servers}; "
            "create it with `snapbus topic ensure`"
        )
    return info


async def describe_if_exists(config: KafkaConfig) -> TopicInfo | None:
    """`describe_topic`, but None when the topic does not exist (internal: for the view).

    Raises:
        TopicError: the configs cannot be read.
        KafkaUnavailableError: the cluster cannot be reached.
    """
    async with admin_client(config) as admin:
        try:
            return await _describe(admin, config.topic)
        except KAFKA_ERRORS as exc:
            raise _topic_error(exc, config, "describing") from exc


class TopicWatch:
    """`describe_if_exists` again and again over one admin connection (internal: for the view's
    periodic check, which would otherwise connect, and on a secured cluster authenticate,
    every time). A failed describe drops the connection; the next one opens a new one."""

    def __init__(self, config: KafkaConfig) -> None:
        self._config = config
        self._admin: AIOKafkaAdminClient | None = None

    async def describe(self) -> TopicInfo | None:
        """The topic's `TopicInfo`, None when it does not exist.

        Raises:
            TopicError: the configs cannot be read.
            KafkaUnavailableError: the cluster cannot be reached.
        """
        if self._admin is None:
            self._admin = await open_admin_client(self._config)
        try:
            return await _describe(self._admin, self._config.topic)
        except KAFKA_ERRORS as exc:
            await self.close()
            raise _topic_error(exc, self._config, "describing") from exc

    async def close(self) -> None:
        """Disconnect; safe to call twice."""
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()


async def ensure_topic(
    config: KafkaConfig,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    replication_factor: int | None = None,
    min_insync_replicas: int | None = None,
    allow_non_compacted: bool = False,
    extra_configs: dict[str, str] | None = None,
) -> TopicInfo:
    """Create the topic compacted if it is missing, then check that it is compacted.

    Safe to call from many pods at once. An existing topic is never changed (one with a
    single replica on a cluster of several brokers is logged as a warning). A new topic gets
    ``cleanup.policy=compact``, ``replication_factor`` replicas (default ``min(3, brokers)``),
    ``min.insync.replicas`` (default ``min(2, replication factor)``: with ``acks=all`` a
    publish is then on two brokers before it is acknowledged) and `extra_configs`, which win;
    everything else (``delete.retention.ms``, ``min.compaction.lag.ms``, ...) is the cluster's
    default, which views read back at start (docs/compaction.md says why). It returns once
    every partition of a topic it created has a leader.

    Raises:
        TopicError: the topic exists without ``cleanup.policy=compact``, or `extra_configs`
            would create it so (and `allow_non_compacted` is false), or it cannot be created.
        KafkaUnavailableError: the cluster cannot be reached.
    """
    topic = config.topic
    policy = (extra_configs or {}).get("cleanup.policy", "compact")
    if "compact" not in policy.split(",") and not allow_non_compacted:
        raise TopicError(f"extra_configs sets cleanup.policy={policy} for topic {topic!r}; "
                         "snapbus needs compact (or pass allow_non_compacted)")
    async with admin_client(config) as admin:
        try:
            info = await _describe(admin, topic)
            if info is None:
                brokers = await _broker_count(admin)
                replicas = replication_factor or min(3, brokers)
                insync = min_insync_replicas or min(2, replicas)
                configs = {"cleanup.policy": "compact", "min.insync.replicas": str(insync),
                           **(extra_configs or {})}
                response = await admin.create_topics(
                    [NewTopic(topic, partitions, replicas, topic_configs=configs)]
                )
                for _name, code, *rest in response.topic_errors:
                    error = for_code(code)
                    if code and error is not TopicAlreadyExistsError:
                        message = rest[0] if rest and rest[0] else error.__name__
                        raise TopicError(f"cannot create topic {topic!r}: {message}")
                info = None
                for _ in range(50):  # metadata can lag a creation briefly
                    info = await _describe(admin, topic, created=True)
                    if info is not None:
                        break
                    await asyncio.sleep(0.1)
                if info is None:
                    raise TopicError(f"topic {topic!r} was created but does not show up")
                await _wait_for_leaders(admin, topic)
            elif info.replication_factor == 1 and info.brokers > 1:
                log.warning("topic %s has replication factor 1 on a cluster of %d brokers: "
                            "one broker down blocks its partitions, one disk lost loses "
                            "them; raise it to %d (kafka-reassign-partitions) and set "
                            "min.insync.replicas=2", topic, info.brokers, min(3, info.brokers))
        except KAFKA_ERRORS as exc:
            raise _topic_error(exc, config, "ensuring") from exc
    if not info.compacted and not allow_non_compacted:
        raise TopicError(
            f"topic {topic!r} has cleanup.policy={info.cleanup_policy}, not compact: the broker "
            "would delete sessions that are not updated within the retention time. Use a "
            "compacted topic (or pass allow_non_compacted / --allow-non-compacted to accept it)"
        )
    return info
