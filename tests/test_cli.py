"""The command line, through click's test runner against the real broker."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from snapbus import KafkaConfig, SnapshotPublisher, WorkspaceSnapshot
from snapbus.cli import cli
from snapbus.schema import schema_dir
from tests.conftest import BrokerAddress

REPO = "6f1c0f8e-8d0e-4a36-a3a1-1f6b7a0a0e01"


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


@pytest.fixture
def base(broker: BrokerAddress, topic_name: str) -> list[str]:
    return ["-b", broker.bootstrap_servers, "-t", topic_name]


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_publish_get_ls_evict_round_trip(base: list[str]) -> None:
    session = str(uuid.uuid4())
    result = run(*base, "publish", "--session-id", session, "--repo-id", REPO,
                 "--agent-id", "u1", "--agent-name", "agent-1", "--intent", "fix the build")
    assert result.exit_code == 0, result.output
    assert f"published {session}" in result.output

    result = run(*base, "get", session)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["intent"] == "fix the build"

    lines = "\n".join(
        WorkspaceSnapshot(uuid.uuid4(), REPO, "u2", "agent-2", uuid.uuid4(), "i", "c",
                          "merged", "persistent").to_json()
        for _ in range(3)
    )
    result = run(*base, "publish", "--json", "-", input=lines)
    assert result.exit_code == 0, result.output
    assert result.output.count("published") == 3

    listed = json.loads(run(*base, "ls", "--json").output)
    assert len(listed) == 4
    merged = json.loads(run(*base, "ls", "--json", "--state", "merged").output)
    assert {s["agent_id"] for s in merged} == {"u2"}
    by_agent = json.loads(run(*base, "ls", "--json", "--agent", "u1", "--repo", REPO).output)
    assert [s["session_id"] for s in by_agent] == [session]
    table = run(*base, "ls").output
    assert session in table
    assert "4 session(s)" in table

    assert run(*base, "evict", session).exit_code == 0
    result = run(*base, "get", session)
    assert_one_line_error(result, "not found")
    assert len(json.loads(run(*base, "ls", "--json").output)) == 3


def test_bad_input_is_one_clear_line(base: list[str]) -> None:
    result = run(*base, "publish", "--repo-id", "not-a-uuid", "--agent-id", "x")
    assert result.exit_code == 2
    assert "repo_id is not a valid UUID" in result.stderr
    assert "Traceback" not in result.output

    result = run(*base, "get", "nope")
    assert result.exit_code == 2
    assert "SESSION_ID is not a valid UUID" in result.stderr

    result = run(*base, "evict", "1234")
    assert result.exit_code == 2

    result = run(*base, "publish", "--json", "-", input='{"session_id": "x"}')
    assert result.exit_code == 2
    assert "missing field" in result.stderr

    result = run(*base, "publish", "--json", "-", input="{not json")
    assert result.exit_code == 2
    assert "not valid JSON" in result.stderr

    result = run(*base, "publish", "--agent-id", "x")
    assert result.exit_code == 2
    assert "--repo-id is required" in result.stderr

    result = run("-b", "127.0.0.1:9092", "-t", "bad topic!", "ls")
    assert result.exit_code == 2
    assert "invalid topic name" in result.stderr

    result = run("-b", "not a server", "ls")
    assert result.exit_code == 2
    assert "invalid bootstrap server" in result.stderr


def test_missing_topic_and_unreachable_broker(base: list[str], unused_tcp_port: int) -> None:
    assert_one_line_error(run(*base, "ls"), "does not exist", "snapbus topic ensure")
    assert_one_line_error(run(*base, "topic", "describe"), "does not exist")
    result = run("-b", f"127.0.0.1:{unused_tcp_port}", "--timeout", "1", "ls")
    assert_one_line_error(result, "cannot reach Kafka", f"127.0.0.1:{unused_tcp_port}")


def test_topic_ensure_and_describe(base: list[str]) -> None:
    result = run(*base, "topic", "ensure", "--partitions", "3")
    assert result.exit_code == 0, result.output
    assert "created: 3 partitions, cleanup.policy=compact" in result.output
    assert "exists" in run(*base, "topic", "ensure").output
    described = json.loads(run(*base, "topic", "describe", "--json").output)
    assert described["partitions"] == 3
    assert described["compacted"] is True


async def test_topic_ensure_refuses_a_delete_policy_topic(broker: BrokerAddress,
                                                          topic_name: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic_name, 2, 1)])
    finally:
        await admin.close()
    base = ["-b", broker.bootstrap_servers, "-t", topic_name]
    result = await asyncio.to_thread(run, *base, "topic", "ensure")
    assert_one_line_error(result, "cleanup.policy=delete")
    result = await asyncio.to_thread(run, *base, "topic", "ensure", "--allow-non-compacted")
    assert result.exit_code == 0


def test_schema_check(tmp_path: Path) -> None:
    current = json.loads((schema_dir() / "workspace_snapshot.avsc").read_text())
    compatible = dict(current, fields=[*current["fields"],
                                       {"name": "priority", "type": "int", "default": 0}])
    incompatible = dict(current, fields=[*current["fields"], {"name": "priority",
                                                             "type": "int"}])
    (tmp_path / "ok.avsc").write_text(json.dumps(compatible))
    (tmp_path / "bad.avsc").write_text(json.dumps(incompatible))
    (tmp_path / "broken.avsc").write_text("{")
    ok = run("schema", "check", str(tmp_path / "ok.avsc"))
    assert ok.exit_code == 0, ok.output
    assert "compatible with 1 known schema" in ok.output
    bad = run("schema", "check", str(tmp_path / "bad.avsc"))
    assert bad.exit_code == 1
    assert "priority" in bad.stderr
    broken = run("schema", "check", str(tmp_path / "broken.avsc"))
    assert_one_line_error(broken, "not valid JSON")


async def test_watch_prints_live_changes(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with SnapshotPublisher(config) as publisher:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "snapbus", "-b", broker.bootstrap_servers, "-t", topic_name,
            "watch", "--json", "--count", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            snapshot = WorkspaceSnapshot(uuid.uuid4(), REPO, "u", "a", uuid.uuid4(), "i", "c",
                                         "active", "ephemeral")
            # The watcher subscribes after its replay; publish until it has seen two changes.
            async def feed() -> None:
                step = 0
                while True:
                    step += 1
                    await publisher.publish(snapshot.replace(intent=f"step {step}"))
                    await asyncio.sleep(0.2)

            feeder = asyncio.create_task(feed())
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            finally:
                feeder.cancel()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    changes: list[dict[str, Any]] = [json.loads(line) for line in out.decode().splitlines()]
    assert len(changes) == 2
    assert all(c["session_id"] == str(snapshot.session_id) for c in changes)
    assert changes[1]["old"] == changes[0]["new"]


def test_demo_converges_against_a_given_broker(broker: BrokerAddress, topic_name: str) -> None:
    result = run("-b", broker.bootstrap_servers, "-t", topic_name, "demo", "--pods", "2",
                 "--duration", "2", "--rate", "40", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert "views converged" in result.output
    assert "yes" in result.output
    assert topic_name in result.output


@pytest.mark.parametrize("engine", ["tansu", pytest.param("kafka", marks=pytest.mark.kafka)])
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
async def test_broker_command_serves_and_stops_cleanly(stop_signal: signal.Signals,
                                                       engine: str) -> None:
    # started with SIGINT ignored, as a non-interactive shell starts a background job (which
    # Python's own SIGINT handling then ignores): the command still stops on either signal
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapbus", "broker", "--engine", engine,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=90)).decode()
        assert line.startswith("broker listening on 127.0.0.1:")
        assert line.endswith(f" ({engine})\n")
        address = line.split()[-2]
        config = KafkaConfig(bootstrap_servers=address, topic="cli-broker-check")
        async with SnapshotPublisher(config) as publisher:
            receipt = await publisher.publish(WorkspaceSnapshot(
                uuid.uuid4(), REPO, "u", "a", uuid.uuid4(), "i", "c", "active", "ephemeral"))
        assert receipt.offset == 0
    finally:
        proc.send_signal(stop_signal)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=30)
        finally:
            if proc.returncode is None:  # (it did not stop: leave no broker behind)
                proc.kill()
                await proc.wait()
    assert code == 0
    host, port = address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # the broker went away with the command
        socket.create_connection((host, int(port)), timeout=2).close()
