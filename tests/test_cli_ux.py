"""Issue 19: what a new user tripped over on the command line and the sidecar.

Each test names the issue item it covers. The CLI runs through click's test runner (the same
`main` as the console script), the sidecar through httpx; integration tests use the real broker.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

import snapbus.cli as cli_module
from snapbus import KafkaConfig, SnapshotPublisher, WorkspaceSnapshot
from snapbus.cli import cli
from snapbus.errors import ValidationError
from snapbus.reader import Event
from snapbus.serve import create_app, serving
from snapbus.view import SnapshotView
from tests.conftest import BrokerAddress
from tests.helpers import make_snapshot

REPO = "6f1c0f8e-8d0e-4a36-a3a1-1f6b7a0a0e01"
WAIT_S = 30.0


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def one_line_error(result: Result, code: int, *needles: str) -> str:
    """The result failed with `code` and printed exactly one line, holding every needle."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def base(broker: BrokerAddress, topic_name: str) -> list[str]:
    return ["-b", broker.bootstrap_servers, "-t", topic_name]


def publish_flags(session: str, **fields: str) -> list[str]:
    values = {"repo-id": REPO, "agent-id": "u1", **fields}
    return ["publish", "--session-id", session,
            *[part for name, value in values.items() for part in (f"--{name}", value)]]


# ---------------------------------------------------------------------------- items 1, 12


def test_bad_output_path_and_ports_are_one_line_usage_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing-dir" / "x.jsonl"
    one_line_error(run("-b", "127.0.0.1:1", "replay", "-o", str(missing)), 2,
                   "--output", "No such file or directory")
    one_line_error(run("broker", "--port", "99999"), 2, "--port", "99999")
    one_line_error(run("broker", "--port", "-1"), 2, "--port")
    one_line_error(run("serve", "--port", "99999"), 2, "--port")
    one_line_error(run("ls", "--no-such-flag"), 2, "--no-such-flag")
    one_line_error(run("no-such-command"), 2, "no-such-command")
    one_line_error(run("get"), 2, "SESSION_ID")


# ---------------------------------------------------------------------------- item 2, 14


def test_publish_refuses_field_flags_with_a_file(tmp_path: Path) -> None:
    source = tmp_path / "one.json"
    source.write_text(make_snapshot().to_json())
    one_line_error(run("publish", "--file", str(source), "--repo-id", REPO, "--state",
                       "merged", "--intent", "X"), 2, "--repo-id", "--state", "--intent",
                   "--file")


def test_json_flag_means_output_only() -> None:
    # --json is an output format for ls/history/watch/topic describe; publish reads --file
    for command in (["ls"], ["history", "ID"], ["watch"], ["topic", "describe"]):
        param = next(p for p in _leaf(command).params if p.name == "as_json")
        assert getattr(param, "is_flag", False), command
    publish = _leaf(["publish"])
    visible = [p for p in publish.params if "--json" in getattr(p, "opts", ())
               and not getattr(p, "hidden", False)]
    assert visible == []
    assert "--file" in run("publish", "-h").output


def _leaf(path: list[str]) -> object:
    command: object = cli
    for name in path:
        if name.isupper():
            break
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


# ---------------------------------------------------------------------------- item 3


async def test_publish_accepts_allow_non_compacted(broker: BrokerAddress,
                                                   topic_name: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic_name, 1, 1,
                                            topic_configs={"cleanup.policy": "delete"})])
    finally:
        await admin.close()
    base = ["-b", broker.bootstrap_servers, "-t", topic_name]
    session = str(uuid.uuid4())
    refused = await asyncio.to_thread(run, *base, *publish_flags(session))
    one_line_error(refused, 1, "--allow-non-compacted")
    allowed = await asyncio.to_thread(run, *base, *publish_flags(session),
                                      "--allow-non-compacted")
    assert allowed.exit_code == 0, allowed.output
    # kcat-style: the flag also works before the command? No: it is a write option.
    evicted = await asyncio.to_thread(run, *base, "evict", session, "--allow-non-compacted")
    assert evicted.exit_code == 0, evicted.output


# ---------------------------------------------------------------------------- item 4, 15


def test_input_errors_name_the_line_and_the_problem(tmp_path: Path) -> None:
    plain = tmp_path / "one.json"
    plain.write_text(make_snapshot().to_json() + "\n")
    message = one_line_error(run("-b", "127.0.0.1:1", "import", str(plain)), 2,
                             "line 1", "not an export event", "snapshot")
    assert "publish --file" in message

    lines = tmp_path / "two.jsonl"
    lines.write_text(make_snapshot().to_json() + "\n" + '{"session_id": x}\n')
    one_line_error(run("-b", "127.0.0.1:1", "publish", "--file", str(lines)), 2,
                   "line 2 column 16", "not valid JSON")
    one_line_error(run("-b", "127.0.0.1:1", "publish", "--file", "-", input="{\n  not"), 2,
                   "line 2 column 3")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_line_error(run("-b", "127.0.0.1:1", "import", str(empty)), 2, "no events")
    one_line_error(run("-b", "127.0.0.1:1", "publish", "--file", str(empty)), 2, "empty")


# ---------------------------------------------------------------------------- item 5


def test_broker_help_says_what_durable_keeps() -> None:
    text = " ".join(run("broker", "-h").output.split())
    assert "LOST when the command ends" in text
    assert "--engine kafka --data-dir DIR" in text
    one_line_error(run("broker", "--engine", "kafka", "--durable"), 2, "--durable",
                   "--data-dir")
    one_line_error(run("broker", "--data-dir", "/tmp/x"), 2, "--data-dir",
                   "--engine kafka")


# ---------------------------------------------------------------------------- item 6, 15


def test_serve_announces_only_once_ready(unused_tcp_port: int) -> None:
    result = run("-b", f"127.0.0.1:{unused_tcp_port}", "--timeout", "1", "serve", "--port",
                 "0")
    assert "serving" not in result.stdout
    message = one_line_error(result, 1, "cannot reach Kafka", f"127.0.0.1:{unused_tcp_port}")
    assert "AddressFamily" not in message


def test_unreachable_broker_message_has_no_python_internals(unused_tcp_port: int) -> None:
    message = one_line_error(run("-b", f"127.0.0.1:{unused_tcp_port}", "--timeout", "5", "ls"),
                             1, "cannot reach Kafka")
    assert "AddressFamily" not in message
    assert "<" not in message


# ---------------------------------------------------------------------------- item 7


async def test_evicting_an_absent_session_says_so(base: list[str]) -> None:
    present, absent = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await asyncio.to_thread(run, *base, *publish_flags(present))).exit_code == 0
    result = await asyncio.to_thread(run, *base, "evict", present, absent)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"evicted {present} at ")
    assert lines[1].startswith(f"absent {absent} (was not there")


# ---------------------------------------------------------------------------- item 8


def test_one_input_rule_for_every_entry_point() -> None:
    minimal = WorkspaceSnapshot.from_input({"repo_id": REPO, "agent_id": "u1"})
    assert (minimal.state, minimal.mode, minimal.intent, minimal.agent_name,
            minimal.base_commit) == ("active", "ephemeral", "", "", "")
    for field in ("agent_id", "state", "mode"):
        with pytest.raises(ValidationError, match=f"{field} is empty"):
            WorkspaceSnapshot.from_input({"repo_id": REPO, "agent_id": "u1", field: " "})
    with pytest.raises(ValidationError, match="missing field"):
        WorkspaceSnapshot.from_input({"agent_id": "u1"})
    one_line_error(run("-b", "127.0.0.1:1", "publish", "--repo-id", REPO, "--agent-id", "u1",
                       "--state", ""), 2, "--state", "state is empty")
    one_line_error(run("-b", "127.0.0.1:1", "publish", "--file", "-",
                       input=json.dumps({"repo_id": REPO, "agent_id": ""})), 2,
                   "agent_id is empty")


async def test_put_and_cli_json_share_the_defaults(broker: BrokerAddress,
                                                   topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with SnapshotPublisher(config) as publisher, \
            SnapshotView(config, fetch_max_wait_ms=20) as view:
        app = create_app(view, publisher)
        async with serving(app) as url, httpx.AsyncClient(base_url=url,
                                                          timeout=WAIT_S) as client:
            session = uuid.uuid4()
            put = await client.put(f"/sessions/{session}",
                                   json={"repo_id": REPO, "agent_id": "u1"})
            assert put.status_code == 200, put.text
            assert put.json()["snapshot"]["state"] == "active"
            assert put.json()["snapshot"]["mode"] == "ephemeral"
            for field in ("agent_id", "state"):
                bad = await client.put(f"/sessions/{session}",
                                       json={"repo_id": REPO, "agent_id": "u1", field: ""})
                assert bad.status_code == 422, bad.text
                assert bad.json()["field"] == field
    base = ["-b", broker.bootstrap_servers, "-t", topic_name]
    published = await asyncio.to_thread(
        run, *base, "publish", "--file", "-",
        input=json.dumps({"repo_id": REPO, "agent_id": "u2"}))
    assert published.exit_code == 0, published.output


# ---------------------------------------------------------------------------- item 9


async def test_import_pipelines_and_keeps_order(base: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # one await per record is what made import slow: it must use the batch path
    async def one_by_one(self: SnapshotPublisher, snapshot: WorkspaceSnapshot) -> None:
        raise AssertionError("import published one record at a time")

    monkeypatch.setattr(SnapshotPublisher, "publish", one_by_one)
    sessions = [make_snapshot(repo_id=REPO) for _ in range(30)]
    lines = []
    for step in range(3):
        for s in sessions:
            lines.append({"session_id": str(s.session_id),
                          "snapshot": s.replace(intent=f"step {step}").to_dict()})
    for s in sessions[:10]:  # tombstones after, then one re-created
        lines.append({"session_id": str(s.session_id), "snapshot": None})
    lines.append({"session_id": str(sessions[0].session_id),
                  "snapshot": sessions[0].replace(intent="back").to_dict()})
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = await asyncio.to_thread(run, *base, "import", str(export))
    assert result.exit_code == 0, result.output
    assert f"imported {len(lines)} event(s)" in result.output
    listed = json.loads((await asyncio.to_thread(run, *base, "ls", "--json")).output)
    intents = {s["session_id"]: s["intent"] for s in listed}
    assert intents.pop(str(sessions[0].session_id)) == "back"
    assert intents == {str(s.session_id): "step 2" for s in sessions[10:]}


# ---------------------------------------------------------------------------- item 10


async def test_update_changes_some_fields(base: list[str]) -> None:
    session = str(uuid.uuid4())
    created = await asyncio.to_thread(run, *base, *publish_flags(
        session, intent="fix the build", **{"base-commit": "abc"}))
    assert created.exit_code == 0, created.output
    before = json.loads((await asyncio.to_thread(run, *base, "get", session)).output)
    result = await asyncio.to_thread(run, *base, "update", session, "--state", "submitted")
    assert result.exit_code == 0, result.output
    after = json.loads((await asyncio.to_thread(run, *base, "get", session)).output)
    assert after == {**before, "state": "submitted"}
    absent = str(uuid.uuid4())
    one_line_error(await asyncio.to_thread(run, *base, "update", absent, "--state", "x"), 1,
                   "not found")
    one_line_error(await asyncio.to_thread(run, *base, "update", session), 2,
                   "nothing to change")
    one_line_error(await asyncio.to_thread(run, *base, "update", session, "--state", ""), 2,
                   "--state")


async def test_patch_changes_some_fields(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with SnapshotPublisher(config) as publisher, \
            SnapshotView(config, fetch_max_wait_ms=20) as view:
        snapshot = make_snapshot()
        await view.wait_for(await publisher.publish(snapshot), timeout=WAIT_S)
        app = create_app(view, publisher)
        async with serving(app) as url, httpx.AsyncClient(base_url=url,
                                                          timeout=WAIT_S) as client:
            patched = await client.patch(f"/sessions/{snapshot.session_id}",
                                         json={"state": "submitted"})
            assert patched.status_code == 200, patched.text
            assert patched.json()["snapshot"] == {**snapshot.to_dict(), "state": "submitted"}
            assert view.get(snapshot.session_id) == snapshot.replace(state="submitted")
            absent = await client.patch(f"/sessions/{uuid.uuid4()}", json={"state": "x"})
            assert absent.status_code == 404
            assert "PATCH changes existing sessions" in absent.json()["error"]
            blank = await client.patch(f"/sessions/{snapshot.session_id}", json={"state": ""})
            assert blank.status_code == 422


# ---------------------------------------------------------------------------- item 11


def test_global_flags_after_the_command(base: list[str]) -> None:
    bootstrap, topic = base[1], base[3]
    session = str(uuid.uuid4())
    published = run(*publish_flags(session), "-b", bootstrap, "--topic", topic)
    assert published.exit_code == 0, published.output
    got = run("get", "-b", bootstrap, session, "-t", topic)
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["session_id"] == session
    listed = run("ls", f"--topic={topic}", "--json", f"-b{bootstrap}")
    assert [s["session_id"] for s in json.loads(listed.output)] == [session]
    one_line_error(run("ls", "-b"), 2, "'-b' requires an argument")
    one_line_error(run("topic", "describe", "-t", "bad topic!", "-b", bootstrap), 2,
                   "invalid topic name")


def test_a_command_option_named_like_a_global_one_keeps_its_meaning() -> None:
    import click

    @click.group()
    @click.option("-t", "--topic")
    def root(topic: str | None) -> None: ...

    @root.command()
    @click.option("-t", "--tag")
    @click.option("--name")
    def sub(tag: str | None, name: str | None) -> None: ...

    hoist = cli_module._hoist_global_options
    assert hoist(root, ["sub", "-t", "x", "--topic", "T", "--name", "--topic"]) == \
        ["--topic", "T", "sub", "-t", "x", "--name", "--topic"]
    assert hoist(root, ["sub", "--", "--topic", "T"]) == ["sub", "--", "--topic", "T"]


# ---------------------------------------------------------------------------- item 13, 15


def test_ls_and_replay_orders_are_stable(base: list[str]) -> None:
    lines = "\n".join(make_snapshot(repo_id=REPO, state=state).to_json()
                      for state in ("b", "a", "c", "a", "b", "c"))
    assert run(*base, "publish", "--file", "-", input=lines).exit_code == 0
    listed = json.loads(run(*base, "ls", "--json").output)
    ids = [s["session_id"] for s in listed]
    assert ids == sorted(ids)
    by_state = json.loads(run(*base, "ls", "--json", "--sort", "state").output)
    assert [s["state"] for s in by_state] == ["a", "a", "b", "b", "c", "c"]
    table = run(*base, "ls", "--sort", "state").output
    assert [line.split("│")[4].strip() for line in table.splitlines()
            if line.startswith("│") and REPO in line] == ["a", "a", "b", "b", "c", "c"]


def _replay_events(count: int) -> list[Event]:
    events = []
    for offset in range(count):
        snapshot = make_snapshot()
        events.append(Event(key=snapshot.key, snapshot=snapshot, partition=offset % 3,
                            offset=offset,
                            timestamp_ms=1_700_000_000_000 + (count - offset) * 1000))
    return events


def test_tables_keep_words_whole_at_120_columns() -> None:
    snapshots = [make_snapshot(agent_name="", agent_id="auth0|agent-with-a-long-id",
                               state="submitted", mode="ephemeral",
                               intent="a long intent " * 10) for _ in range(3)]
    out = io.StringIO()
    cli_module._print_table(Console(file=out, width=120), cli_module._table(snapshots))
    text = out.getvalue()
    assert text.count("ephemeral") == 3, text
    assert text.count("submitted") == 3, text
    assert text.count("auth0|agent-with-a-long-id") == 3, text
    assert "()" not in text  # no empty agent name shown


def test_watch_shows_the_agent_id_without_a_name() -> None:
    _agent = cli_module._agent
    assert _agent(make_snapshot(agent_name="", agent_id="u7")) == "u7"
    assert _agent(make_snapshot(agent_name="agent-7", agent_id="u7")) == "agent-7 (u7)"


def test_replay_table_is_in_time_order() -> None:
    orders = cli_module._EVENT_ORDERS
    events = _replay_events(6)
    out = io.StringIO()
    Console(file=out, width=200).print(cli_module._events_table(sorted(events,
                                                                       key=orders["time"])))
    stamps = re.findall(r"\d{4}-\d\d-\d\dT[\d:.]+", out.getvalue())
    assert len(stamps) == 6
    assert stamps == sorted(stamps)
    by_partition = sorted(events, key=orders["partition"])
    assert [(e.partition, e.offset) for e in by_partition] == sorted(
        (e.partition, e.offset) for e in events)


# ---------------------------------------------------------------------------- item 12


async def test_oversized_input_exits_2(base: list[str]) -> None:
    body = json.dumps({"repo_id": REPO, "agent_id": "u1", "intent": "x" * 1_100_000})
    result = await asyncio.to_thread(run, *base, "publish", "--file", "-", input=body)
    message = one_line_error(result, 2, "over the", "shorten the intent")
    assert "max_value_bytes" not in message


# ---------------------------------------------------------------------------- item 16


def test_demo_says_pods_are_simulated_and_what_to_try_next(base: list[str]) -> None:
    result = run(*base, "demo", "--pods", "2", "--duration", "0.5", "--rate", "20",
                 "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "simulated in this one process" in result.output
    assert f"snapbus {' '.join(base)} ls" in result.output
    assert "watch" in result.output
    assert "serve" in result.output
