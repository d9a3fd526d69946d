"""The HTTP sidecar against the real broker, through a real HTTP client.

The server is uvicorn on a free loopback port in the test's event loop (`snapbus.serve.serving`)
around a view and publisher the test runs; one test runs ``python -m snapbus serve`` as a
subprocess. No test sleeps to synchronise: they wait on responses, on stream lines, or on
conditions with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from snapbus.cli import cli
from snapbus.config import KafkaConfig
from snapbus.metrics import InstrumentedPublisher, PublisherMetrics
from snapbus.serve import create_app, serving
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import SnapshotView
from tests.helpers import eventually, make_snapshot, serve_command

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

WAIT_S = 30.0


def body_of(snapshot: WorkspaceSnapshot, *, with_id: bool = False) -> dict[str, str]:
    data = snapshot.to_dict()
    if not with_id:
        del data["session_id"]
    return data


@dataclasses.dataclass
class Sidecar:
    config: KafkaConfig
    url: str
    client: httpx.AsyncClient
    view: SnapshotView
    publisher: InstrumentedPublisher
    registry: CollectorRegistry


@pytest.fixture
async def sidecar(broker: BrokerAddress, topic_name: str) -> AsyncIterator[Sidecar]:
    """A writable sidecar over a fresh topic, with a client pointed at it."""
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    registry = CollectorRegistry()
    async with (
        InstrumentedPublisher(config, metrics=PublisherMetrics(registry)) as publisher,
        SnapshotView(config, fetch_max_wait_ms=20) as view,
    ):
        app = create_app(view, publisher, registry=registry)
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
            yield Sidecar(config, url, client, view, publisher, registry)


class Events:
    """Reads a server-sent event stream: comments and (event, data) pairs, with timeouts."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def _line(self) -> str:
        return await asyncio.wait_for(self._lines.__anext__(), WAIT_S)

    async def comment(self) -> str:
        """Skip to the next comment line and return its text."""
        while not (line := await self._line()).startswith(":"):
            pass
        return line[1:].strip()

    async def next(self) -> tuple[str, dict[str, Any]]:
        """Return the next event's name and decoded data (comments are skipped)."""
        name, data = "message", None
        while True:
            line = await self._line()
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
            elif line == "" and data is not None:
                return name, data


# ---------------------------------------------------------------------------- reads and writes


async def test_put_get_delete_round_trip(sidecar: Sidecar) -> None:
    client = sidecar.client
    snapshot = make_snapshot()
    path = f"/sessions/{snapshot.session_id}"

    missing = await client.get(path)
    assert missing.status_code == 404
    assert "not in the view" in missing.json()["error"]

    put = await client.put(path, json=body_of(snapshot))
    assert put.status_code == 200, put.text
    assert put.json()["snapshot"] == snapshot.to_dict()
    receipt = put.json()["receipt"]
    assert receipt["topic"] == sidecar.config.topic
    assert receipt["offset"] >= 0
    # Read-your-writes: the PUT answered once the view applied it.
    got = await client.get(path)
    assert got.status_code == 200
    assert got.json() == snapshot.to_dict()

    merged = snapshot.replace(state="merged")
    put = await client.put(f"/sessions/{str(snapshot.session_id).upper()}",
                           json=body_of(merged, with_id=True))
    assert put.status_code == 200, put.text
    assert (await client.get(path)).json()["state"] == "merged"

    deleted = await client.delete(path)
    assert deleted.status_code == 200
    assert deleted.json()["deleted"] is True
    assert (await client.get(path)).status_code == 404
    again = await client.delete(path)
    assert again.status_code == 200
    assert again.json()["deleted"] is False


async def test_bad_requests_get_clear_errors(sidecar: Sidecar) -> None:
    client = sidecar.client
    snapshot = make_snapshot()
    path = f"/sessions/{snapshot.session_id}"

    bad_id = await client.get("/sessions/not-a-uuid")
    assert bad_id.status_code == 400
    assert bad_id.json() == {"error": "session_id is not a valid UUID: 'not-a-uuid'",
                             "field": "session_id"}
    assert (await client.put("/sessions/1234", json=body_of(snapshot))).status_code == 400
    assert (await client.delete("/sessions/1234")).status_code == 400

    not_json = await client.put(path, content=b"{not json")
    assert not_json.status_code == 400
    assert "not valid JSON" in not_json.json()["error"]

    array = await client.put(path, json=[body_of(snapshot)])
    assert array.status_code == 422
    assert "JSON object" in array.json()["error"]

    other = await client.put(path, json={**body_of(snapshot), "session_id": str(uuid.uuid4())})
    assert other.status_code == 422
    assert "differs" in other.json()["error"]
    assert other.json()["field"] == "session_id"

    missing = await client.put(path, json={"repo_id": str(uuid.uuid4())})
    assert missing.status_code == 422
    assert "missing field" in missing.json()["error"]

    bad_repo = await client.put(path, json={**body_of(snapshot), "repo_id": "nope"})
    assert bad_repo.status_code == 422
    assert bad_repo.json()["field"] == "repo_id"

    unknown = await client.put(path, json={**body_of(snapshot), "colour": "red"})
    assert unknown.status_code == 422
    assert "unknown field" in unknown.json()["error"]

    wrong_type = await client.put(path, json={**body_of(snapshot), "intent": 42})
    assert wrong_type.status_code == 422
    assert wrong_type.json()["field"] == "intent"

    too_large = await client.put(path, json={**body_of(snapshot), "intent": "x" * 1_100_000})
    assert too_large.status_code == 422
    assert "limit" in too_large.json()["error"]

    huge = await client.put(path, content=b" " * 2_100_000)
    assert huge.status_code == 413

    post = await client.post(path, json=body_of(snapshot))
    assert post.status_code == 405
    assert "error" in post.json()

    assert (await client.get("/nowhere")).status_code == 404
    # Nothing was published by any of the above.
    assert (await client.get(path)).status_code == 404
    assert sidecar.view.stats.records_applied == 0


async def test_list_sessions_with_filters(sidecar: Sidecar) -> None:
    client = sidecar.client
    repo_a, repo_b = uuid.uuid4(), uuid.uuid4()
    snapshots = [
        make_snapshot(repo_id=repo_a, agent_id="u1", state="active"),
        make_snapshot(repo_id=repo_a, agent_id="u2", state="merged"),
        make_snapshot(repo_id=repo_b, agent_id="u1", state="merged"),
        make_snapshot(repo_id=repo_b, agent_id="u3", state="active"),
    ]
    for receipt in await sidecar.publisher.publish_many(snapshots):
        await sidecar.view.wait_for(receipt, timeout=WAIT_S)

    async def ids(**params: str) -> list[str]:
        response = await client.get("/sessions", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["count"] == len(body["sessions"])
        return [s["session_id"] for s in body["sessions"]]

    def expect(*indexes: int) -> list[str]:
        return sorted(str(snapshots[i].session_id) for i in indexes)

    assert await ids() == expect(0, 1, 2, 3)
    assert await ids(repo=str(repo_a)) == expect(0, 1)
    assert await ids(repo=str(repo_a).upper().replace("-", "")) == expect(0, 1)
    assert await ids(agent="u1") == expect(0, 2)
    assert await ids(state="merged") == expect(1, 2)
    assert await ids(repo=str(repo_b), state="merged") == expect(2)
    assert await ids(agent="u1", state="active") == expect(0)
    assert await ids(repo=str(repo_b), agent="u2") == []
    assert await ids(state="submitted") == []
    full = (await client.get("/sessions", params={"agent": "u3"})).json()["sessions"]
    assert full == [snapshots[3].to_dict()]

    bad = await client.get("/sessions", params={"repo": "not-a-uuid"})
    assert bad.status_code == 400
    assert bad.json()["field"] == "repo"
    typo = await client.get("/sessions", params={"repo_id": str(repo_a)})
    assert typo.status_code == 400
    assert "unknown query parameter(s): repo_id" in typo.json()["error"]


async def test_writes_are_refused_unless_allowed(sidecar: Sidecar) -> None:
    app = create_app(sidecar.view)  # no publisher: read-only
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
        path = f"/sessions/{uuid.uuid4()}"
        for method in ("PUT", "DELETE"):
            response = await client.request(method, path, json=body_of(make_snapshot()))
            assert response.status_code == 405
            assert "--allow-writes" in response.json()["error"]
            assert response.headers["allow"] == "GET, HEAD"
        assert (await client.get(path)).status_code == 404
        assert (await client.get("/sessions")).json() == {"sessions": [], "count": 0}


async def test_unacknowledged_write_is_503(sidecar: Sidecar) -> None:
    stopped = InstrumentedPublisher(sidecar.config)  # never started: every publish fails
    app = create_app(sidecar.view, stopped)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
        snapshot = make_snapshot()
        put = await client.put(f"/sessions/{snapshot.session_id}", json=body_of(snapshot))
        assert put.status_code == 503
        assert "not started" in put.json()["error"]
        assert put.headers["retry-after"] == "1"
        assert (await client.delete(f"/sessions/{snapshot.session_id}")).status_code == 503
    for operation in ("publish", "evict"):
        assert stopped.metrics.registry.get_sample_value(
            "snapbus_publisher_failures_total",
            {"topic": sidecar.config.topic, "operation": operation, "error": "PublishError"},
        ) == 1


# ---------------------------------------------------------------------------- operations


async def test_health_and_readiness(sidecar: Sidecar, broker: BrokerAddress) -> None:
    healthz = await sidecar.client.get("/healthz")
    readyz = await sidecar.client.get("/readyz")
    assert healthz.status_code == 200
    assert readyz.status_code == 200
    assert readyz.json()["ready"] is True
    assert readyz.json()["status"] == "live"
    assert set(readyz.json()) == {"ready", "status", "reason", "staleness_s", "lag",
                                  "sessions", "decode_errors"}

    # A view that has not started yet: alive, not ready.
    starting = SnapshotView(sidecar.config)
    async with serving(create_app(starting)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/healthz")).status_code == 200
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["status"] == "starting"
        assert not_ready.json()["ready"] is False
    async with starting:  # start and stop it, so that its consumer is closed
        pass

    # A view that stopped: neither.
    stopped = SnapshotView(sidecar.config, fetch_max_wait_ms=20)
    async with stopped:
        pass
    async with serving(create_app(stopped)) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/healthz")).status_code == 503
        assert (await client.get("/readyz")).json()["status"] == "stopped"
        assert (await client.get("/changes")).status_code == 503


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_endpoint(sidecar: Sidecar) -> None:
    client = sidecar.client
    topic = sidecar.config.topic
    snapshot = make_snapshot()
    assert (await client.put(f"/sessions/{snapshot.session_id}",
                             json=body_of(snapshot))).status_code == 200
    assert (await client.delete(f"/sessions/{snapshot.session_id}")).status_code == 200

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    by_topic = frozenset({("topic", topic)})
    assert found["snapbus_view_records_applied_total", by_topic] == 2
    assert found["snapbus_view_tombstones_total", by_topic] == 1
    assert found["snapbus_view_sessions", by_topic] == 0
    assert found["snapbus_view_ready", by_topic] == 1
    assert found["snapbus_view_status", by_topic | {("status", "live")}] == 1
    publish = by_topic | {("operation", "publish")}
    assert found["snapbus_publisher_publishes_total", publish] == 1
    assert found["snapbus_publisher_ack_seconds_count", publish] == 1
    assert found["snapbus_publisher_publishes_total", by_topic | {("operation", "evict")}] == 1

    openmetrics = await client.get("/metrics",
                                   headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


async def test_changes_stream_reports_live_changes(sidecar: Sidecar) -> None:
    snapshot = make_snapshot()
    async with sidecar.client.stream("GET", "/changes") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = Events(response)
        assert (await events.comment()).startswith("subscribed")

        await sidecar.publisher.publish(snapshot)
        name, data = await events.next()
        assert name == "change"
        assert data == {"session_id": str(snapshot.session_id), "old": None,
                        "new": snapshot.to_dict()}

        updated = snapshot.replace(state="submitted")
        put = await sidecar.client.put(f"/sessions/{snapshot.session_id}",
                                       json=body_of(updated))
        assert put.status_code == 200
        name, data = await events.next()
        assert (name, data["old"], data["new"]) == ("change", snapshot.to_dict(),
                                                     updated.to_dict())

        await sidecar.publisher.evict(snapshot.session_id)
        name, data = await events.next()
        assert (name, data["old"], data["new"]) == ("change", updated.to_dict(), None)


async def test_changes_stream_sends_keepalives(sidecar: Sidecar) -> None:
    app = create_app(sidecar.view, heartbeat_s=0.05)
    async with (
        serving(app) as url,
        httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client,
        client.stream("GET", "/changes") as response,
    ):
        events = Events(response)
        assert (await events.comment()).startswith("subscribed")
        assert await events.comment() == "keepalive"
        assert await events.comment() == "keepalive"


async def test_shutdown_ends_open_change_streams(sidecar: Sidecar) -> None:
    app = create_app(sidecar.view)
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as server:
        url = await server.enter_async_context(serving(app))
        async with (
            httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client,
            client.stream("GET", "/changes") as response,
        ):
            events = Events(response)
            await events.comment()
            started = loop.time()
            closing = asyncio.create_task(server.aclose())
            assert await events.next() == ("end", {"reason": "the server is shutting down"})
            await asyncio.wait_for(closing, WAIT_S)
            assert loop.time() - started < 3  # not the 5 s graceful-shutdown backstop


# ---------------------------------------------------------------------------- the command


def serve_args(broker: BrokerAddress, topic_name: str, *args: str,
               verbose: bool = False) -> list[str]:
    """``snapbus ... serve --port 0 ARGS`` against the test broker and topic."""
    return [*(["-v"] if verbose else []), "-b", broker.bootstrap_servers, "-t", topic_name,
            "serve", "--port", "0", "--fetch-max-wait-ms", "20", *args]


async def test_serve_command(broker: BrokerAddress, topic_name: str) -> None:
    async with serve_command(*serve_args(broker, topic_name, "--allow-writes", "--ttl", "3600",
                                         "--log-json", verbose=True)) as (url, proc):
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready)
            snapshot = make_snapshot()
            put = await client.put(f"/sessions/{snapshot.session_id}", json=body_of(snapshot))
            assert put.status_code == 200, put.text
            assert (await client.get(f"/sessions/{snapshot.session_id}")).json() == \
                snapshot.to_dict()
            metrics = (await client.get("/metrics")).text
            assert "snapbus_publisher_publishes_total" in metrics
            assert "process_cpu_seconds_total" in metrics

            # A second server on the same port fails with one clear line.
            port = url.rsplit(":", 1)[1]
            result = await asyncio.to_thread(
                CliRunner().invoke, cli,
                ["-b", broker.bootstrap_servers, "-t", topic_name, "serve", "--port", port],
            )
            assert result.exit_code == 1
            assert "cannot listen on 127.0.0.1:" in result.stderr
            assert "Traceback" not in result.output
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    logs = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert any(entry["logger"] == "snapbus.serve" and "serving" in entry["message"]
               for entry in logs), logs


async def test_serve_command_runs_a_janitor(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    snapshot = make_snapshot()
    async with SnapshotView(config, fetch_max_wait_ms=20) as plain, \
            InstrumentedPublisher(config) as publisher:
        await plain.wait_for(await publisher.publish(snapshot), timeout=WAIT_S)
        async with serve_command(*serve_args(broker, topic_name, "--ttl", "1", "--janitor",
                                             "--janitor-interval", "0.2")) as (url, proc):
            # The janitor deletes the session from the topic once it is a second old.
            await eventually(lambda: snapshot.session_id not in plain)
            async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
                assert (await client.get(f"/sessions/{snapshot.session_id}")).status_code == 404
                put = await client.put(f"/sessions/{snapshot.session_id}",
                                       json=body_of(snapshot))
                assert put.status_code == 405  # the janitor's publisher is not for clients
    assert plain.stats.tombstones >= 1
    assert proc.returncode == 0


def test_serve_command_usage_errors() -> None:
    result = CliRunner().invoke(cli, ["serve", "--janitor"])
    assert result.exit_code == 2
    assert "--janitor needs --ttl" in result.stderr
    result = CliRunner().invoke(cli, ["serve", "--ttl", "0"])
    assert result.exit_code == 2
