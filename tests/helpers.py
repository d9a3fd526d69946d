"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from snapbus.snapshot import WorkspaceSnapshot

WAIT_S = 30.0
"""Default bound of condition waits: generous, it only turns a hang into a failure."""


def make_snapshot(**changes: Any) -> WorkspaceSnapshot:
    """A valid snapshot of a new session; `changes` override fields."""
    fields: dict[str, Any] = {
        "session_id": uuid.uuid4(),
        "repo_id": uuid.uuid4(),
        "agent_id": "auth0|agent",
        "agent_name": "agent-1",
        "changeset_id": uuid.uuid4(),
        "intent": "refactor the parser",
        "base_commit": "0123456789abcdef0123456789abcdef01234567",
        "state": "active",
        "mode": "ephemeral",
    }
    fields.update(changes)
    return WorkspaceSnapshot(**fields)


async def eventually(predicate: Callable[[], Any], timeout: float = WAIT_S,
                     what: str = "condition") -> None:
    """Wait until `predicate()` (maybe a coroutine) is true: a condition wait with a timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.01)


async def list_topics(bootstrap_servers: str) -> set[str]:
    """Every topic on the cluster (a whole-cluster listing never auto-creates anything)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()
