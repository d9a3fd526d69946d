"""The errors snapbus raises, under one root.

::

    SnapbusError                 root: catch this to catch everything snapbus raises
    ├── ValidationError          bad input (a field, a UUID, a topic name); nothing was sent
    ├── DecodeError              bytes that are not a valid snapshot record; ``reason`` says why
    ├── SchemaError              a schema file is invalid, or a candidate schema is incompatible
    ├── ConfigError              a setting is missing or malformed
    ├── BrokerError              the embedded broker could not start or died
    ├── KafkaUnavailableError    the Kafka cluster could not be reached in time, or could not
    │   │                        serve a request (retriable unless the broker said otherwise)
    │   └── KafkaAuthenticationError  reached, but it refused this client: SASL or TLS
    │                                 authentication failed, or an ACL denies the request (not
    │                                 retriable: fix the credentials, certificates or ACLs)
    ├── TopicError               the topic is missing or not compacted
    ├── CorruptBatchError        a record batch of the topic fails its CRC check on every fetch
    ├── PublishError             a publish was not acknowledged (retriable unless said otherwise),
    │                            or the publisher is not started (not retriable)
    ├── ViewError                the view is closed, failed, or was used before it started
    │   └── ViewTimeoutError     `wait_for` or `barrier` did not return within its timeout
    │                            (retriable; also an ``asyncio.TimeoutError``)
    └── CheckpointError          a checkpoint file is missing, corrupt or foreign

Every error carries a one-line message saying what went wrong and what to do, and a
``retriable`` hint: ``True`` when trying the same call again later can succeed. Errors from
aiokafka are translated in one place (``snapbus._kafka.translate``); docs/errors.md has the
table.
"""

from __future__ import annotations

import asyncio
from typing import Literal

__all__ = [
    "BrokerError",
    "CheckpointError",
    "ConfigError",
    "CorruptBatchError",
    "DecodeError",
    "DecodeReason",
    "KafkaAuthenticationError",
    "KafkaUnavailableError",
    "PublishError",
    "SchemaError",
    "SnapbusError",
    "TopicError",
    "ValidationError",
    "ViewError",
    "ViewTimeoutError",
]


class SnapbusError(Exception):
    """Root of every error snapbus raises."""

    retriable: bool = False
    """Whether trying the same call again later can succeed."""

    def __init__(self, message: str = "", *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ValidationError(SnapbusError, ValueError):
    """Input was rejected before anything was sent (bad field, UUID, topic name, size)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        """The offending field's name, when the error is about one field."""


DecodeReason = Literal[
    "empty",
    "bad_marker",
    "truncated",
    "unknown_fingerprint",
    "corrupt_body",
    "invalid_field",
    "bad_key",
]


class DecodeError(SnapbusError, ValueError):
    """Bytes read from the topic are not a valid snapshot record.

    ``reason`` names the problem: ``empty`` (zero-length value, which is not a tombstone),
    ``bad_marker`` (does not start with the single-object marker ``C3 01``), ``truncated``
    (shorter than the header), ``unknown_fingerprint`` (writer schema not known here: deploy the
    newer schema), ``corrupt_body`` (the Avro body does not parse), ``invalid_field`` (it parses
    but a field is invalid, e.g. a malformed UUID) or ``bad_key`` (the record key is not a UUID).
    """

    def __init__(self, message: str, *, reason: DecodeReason) -> None:
        super().__init__(message)
        self.reason: DecodeReason = reason


class SchemaError(SnapbusError):
    """A schema file is invalid, or a candidate schema is incompatible with the known ones."""


class ConfigError(SnapbusError, ValueError):
    """A setting is missing or malformed."""


class BrokerError(SnapbusError):
    """The embedded broker could not start, or stopped unexpectedly."""


class KafkaUnavailableError(SnapbusError):
    """The Kafka cluster could not be reached within the configured time, or could not serve
    a request (a broker error): retriable unless the broker's answer says it will not change
    (an unsupported version, say)."""

    retriable = True


class KafkaAuthenticationError(KafkaUnavailableError):
    """The cluster answered but refused this client: SASL authentication failed, the broker's
    certificate did not verify, the broker wants a client certificate it did not get, or an
    ACL does not authorize the request.

    Not retriable: the same settings fail again. The message names the cause and the setting
    to fix, never the password.
    """

    retriable = False


class TopicError(SnapbusError):
    """The topic is missing, or exists with a configuration snapbus refuses (not compacted).

    Retriable when the broker said "unknown topic or partition" in the middle of a read, or
    when a replay took longer than the topic keeps tombstones (``delete.retention.ms``).
    """


class CorruptBatchError(SnapbusError):
    """A record batch of the topic failed its CRC check (or did not parse) on several fetches
    in a row: the broker's copy is damaged.

    Not retriable. Nothing is skipped: every record before the batch was returned, nothing at
    or after it in that partition is, until the broker serves an intact copy (see
    docs/errors.md). `topic`, `partition` and `offset` name the batch's first record wanted
    (-1 when aiokafka's own reading path raised it without saying where).
    """

    def __init__(self, message: str, *, topic: str, partition: int, offset: int) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class PublishError(SnapbusError):
    """A record was not acknowledged by the broker in time; it may or may not be stored.

    Retriable, unless the broker refused it for good (too large, say) or the publisher is not
    started (or was stopped): then ``retriable`` is False.
    """

    retriable = True


class ViewError(SnapbusError):
    """The view cannot answer: it was closed, it failed, or it was never started."""


class ViewTimeoutError(ViewError, asyncio.TimeoutError):
    """`SnapshotView.wait_for` or `barrier` did not return within its `timeout`.

    Retriable: the view is running, only behind (or the broker slow). It is also an
    ``asyncio.TimeoutError``, which code written for ``asyncio.wait_for`` catches.
    """

    retriable = True


class CheckpointError(SnapbusError):
    """A checkpoint file is missing, corrupt, foreign or of another format version."""
