"""snapbus: every pod sees the latest workspace session snapshot.

Snapshots are Avro-encoded (single-object encoding) and published to a compacted Kafka topic
keyed by session id; every pod keeps an in-memory materialized view that replays the topic on
start and then follows it live.

The public API is what this module exports; `snapbus.broker.EmbeddedBroker` (extra
``snapbus[broker]``) runs a local broker for development and tests.
"""

from snapbus.cache import WorkspaceCache
from snapbus.codec import decode, decode_key, encode, encode_key
from snapbus.config import KafkaConfig
from snapbus.errors import (
    BrokerError,
    CheckpointError,
    ConfigError,
    CorruptBatchError,
    DecodeError,
    KafkaAuthenticationError,
    KafkaUnavailableError,
    PublishError,
    SchemaError,
    SnapbusError,
    TopicError,
    ValidationError,
    ViewError,
    ViewTimeoutError,
)
from snapbus.janitor import Janitor
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.reader import Event
from snapbus.replay import history, rebuild, replay
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import TopicInfo, describe_topic, ensure_topic
from snapbus.view import Change, ChangeStream, Health, SnapshotView, ViewStats, ViewStatus

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "Change",
    "ChangeStream",
    "CheckpointError",
    "ConfigError",
    "CorruptBatchError",
    "DecodeError",
    "Event",
    "Health",
    "Janitor",
    "KafkaAuthenticationError",
    "KafkaConfig",
    "KafkaUnavailableError",
    "PublishError",
    "Receipt",
    "SchemaError",
    "SnapbusError",
    "SnapshotPublisher",
    "SnapshotView",
    "TopicError",
    "TopicInfo",
    "ValidationError",
    "ViewError",
    "ViewStats",
    "ViewStatus",
    "ViewTimeoutError",
    "WorkspaceCache",
    "WorkspaceSnapshot",
    "__version__",
    "decode",
    "decode_key",
    "describe_topic",
    "encode",
    "encode_key",
    "ensure_topic",
    "history",
    "rebuild",
    "replay",
]
