"""The errors snapbus raises, under one root.

::

    SnapbusError                 root: catch this to catch everything snapbus raises
    ├── ValidationError          bad input (a field, a UUID, a topic name); nothing was sent
    ├── DecodeError              bytes that are not a valid snapshot record; ``reason`` says why
    ├── SchemaError              a schema file is invalid, or a candidate schema is incompatible
    ├── ConfigError              a setting is missing or malformed
    ├── BrokerError              the embedded broker could not start or died
    ├── KafkaUnavailableError    the Kafka cluster could not be reached in time (retriable)
    │   └── KafkaAuthenticationError  reached, but SASL or TLS authentication failed (not
    │                                 retriable: fix the credentials or certificates)
    ├── TopicError               the topic is missing or not compacted
    ├── PublishError             a publish was not acknowledged (retriable unless said otherwise)
    └── ViewError                the view is closed, failed, or was used before it started

Every error carries a message saying what went wrong and what to do, and a ``retriable`` hint:
``True`` when trying the same call again later can succeed.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "BrokerError",
    "ConfigError",
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
]


class SnapbusError(Exception):
    """Root of every error snapbus raises."""

    retriable: bool = False
    """Whether trying the same call again later can succeed."""


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
    """The Kafka cluster could not be reached within the configured time."""

    retriable = True


class KafkaAuthenticationError(KafkaUnavailableError):
    """The cluster answered but refused this client: SASL authentication failed, the broker's
    certificate did not verify, or the broker wants a client certificate it did not get.

    Not retriable: the same settings fail again. The message names the cause and the setting
    to fix, never the password.
    """

    retriable = False


class TopicError(SnapbusError):
    """The topic is missing, or exists with a configuration snapbus refuses (not compacted)."""


class PublishError(SnapbusError):
    """A record was not acknowledged by the broker in time; it may or may not be stored."""

    retriable = True


class ViewError(SnapbusError):
    """The view cannot answer: it was closed, it failed, or it was never started."""
