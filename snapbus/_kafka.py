"""The one place where aiokafka is started and its errors become snapbus errors (internal)."""

from __future__ import annotations

import asyncio
import contextlib
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
        detail = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or repr(exc)
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {config.bootstrap_servers} to start the {what} "
            f"within {config.connect_timeout_s:g} s ({detail}); check --bootstrap-servers "
            "or SNAPBUS_BOOTSTRAP_SERVERS"
        ) from exc


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
