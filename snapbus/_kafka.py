"""The one place where aiokafka is started and its errors become snapbus errors (internal)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    ConsumerStoppedError,
    CorruptRecordException,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    RequestTimedOutError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
    UnsupportedSaslMechanismError,
)

from snapbus._aiokafka import probe_connection
from snapbus.config import KafkaConfig
from snapbus.errors import (
    CorruptBatchError,
    KafkaAuthenticationError,
    KafkaUnavailableError,
    SnapbusError,
    TopicError,
)

__all__ = ["KAFKA_ERRORS", "admin_client", "start_client", "translate"]

_PROBE_TIMEOUT_S = 5.0
"""Bound of the one connection `_diagnose` opens to name why a secured start failed."""

_PEER_ALERTS = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")
"""OpenSSL reasons of TLS alerts the broker sent (as opposed to checks this client made)."""


async def start_client(client: Any, config: KafkaConfig, what: str) -> None:
    """Start an aiokafka client within the config's connect timeout.

    Raises:
        KafkaAuthenticationError: the cluster refused the credentials or the certificates.
        KafkaUnavailableError: the cluster did not answer in time, or refused the connection.
    """
    try:
        await asyncio.wait_for(client.start(), timeout=config.connect_timeout_s)
    except asyncio.CancelledError:  # (the caller's timeout: leave no half-started client)
        with contextlib.suppress(Exception):
            await client.close() if hasattr(client, "close") else await client.stop()
        raise
    except (asyncio.TimeoutError, KafkaConnectionError, KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await client.close() if hasattr(client, "close") else await client.stop()
        if isinstance(exc, asyncio.TimeoutError):
            detail = f"no answer within {config.connect_timeout_s:g} s"
        else:
            detail = str(exc) or repr(exc)
            if "Unable to bootstrap from" in detail:  # aiokafka lists (host, port, family)
                detail = "no broker answered"
            # aiokafka's bootstrap only logs why each server failed, then raises "Unable to
            # bootstrap": a wrong password fails fast but the error would not say so.
            if config.security_protocol != "PLAINTEXT":
                problem = await _diagnose(config, what)
                if isinstance(problem, KafkaAuthenticationError):
                    raise problem from exc
                if problem:
                    detail = f"{detail}; {problem}"
        hint = "check --bootstrap-servers or SNAPBUS_BOOTSTRAP_SERVERS"
        if config.security_protocol != "PLAINTEXT":
            hint += f" and the {config.security_protocol} settings"
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {config.bootstrap_servers} to start the {what} "
            f"({detail}); {hint}"
        ) from exc


async def _diagnose(config: KafkaConfig, what: str) -> KafkaAuthenticationError | str | None:
    """Connect to each bootstrap server as aiokafka does; return why a secured connection fails.

    A refused credential or certificate becomes a `KafkaAuthenticationError`; another TLS
    failure a short description; anything else (or success) None.
    """
    kwargs = config.client_kwargs()
    del kwargs["bootstrap_servers"]
    found: str | None = None
    for server in config.bootstrap_servers.split(","):
        host, _, port = server.rpartition(":")
        timeout = min(_PROBE_TIMEOUT_S, config.connect_timeout_s)
        try:
            await probe_connection(host.strip("[]"), int(port), timeout, kwargs)
        except (OSError, KafkaError, asyncio.TimeoutError) as exc:
            problem = _classify(exc, config, what)
            if isinstance(problem, KafkaAuthenticationError):
                return problem
            found = found or problem
    return found


def _classify(exc: BaseException, config: KafkaConfig, what: str
              ) -> KafkaAuthenticationError | str | None:
    def refused(cause: str, hint: str) -> KafkaAuthenticationError:
        return KafkaAuthenticationError(
            f"cannot connect the {what} to Kafka at {config.bootstrap_servers}: {cause}; {hint}")

    # aiokafka builds some of these from an error code, with the connection as argument
    said = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
    if isinstance(exc, SaslAuthenticationFailed):
        return refused(
            f"SASL authentication failed for user {config.sasl_username!r} with "
            f"{config.sasl_mechanism} (broker: {said or exc.description})",
            "check --sasl-username/--sasl-password (SNAPBUS_SASL_USERNAME, "
            "SNAPBUS_SASL_PASSWORD) and --sasl-mechanism",
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return refused(
            f"the broker does not enable SASL mechanism {config.sasl_mechanism}"
            + (f" ({said})" if said else ""),
            "set --sasl-mechanism (SNAPBUS_SASL_MECHANISM) to one it enables",
        )
    tls_error = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if not isinstance(tls_error, ssl.SSLError):
        return None
    if isinstance(tls_error, ssl.SSLCertVerificationError):
        return refused(
            f"certificate verify failed: {tls_error.verify_message}",
            "--ssl-cafile (SNAPBUS_SSL_CAFILE) must name the CA that signed the broker's "
            "certificate, and the certificate must name the host in --bootstrap-servers",
        )
    reason = tls_error.reason or ""
    if reason.startswith(_PEER_ALERTS) and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        alert = reason.split("_ALERT_", 1)[1].lower().replace("_", " ")
        if config.ssl_certfile is None:
            return refused(
                f"the broker requires a client certificate (TLS alert: {alert})",
                "set --ssl-certfile and --ssl-keyfile (SNAPBUS_SSL_CERTFILE, "
                "SNAPBUS_SSL_KEYFILE) to a certificate the broker trusts",
            )
        return refused(
            f"the broker rejected the client certificate {config.ssl_certfile} "
            f"(TLS alert: {alert})",
            "it must be signed by a CA the broker trusts, and be valid now",
        )
    return f"TLS handshake failed: {reason or tls_error}"


async def open_admin_client(config: KafkaConfig) -> AIOKafkaAdminClient:
    """Return a started admin client (the caller closes it).

    Raises:
        KafkaAuthenticationError, KafkaUnavailableError: as `start_client`.
    """
    admin = AIOKafkaAdminClient(
        request_timeout_ms=int(config.connect_timeout_s * 1000), **config.client_kwargs()
    )
    await start_client(admin, config, "admin client")
    return admin


@contextlib.asynccontextmanager
async def admin_client(config: KafkaConfig) -> AsyncIterator[AIOKafkaAdminClient]:
    """Yield a started admin client, closed on exit."""
    admin = await open_admin_client(config)
    try:
        yield admin
    finally:
        await admin.close()


_AUTHORIZATION = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError,
                  GroupAuthorizationFailedError, TransactionalIdAuthorizationFailed)
"""Broker answers that an ACL denies the request."""

KAFKA_ERRORS: tuple[type[BaseException], ...] = (
    KafkaError, OSError, asyncio.TimeoutError, ConsumerStoppedError)
"""What an aiokafka call can raise that `translate` turns into a snapbus error."""


def translate(exc: BaseException, config: KafkaConfig, doing: str) -> SnapbusError:
    """The snapbus error for an aiokafka (or socket) error raised while `doing` something:
    the one mapping of the library (docs/errors.md has the table).

    - An authentication or authorization refusal (SASL, TLS certificates, ACLs):
      `KafkaAuthenticationError`, not retriable.
    - An unknown topic or partition: `TopicError`, retriable (metadata may lag a creation).
    - A corrupt record: `CorruptBatchError`.
    - Anything else, a timeout, a lost connection or a broker error: `KafkaUnavailableError`,
      retriable when aiokafka says the error is (timeouts and socket errors always are).
    """
    if isinstance(exc, SnapbusError):
        return exc
    where = f"{doing} on {config.bootstrap_servers}"
    if isinstance(exc, asyncio.TimeoutError | KafkaTimeoutError | RequestTimedOutError):
        return KafkaUnavailableError(
            f"{where} timed out ({_said(exc)}); check that the cluster is reachable",
            retriable=True)
    if isinstance(exc, SaslAuthenticationFailed | UnsupportedSaslMechanismError | ssl.SSLError):
        found = _classify(exc, config, "client")
        if isinstance(found, KafkaAuthenticationError):
            return found
        return KafkaAuthenticationError(f"{where} failed: {found or _said(exc)}")
    if isinstance(exc, _AUTHORIZATION):
        return KafkaAuthenticationError(
            f"{where} was refused: {_said(exc)}; grant this client's principal the ACLs it "
            "needs on the topic (Describe and Read; Write to publish)")
    if isinstance(exc, UnknownTopicOrPartitionError):
        return TopicError(f"{where} failed: topic {config.topic!r} or one of its partitions "
                          f"is unknown to the broker ({_said(exc)})", retriable=True)
    if isinstance(exc, CorruptRecordException):
        return CorruptBatchError(f"{where} failed: {_said(exc)}", topic=config.topic,
                                 partition=-1, offset=-1)
    if isinstance(exc, OSError | ConsumerStoppedError):
        return KafkaUnavailableError(f"{where} failed: {_said(exc)}", retriable=True)
    return KafkaUnavailableError(f"{where} failed: {_said(exc)}",
                                 retriable=bool(getattr(exc, "retriable", False)))


def _said(exc: BaseException) -> str:
    """An error's name and what it says, on one line."""
    name = type(exc).__name__
    if isinstance(exc, asyncio.TimeoutError) and not exc.args:
        return "no answer in time"
    said = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
    if isinstance(exc, OSError) and exc.strerror:
        said = exc.strerror
    said = said or getattr(exc, "description", None)  # (a broker error code's meaning)
    said = " ".join(str(said).split()).rstrip(".") if said else ""
    return f"{name}: {said}" if said and said != name else name
