"""The Apache Kafka engine of EmbeddedBroker: lifecycle, data directory, listeners, errors.

The tests that start a Kafka broker are marked ``kafka`` (they run on the Kafka leg of
`make test`); the option checks need no broker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from snapbus.broker import EmbeddedBroker, kafka_version
from snapbus.config import KafkaConfig
from snapbus.errors import BrokerError
from snapbus.publisher import SnapshotPublisher
from snapbus.view import SnapshotView
from tests.helpers import WAIT_S, make_snapshot


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pinned_version_is_a_kafka_4_release() -> None:
    major, minor, *_ = kafka_version().split(".")
    assert (int(major), int(minor)) >= (4, 0)


@pytest.mark.parametrize("options", [
    {"data_dir": "/tmp/x"}, {"scram_users": {"a": "b"}}, {"tls": True},
    {"broker_config": {"num.io.threads": 2}}, {"tls_client_auth": True},
])
def test_kafka_options_are_refused_for_tansu(options: dict[str, object]) -> None:
    with pytest.raises(BrokerError, match="needs engine='kafka'"):
        EmbeddedBroker(**options)  # type: ignore[arg-type]


def test_unknown_engine_and_durable_kafka_are_refused() -> None:
    with pytest.raises(BrokerError, match="unknown broker engine 'redpanda'"):
        EmbeddedBroker(engine="redpanda")  # type: ignore[arg-type]
    with pytest.raises(BrokerError, match="durable is a Tansu option"):
        EmbeddedBroker(engine="kafka", durable=True)


async def test_missing_java_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", "/nonexistent-jdk")
    with pytest.raises(BrokerError) as caught:
        await EmbeddedBroker(engine="kafka").start()
    message = str(caught.value)
    assert "needs Java 17+" in message
    assert "/nonexistent-jdk" in message
    assert "\n" not in message


async def test_missing_maven_is_one_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached class path
    java = Path(os.environ.get("JAVA_HOME", "/usr")) / "bin" / "java"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if java.exists():
        (bin_dir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError) as caught:
        await EmbeddedBroker(engine="kafka").start()
    message = str(caught.value)
    assert ("no mvn on PATH" in message) or ("needs Java 17+" in message)
    assert "\n" not in message


@pytest.mark.kafka  # (needs Java, as the Kafka leg does)
async def test_a_maven_failure_is_one_line_naming_its_error(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached class path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    home = os.environ.get("JAVA_HOME")
    java = Path(home) / "bin" / "java" if home else Path(shutil.which("java") or "java")
    (bin_dir / "java").symlink_to(java)
    mvn = bin_dir / "mvn"  # (a Maven that cannot reach its repository, as offline)
    mvn.write_text("#!/bin/sh\necho '[INFO] Scanning for projects...'\n"
                   "echo '[ERROR] Failed to execute goal: Could not resolve dependencies'\n"
                   "echo '[ERROR] '\necho '[ERROR] -> [Help 1]'\nexit 1\n")
    mvn.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError) as caught:
        await EmbeddedBroker(engine="kafka").start()
    message = str(caught.value)
    assert "\n" not in message
    assert "Could not resolve dependencies" in message
    assert "Help 1" not in message
    log_file = message.rsplit("Maven's output: ", 1)[1].rstrip(")")
    assert "Scanning for projects" in await asyncio.to_thread(Path(log_file).read_text)


@pytest.mark.kafka
async def test_kafka_broker_serves_snapbus_and_leaves_nothing(topic_name: str) -> None:
    broker = EmbeddedBroker(engine="kafka")
    await broker.start()
    try:
        pid = broker.pid
        assert pid is not None
        assert broker.engine == "kafka"
        assert broker.listeners == {"PLAINTEXT": broker.bootstrap_servers}
        config = KafkaConfig(broker.bootstrap_servers, topic_name)
        async with SnapshotPublisher(config) as publisher, \
                SnapshotView(config, fetch_max_wait_ms=20) as view:
            snapshot = make_snapshot()
            await view.wait_for(await publisher.publish(snapshot), timeout=WAIT_S)
            assert view.get(snapshot.session_id) == snapshot
    finally:
        await broker.stop()
    assert process_gone(pid)
    assert not broker.running
    await broker.stop()  # twice is harmless


@pytest.mark.kafka
async def test_kafka_log_survives_kill_restart_and_stop_with_a_data_dir(
    topic_name: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "kafka"
    snapshot = make_snapshot()
    broker = EmbeddedBroker(engine="kafka", data_dir=data_dir)
    async with broker:
        config = KafkaConfig(broker.bootstrap_servers, topic_name, connect_timeout_s=30)
        async with SnapshotPublisher(config) as publisher:
            await publisher.publish(snapshot)
        port = broker.port
        await broker.restart()  # SIGKILL, then start again on the same port and log
        assert broker.port == port
        async with SnapshotView(config, fetch_max_wait_ms=20) as view:
            assert view.get(snapshot.session_id) == snapshot
    assert (data_dir / "log" / "meta.properties").exists()  # stop() kept the data dir

    async with EmbeddedBroker(engine="kafka", data_dir=data_dir) as again:
        config = KafkaConfig(again.bootstrap_servers, topic_name, connect_timeout_s=30)
        async with SnapshotView(config, fetch_max_wait_ms=20) as view:
            assert view.get(snapshot.session_id) == snapshot


def test_cluster_ids_never_look_like_an_option() -> None:
    # one id in 64 would start with "-" and be read by the storage tool as an option
    from snapbus._kafka_broker import _cluster_id

    ids = [_cluster_id() for _ in range(2000)]
    assert not [found for found in ids if found.startswith("-")]
    assert all(len(found) == 22 for found in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.kafka
async def test_a_failed_start_leaves_nothing_on_disk(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    broker = EmbeddedBroker(engine="kafka", tls=True,
                            broker_config={"num.network.threads": "not a number"})
    with pytest.raises(BrokerError, match=r"num\.network\.threads"):
        await broker.start()
    assert not broker.running
    left = await asyncio.to_thread(lambda: list(tmp_path.iterdir()))
    assert left == []  # (the log directory and the TLS keys are gone)
