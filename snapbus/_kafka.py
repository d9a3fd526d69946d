"""The one place where aiokafka is started and its errors become snapbus errors (internal)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError

from snapbus.config import KafkaConfig
from snapbus.errors import KafkaUnavailableError

__all__ = ["admin_client", "start_client"]


async def start_client(client: Any, config: KafkaConfig, what: str) -> None:
    """Start an aiokafka client within the config's connect timeout.

    Raises:
        KafkaUnavailableError: the cluster did not answer in time, or refused the connection.
    """
    try:
        await asyncio.wait_for(client.start(), timeout=config.connect_timeout_s)
    except (asyncio.TimeoutError, KafkaConnectionError, KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await client.close() if hasattr(client, "close") else await client.stop()
        if isinstance(exc, asyncio.TimeoutError):
            detail = f"no answer within {config.connect_timeout_s:g} s"
        else:
            detail = str(exc) or repr(exc)
        hint = "check --bootstrap-servers or SNAPBUS_BOOTSTRAP_SERVERS"
        if config.security_protocol != "PLAINTEXT":
            hint += f" and the {config.security_protocol} settings"
        if config.security_protocol in ("SSL", "SASL_SSL"):
            tls_problem = await _tls_problem(config)
            if tls_problem:
                detail = f"{detail}; TLS handshake failed: {tls_problem}"
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {config.bootstrap_servers} to start the {what} "
            f"({detail}); {hint}"
        ) from exc


async def _tls_problem(config: KafkaConfig) -> str | None:
    """Try a TLS handshake with the first bootstrap server; return why it fails, if it does.

    aiokafka only logs the cause of a failed TLS connection; this names it in the error.
    """
    host, _, port = config.bootstrap_servers.split(",")[0].rpartition(":")
    context = config.client_kwargs()["ssl_context"]
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port), ssl=context), timeout=5
        )
    except ssl.SSLError as exc:
        return getattr(exc, "verify_message", None) or exc.reason or str(exc)
    except (OSError, asyncio.TimeoutError):
        return None
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return None


@contextlib.asynccontextmanager
async def admin_client(config: KafkaConfig) -> AsyncIterator[AIOKafkaAdminClient]:
    """Yield a started admin client, closed on exit."""
    admin = AIOKafkaAdminClient(
        request_timeout_ms=int(config.connect_timeout_s * 1000), **config.client_kwargs()
    )
    await start_client(admin, config, "admin client")
    try:
        yield admin
    finally:
        await admin.close()
