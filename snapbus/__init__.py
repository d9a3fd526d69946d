"""snapbus: every pod sees the latest workspace session snapshot.

Snapshots are Avro-encoded (single-object encoding) and published to a compacted Kafka topic
keyed by session id; every pod keeps an in-memory materialized view that replays the topic on
start and then follows it live.
"""

from snapbus.codec import decode, decode_key, encode, encode_key
from snapbus.errors import (
    BrokerError,
    ConfigError,
    DecodeError,
    KafkaUnavailableError,
    PublishError,
    SchemaError,
    SnapbusError,
    TopicError,
    ValidationError,
    ViewError,
)
from snapbus.snapshot import WorkspaceSnapshot

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "ConfigError",
    "DecodeError",
    "KafkaUnavailableError",
    "PublishError",
    "SchemaError",
    "SnapbusError",
    "TopicError",
    "ValidationError",
    "ViewError",
    "WorkspaceSnapshot",
    "__version__",
    "decode",
    "decode_key",
    "encode",
    "encode_key",
]
