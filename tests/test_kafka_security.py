"""Security on real listeners: SASL (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN), TLS and mutual TLS
served by Apache Kafka itself (the embedded Kafka engine), not by a proxy.

Two brokers for the whole module: one with a SCRAM user and TLS (listeners SASL_PLAINTEXT, SSL,
SASL_SSL), one that requires a client certificate on its SSL listener. Every way in is tested
end to end (publisher, view, replay, the CLI from flags and from ``SNAPBUS_*`` variables, and
``snapbus serve`` over HTTP), and so is every refusal: a wrong password, an unknown user, a CA
that did not sign the broker's certificate, a missing client certificate. Each refusal is one
line naming the cause (`KafkaAuthenticationError`), reported in well under the connect timeout.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from snapbus.broker import EmbeddedBroker
from snapbus.cli import cli
from snapbus.config import KafkaConfig
from snapbus.errors import KafkaAuthenticationError, KafkaUnavailableError
from snapbus.publisher import SnapshotPublisher
from snapbus.replay import rebuild, replay
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import SnapshotView
from tests.helpers import (
    WAIT_S,
    eventually,
    make_snapshot,
    round_trip,
    serve_command,
    snapbus_process,
)
from tests.test_security import _make_ca, _write_cert

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("quiet_aiokafka")]

USER, PASSWORD = "alice", "s3cret-Pa55"
CONNECT_TIMEOUT_S = 10.0
"""The clients' connect timeout: refusals must be reported long before it."""
REFUSAL_BOUND_S = 3.0
"""A refusal must be reported within this (measured: about 0.05 s for TLS, 0.3 s for SASL)."""


@dataclass(frozen=True)
class Brokers:
    secure: EmbeddedBroker
    """SCRAM user `USER` and TLS: PLAINTEXT, SASL_PLAINTEXT, SSL and SASL_SSL listeners."""
    mutual: EmbeddedBroker
    """SSL listener requiring a client certificate."""
    other_ca: str
    """A CA that signed neither broker's certificate."""


@pytest.fixture(scope="module")
async def brokers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Brokers]:
    ca, _ = _make_ca("some other CA")
    other_ca = _write_cert(ca, tmp_path_factory.mktemp("other-ca") / "ca.pem")
    async with EmbeddedBroker(engine="kafka", scram_users={USER: PASSWORD}, tls=True) as secure, \
            EmbeddedBroker(engine="kafka", tls_client_auth=True) as mutual:
        yield Brokers(secure, mutual, str(other_ca))


def settings(brokers: Brokers, case: str, topic: str) -> dict[str, Any]:
    """The `KafkaConfig` fields of a named way in (`CASES`, `REFUSALS`)."""
    secure, mutual = brokers.secure, brokers.mutual
    assert secure.tls_files is not None
    assert mutual.tls_files is not None
    sasl = {"sasl_username": USER, "sasl_password": PASSWORD}
    found: dict[str, Any] = {
        "SCRAM-SHA-256": dict(sasl, security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="SCRAM-SHA-256"),
        "SCRAM-SHA-512": dict(sasl, security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="SCRAM-SHA-512"),
        "PLAIN": dict(sasl, security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN"),
        "SSL": {"security_protocol": "SSL", "ssl_cafile": secure.tls_files.cafile},
        "SASL_SSL": dict(sasl, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                         ssl_cafile=secure.tls_files.cafile),
        "mutual TLS": {"security_protocol": "SSL", "ssl_cafile": mutual.tls_files.cafile,
                       "ssl_certfile": mutual.tls_files.certfile,
                       "ssl_keyfile": mutual.tls_files.keyfile},
    }
    found["wrong password"] = dict(found["SCRAM-SHA-256"], sasl_password="not-the-password")
    found["wrong password SCRAM-SHA-512"] = dict(found["SCRAM-SHA-512"], sasl_password="nope")
    found["wrong password PLAIN"] = dict(found["PLAIN"], sasl_password="nope")
    found["wrong password SASL_SSL"] = dict(found["SASL_SSL"], sasl_password="nope")
    found["unknown user"] = dict(found["SCRAM-SHA-256"], sasl_username="mallory")
    found["unknown CA"] = dict(found["SSL"], ssl_cafile=brokers.other_ca)
    found["missing client certificate"] = {"security_protocol": "SSL",
                                           "ssl_cafile": mutual.tls_files.cafile}
    fields = found[case]
    broker = mutual if case in ("mutual TLS", "missing client certificate") else secure
    return dict(fields, bootstrap_servers=broker.listeners[fields["security_protocol"]],
                topic=topic, connect_timeout_s=CONNECT_TIMEOUT_S)


CASES = ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN", "SSL", "SASL_SSL", "mutual TLS"]
"""Ways in that must work."""

REFUSALS = {
    "wrong password": "SASL authentication failed for user 'alice' with SCRAM-SHA-256",
    "wrong password SCRAM-SHA-512": "SASL authentication failed for user 'alice' with "
                                    "SCRAM-SHA-512",
    "wrong password PLAIN": "SASL authentication failed for user 'alice' with PLAIN",
    "wrong password SASL_SSL": "SASL authentication failed for user 'alice' with SCRAM-SHA-512",
    "unknown user": "SASL authentication failed for user 'mallory'",
    "unknown CA": "certificate verify failed",
    "missing client certificate": "the broker requires a client certificate",
}
"""Ways in that must be refused, and what the one-line error must say."""

FIXES = {
    "wrong password": "SNAPBUS_SASL_PASSWORD",
    "unknown user": "SNAPBUS_SASL_USERNAME",
    "unknown CA": "--ssl-cafile (SNAPBUS_SSL_CAFILE)",
    "missing client certificate": "--ssl-certfile and --ssl-keyfile",
}
"""The setting each kind of refusal tells the user to fix."""


def fix_for(case: str) -> str:
    return FIXES[case] if case in FIXES else FIXES["wrong password"]


def as_flags(fields: dict[str, Any]) -> list[str]:
    """The CLI's global options for these settings."""
    flags = ["--timeout", str(fields["connect_timeout_s"])]
    for name, value in fields.items():
        if name != "connect_timeout_s":
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def as_env(fields: dict[str, Any]) -> dict[str, str]:
    """The ``SNAPBUS_*`` variables for these settings."""
    return {f"SNAPBUS_{name.upper()}": str(value) for name, value in fields.items()}


async def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in a thread (it runs its own event loop), without inherited settings."""
    cleared: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SNAPBUS_")}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args),
                                   env={**cleared, **(env or {})})


def one_error_line(result: Result) -> str:
    """The CLI failed with exit status 1 and exactly one ``Error:`` line, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# ---------------------------------------------------------------------------- ways in


@pytest.mark.parametrize("case", CASES)
async def test_publisher_view_and_replay(brokers: Brokers, topic_name: str, case: str) -> None:
    config = KafkaConfig(**settings(brokers, case, topic_name))

    async def replay_and_rebuild(snapshot: WorkspaceSnapshot) -> None:
        events = [event async for event in replay(config)]
        assert [(e.session_id, e.snapshot) for e in events] == [(snapshot.session_id, snapshot)]
        assert await rebuild(config) == {snapshot.session_id: snapshot}

    await round_trip(config, make_snapshot(agent_name=case), before_evict=replay_and_rebuild)


@pytest.mark.parametrize("case", ["SCRAM-SHA-256", "SASL_SSL", "mutual TLS"])
async def test_cli_from_flags_and_environment(brokers: Brokers, topic_name: str,
                                              case: str) -> None:
    fields = settings(brokers, case, topic_name)
    repo = "4b1f2c4e-8f1a-4c55-9a6e-2f9d3c1b7a10"
    session = "0e7d8f3a-55c1-4f0b-9d2e-6a4c3b2a1f00"
    published = await invoke(*as_flags(fields), "publish", "--session-id", session,
                             "--repo-id", repo, "--agent-id", "auth0|cli", "--intent", case)
    assert published.exit_code == 0, published.output
    assert published.stdout.startswith(f"published {session} to {topic_name}[")

    got = await invoke("get", session, env=as_env(fields))
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["intent"] == case

    listed = await invoke("ls", "--json", env=as_env(fields))
    assert listed.exit_code == 0, listed.output
    assert [s["session_id"] for s in json.loads(listed.stdout)] == [session]

    replayed = await invoke(*as_flags(fields), "replay", "--no-progress")
    assert replayed.exit_code == 0, replayed.output
    events = [json.loads(line) for line in replayed.stdout.splitlines()]
    assert [e["session_id"] for e in events] == [session]

    as_of = datetime.datetime.now(datetime.timezone.utc).isoformat()
    rebuilt = await invoke("ls", "--json", "--as-of", as_of, env=as_env(fields))
    assert rebuilt.exit_code == 0, rebuilt.output
    assert [s["session_id"] for s in json.loads(rebuilt.stdout)] == [session]


SERVE = ("serve", "--port", "0", "--fetch-max-wait-ms", "20")


@pytest.mark.parametrize("case", ["SASL_SSL", "mutual TLS"])
async def test_serve_sidecar(brokers: Brokers, topic_name: str, case: str) -> None:
    fields = settings(brokers, case, topic_name)
    snapshot = make_snapshot(agent_name=case)
    async with SnapshotPublisher(KafkaConfig(**fields)) as publisher:
        await publisher.publish(snapshot)
    async with serve_command(*SERVE, "--allow-writes", env=as_env(fields)) as (url, proc), \
            httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready, what="the sidecar's view is live")
        got = await client.get(f"/sessions/{snapshot.session_id}")
        assert got.json() == snapshot.to_dict()
        other = make_snapshot()
        body = {k: v for k, v in other.to_dict().items() if k != "session_id"}
        put = await client.put(f"/sessions/{other.session_id}", json=body)
        assert put.status_code == 200, put.text
        listed = (await client.get("/sessions")).json()
        assert listed["count"] == 2
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), WAIT_S)
    assert proc.returncode == 0


# ---------------------------------------------------------------------------- refusals


async def refused_within_bound(start: Callable[[], Awaitable[object]]
                               ) -> tuple[KafkaAuthenticationError, float]:
    """Run `start`; it must raise `KafkaAuthenticationError` well before the connect timeout."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(KafkaAuthenticationError) as info:
        await asyncio.wait_for(start(), 2 * CONNECT_TIMEOUT_S)  # only turns a hang into a failure
    elapsed = loop.time() - began
    assert elapsed < REFUSAL_BOUND_S, f"refused after {elapsed:.2f} s"
    return info.value, elapsed


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refusal_is_one_clear_line_at_once(brokers: Brokers, topic_name: str,
                                                 case: str) -> None:
    config = KafkaConfig(**settings(brokers, case, topic_name))

    async def replay_all() -> None:
        async for _ in replay(config):
            pass

    publisher, view = SnapshotPublisher(config), SnapshotView(config)
    try:
        for start in (publisher.start, view.start, replay_all):
            error, _ = await refused_within_bound(start)
            message = str(error)
            assert isinstance(error, KafkaUnavailableError)
            assert not error.retriable
            assert REFUSALS[case] in message, message
            assert fix_for(case) in message, message
            assert config.bootstrap_servers in message
            assert "\n" not in message
            assert PASSWORD not in message
            assert "nope" not in message
            assert "not-the-password" not in message
    finally:
        await publisher.stop()
        await view.stop()


@pytest.mark.parametrize("case", ["wrong password", "unknown CA", "missing client certificate"])
async def test_cli_refusal_prints_one_error_line(brokers: Brokers, topic_name: str,
                                                 case: str) -> None:
    fields = settings(brokers, case, topic_name)
    loop = asyncio.get_running_loop()
    for args, env in ((["ls"], as_env(fields)),
                      ([*as_flags(fields), "publish", "--repo-id",
                        "4b1f2c4e-8f1a-4c55-9a6e-2f9d3c1b7a10", "--agent-id", "a"], None),
                      ([*as_flags(fields), "replay", "--no-progress"], None)):
        began = loop.time()
        line = one_error_line(await invoke(*args, env=env))
        assert loop.time() - began < REFUSAL_BOUND_S + 2  # the CLI's own start-up included
        assert REFUSALS[case] in line, line
        assert "not-the-password" not in line


async def test_serve_refusal_exits_with_one_error_line(brokers: Brokers,
                                                       topic_name: str) -> None:
    env = as_env(settings(brokers, "wrong password SASL_SSL", topic_name))
    async with snapbus_process(*SERVE, env=env) as (first, proc):
        out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 1
    assert first + out.decode() == "", "serve announces its URL only once the view is live"
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: "), lines
    assert REFUSALS["wrong password SASL_SSL"] in lines[0]

