"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from snapbus.broker import EmbeddedBroker
from snapbus.config import KafkaConfig
from snapbus.publisher import SnapshotPublisher
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import SnapshotView

WAIT_S = 30.0
"""Default bound of condition waits: generous, it only turns a hang into a failure."""

EXTERNAL_BOOTSTRAP_SERVERS = os.environ.get("SNAPBUS_TEST_BOOTSTRAP_SERVERS") or None
"""An external cluster the integration tests run on instead of an embedded broker (None: the
session starts one)."""

ENGINE = os.environ.get("SNAPBUS_TEST_ENGINE") or ("kafka" if EXTERNAL_BOOTSTRAP_SERVERS
                                                   else "tansu")
"""The broker the integration tests run on, ``tansu`` or ``kafka``: the embedded engine
started, and what engine-specific assertions expect. Default ``tansu``; with an external
cluster ``kafka`` (Apache Kafka or a broker that behaves like it)."""
if ENGINE not in ("tansu", "kafka"):
    raise RuntimeError(f"SNAPBUS_TEST_ENGINE={ENGINE!r}: use tansu or kafka")

KEYLESS_RECORDS_STORED = ENGINE == "tansu"
"""Whether the broker stores a record without a key on a compacted topic (Apache Kafka refuses
it with INVALID_RECORD; Tansu stores it, so views must cope with one)."""

KAFKA_TEST_CONFIG: dict[str, object] = {
    # the log cleaner looks for work every half second instead of every 15 s, so tests that
    # wait for compaction finish in seconds (topics still opt in with their own settings)
    "log.cleaner.backoff.ms": 500,
}
"""Broker settings of the test suite's Kafka brokers."""


def new_broker(*, durable: bool = False, **options: Any) -> EmbeddedBroker:
    """An embedded broker of the engine under test. `durable`: its data survives ``kill()``
    (Tansu on S3 storage; Kafka always keeps its log on disk)."""
    if ENGINE == "kafka":
        config = {**KAFKA_TEST_CONFIG, **options.pop("broker_config", {})}
        return EmbeddedBroker(engine="kafka", broker_config=config, **options)
    return EmbeddedBroker(durable=durable, **options)


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


async def topic_partitions(bootstrap_servers: str, topic: str) -> list[int]:
    """The topic's partition numbers (empty if it does not exist), from whole-cluster metadata
    (naming the topic would auto-create it on some brokers)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        for entry in await admin.describe_topics():
            if entry["topic"] == topic:
                return sorted(p["partition"] for p in entry["partitions"])
        return []
    finally:
        await admin.close()


async def list_topics(bootstrap_servers: str) -> set[str]:
    """Every topic on the cluster (a whole-cluster listing never auto-creates anything)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def snapbus_process(*args: str, env: Mapping[str, str] | None = None
                          ) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """Run ``python -m snapbus ARGS``, yield the first line it prints ("" if it printed none
    before exiting) and the process, and SIGTERM it afterwards. With `env`, the child gets
    these ``SNAPBUS_*`` variables instead of this process's."""
    child_env = None
    if env is not None:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPBUS_")}
        child_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapbus", *args, env=child_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        yield (await asyncio.wait_for(proc.stdout.readline(), WAIT_S)).decode(), proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), WAIT_S)


@contextlib.asynccontextmanager
async def serve_command(*args: str, env: Mapping[str, str] | None = None
                        ) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """Run a ``snapbus serve`` command line (`snapbus_process`), yield the HTTP URL it
    announces and the process."""
    async with snapbus_process(*args, env=env) as (line, proc):
        assert line.startswith("serving http://127.0.0.1:"), line
        yield line.split()[1], proc


async def round_trip(
    config: KafkaConfig, snapshot: WorkspaceSnapshot | None = None,
    before_evict: Callable[[WorkspaceSnapshot], Awaitable[None]] | None = None,
) -> None:
    """Publish, read it back in a running view and in a fresh one, (check more), evict."""
    snapshot = snapshot or make_snapshot()
    async with SnapshotPublisher(config) as publisher, \
            SnapshotView(config, fetch_max_wait_ms=20) as view:
        receipt = await publisher.publish(snapshot)
        await view.wait_for(receipt, timeout=WAIT_S)
        assert view.get(snapshot.session_id) == snapshot
        async with SnapshotView(config, fetch_max_wait_ms=20) as fresh:
            assert fresh.get(snapshot.session_id) == snapshot
        if before_evict is not None:
            await before_evict(snapshot)
        gone = await publisher.evict(snapshot.session_id)
        await view.wait_for(gone, timeout=WAIT_S)
        assert snapshot.session_id not in view
