"""Connection settings: where the Kafka cluster is, which topic, and how to authenticate.

One frozen `KafkaConfig` carries everything a client needs to reach the cluster; the publisher,
the view, replay and the CLI all take one. `KafkaConfig.from_env()` reads the ``SNAPBUS_*``
environment variables (flags given explicitly win over the environment):

==================================  ===========================================================
``SNAPBUS_BOOTSTRAP_SERVERS``       ``host:port[,host:port...]``
``SNAPBUS_TOPIC``                   the snapshot topic (default ``snapbus.workspace-sessions``)
``SNAPBUS_SECURITY_PROTOCOL``       ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT``,
                                    ``SASL_SSL``
``SNAPBUS_SASL_MECHANISM``          ``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``
``SNAPBUS_SASL_USERNAME``           SASL user
``SNAPBUS_SASL_PASSWORD``           SASL password
``SNAPBUS_SSL_CAFILE``              CA bundle to verify the brokers
``SNAPBUS_SSL_CERTFILE``            client certificate (mutual TLS)
``SNAPBUS_SSL_KEYFILE``             client private key (mutual TLS)
``SNAPBUS_CLIENT_ID``               client id shown in broker logs (default ``snapbus``)
``SNAPBUS_HISTORY_TOPIC``           optional time-retained topic receiving every change
==================================  ===========================================================
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from snapbus.errors import ConfigError, ValidationError

__all__ = ["DEFAULT_TOPIC", "KafkaConfig", "SecurityProtocol", "validate_topic_name"]

DEFAULT_TOPIC = "snapbus.workspace-sessions"
"""The topic used when none is configured."""

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
_PROTOCOLS: tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
_SERVER_RE = re.compile(r"\[?[A-Za-z0-9.:_-]+\]?:\d{1,5}")


def validate_topic_name(name: object) -> str:
    """Return `name` if it is a legal Kafka topic name, else raise `ValidationError`.

    Legal: 1 to 249 characters from ``[A-Za-z0-9._-]``, and not ``.`` or ``..``.
    """
    if not isinstance(name, str) or not _TOPIC_RE.fullmatch(name) or name in (".", ".."):
        raise ValidationError(
            f"invalid topic name {name!r}: use 1-249 characters from A-Z a-z 0-9 . _ -",
            field="topic",
        )
    return name


def _validate_servers(servers: str) -> str:
    parts = [p.strip() for p in servers.split(",") if p.strip()]
    if not parts:
        raise ConfigError("bootstrap servers are empty; give host:port[,host:port...]")
    for part in parts:
        if not _SERVER_RE.fullmatch(part):
            raise ConfigError(f"invalid bootstrap server {part!r}; expected host:port")
    return ",".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class KafkaConfig:
    """How to reach the Kafka cluster and which topic holds the snapshots."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list of brokers to bootstrap from."""
    topic: str = DEFAULT_TOPIC
    """The compacted snapshot topic."""
    client_id: str = "snapbus"
    """Client id shown in broker logs and metrics."""
    security_protocol: SecurityProtocol = "PLAINTEXT"
    """Transport: plain TCP or TLS, with or without SASL."""
    sasl_mechanism: str | None = None
    """``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512`` when a SASL protocol is used."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: str | None = dataclasses.field(default=None, repr=False)
    """SASL password (never shown in reprs)."""
    ssl_cafile: str | None = None
    """CA bundle that signs the brokers' certificates (default: the system store)."""
    ssl_certfile: str | None = None
    """Client certificate for mutual TLS."""
    ssl_keyfile: str | None = None
    """Client private key for mutual TLS."""
    connect_timeout_s: float = 15.0
    """How long a client may take to reach the cluster before `KafkaUnavailableError`."""
    history_topic: str | None = None
    """Optional non-compacted topic that also receives every change (full history)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bootstrap_servers", _validate_servers(self.bootstrap_servers))
        validate_topic_name(self.topic)
        if self.history_topic is not None:
            validate_topic_name(self.history_topic)
            if self.history_topic == self.topic:
                raise ConfigError("history_topic must differ from the snapshot topic")
        if self.security_protocol not in _PROTOCOLS:
            known = ", ".join(_PROTOCOLS)
            raise ConfigError(f"security protocol {self.security_protocol!r} is not one of {known}")
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in _MECHANISMS:
                known = ", ".join(_MECHANISMS)
                raise ConfigError(f"{self.security_protocol} needs sasl_mechanism, one of {known}")
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigError(f"{self.security_protocol} needs a SASL username and password")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r} does not exist or is not a file")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ConfigError("mutual TLS needs both ssl_certfile and ssl_keyfile")
        if not self.connect_timeout_s > 0:  # (NaN too)
            raise ConfigError("connect_timeout_s must be positive")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> KafkaConfig:
        """Build a config from ``SNAPBUS_*`` variables; keyword arguments that are not None win.

        Raises:
            ConfigError, ValidationError: a setting is malformed.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(f"SNAPBUS_{field.name.upper()}")
            if raw not in (None, ""):
                values[field.name] = raw
        if "connect_timeout_s" in values:
            raw = values["connect_timeout_s"]
            try:
                values["connect_timeout_s"] = float(raw)
            except ValueError:
                raise ConfigError(f"SNAPBUS_CONNECT_TIMEOUT_S={raw!r} is not a number of "
                                  "seconds") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> KafkaConfig:
        """Return a copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def client_kwargs(self) -> dict[str, Any]:
        """Return the keyword arguments that make an aiokafka client use these settings."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs
