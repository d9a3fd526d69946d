"""The upstream's own client stack against two Redis-protocol sidecars: the Rust pod's
``redis-upstream`` mode (interop/rust: the ``redis`` crate the upstream pins, ``rmp-serde``).

Two ``snapbus serve --no-http --redis-port 0`` processes over one topic are two pods. The Rust
pod makes the upstream's calls (dk-engine ``ValkeyCache``) exactly: ``SET ws:{id}:meta
<rmp_serde::to_vec_named> EX ttl`` through A, ``GET`` and ``rmp_serde::from_slice`` through B
(the same bytes, the same struct), the touch pipeline (``SMEMBERS ws:{id}:files``, then
``MULTI`` / ``EXPIRE`` of meta, graph, files and each file key / ``EXEC``) and the evict
pipeline (the same with ``DEL``) through A; B must then answer nil. Apache Kafka only
(``kafka``), as the other wire-contract pods; docs/redis-sidecar.md has the versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from snapbus.config import KafkaConfig
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import ensure_topic
from tests.conftest import BrokerAddress
from tests.helpers import WAIT_S, snapbus_process
from tests.test_interop import _run, build_rust
from tests.test_resp import rmp_named

pytestmark = pytest.mark.kafka

TTL_S = 86_400  # the upstream's cache TTL, and the sidecars' --ttl
TOKEN = "rust-upstream-token-0123"


@contextlib.asynccontextmanager
async def redis_pod(bootstrap: str, topic: str) -> AsyncIterator[str]:
    """Run ``snapbus serve --no-http --redis-port 0`` (a pod's sidecar); yield its URL with the
    token, once it announced itself (its view is live)."""
    async with snapbus_process(
        "-b", bootstrap, "-t", topic, "serve", "--no-http", "--redis-port", "0",
        "--allow-writes", "--ttl", str(TTL_S), "--fetch-max-wait-ms", "20",
        env={"SNAPBUS_SERVE_TOKEN": TOKEN},
    ) as (line, proc):
        if not line.startswith("serving redis://127.0.0.1:"):
            assert proc.stderr is not None
            error = await asyncio.wait_for(proc.stderr.read(), WAIT_S)
            pytest.fail(f"serve did not start: {line!r} {error.decode()[-2000:]}")
        yield line.split()[1].replace("//", f"//:{TOKEN}@")


async def test_the_upstreams_rust_client_across_two_sidecars(
    broker: BrokerAddress, topic_name: str
) -> None:
    pod = await asyncio.to_thread(build_rust)
    await ensure_topic(KafkaConfig(broker.bootstrap_servers, topic_name))
    async with (
        redis_pod(broker.bootstrap_servers, topic_name) as url_a,
        redis_pod(broker.bootstrap_servers, topic_name) as url_b,
    ):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "redis-upstream.json"
            await asyncio.to_thread(
                _run, [*pod, "redis-upstream", url_a, url_b, str(TTL_S), str(out)])
            report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        assert report["failures"] == []
        sessions = report["sessions"]
        assert len(sessions) == 5
        for entry in sessions:
            assert entry["read_on_b"] == entry["written"]
        assert sessions[0]["written"]["state"] == "merged"  # the update, not the first write
        assert report["gone_on_a"] is report["gone_on_b"] is True
        evicted, touched = uuid.UUID(report["evicted"]), uuid.UUID(report["touched"])
        assert evicted == uuid.UUID(sessions[4]["written"]["session_id"])

        # and what B answers to another client: the bytes rmp_serde writes for the struct
        client = aioredis.Redis.from_url(url_b, socket_timeout=WAIT_S)
        try:
            for entry in sessions[:4]:
                snapshot = WorkspaceSnapshot.from_dict(entry["written"])
                assert await client.get(f"ws:{snapshot.session_id}:meta") == rmp_named(snapshot)
            assert await client.get(f"ws:{evicted}:meta") is None
            assert TTL_S - 120 < await client.ttl(f"ws:{touched}:meta") <= TTL_S
        finally:
            await client.aclose()
