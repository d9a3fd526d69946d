"""Prometheus metrics: scraped values equal the view's stats and the publisher's outcomes."""

from __future__ import annotations

import importlib
import sys
import uuid
from typing import TYPE_CHECKING

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from snapbus._partition import partition_of
from snapbus.codec import encode
from snapbus.config import KafkaConfig
from snapbus.errors import PublishError, ValidationError
from snapbus.metrics import InstrumentedPublisher, PublisherMetrics, ViewMetrics
from snapbus.topic import DEFAULT_PARTITIONS
from snapbus.view import SnapshotView
from tests.helpers import eventually, make_snapshot

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

WAIT_S = 30.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


async def test_scraped_values_match_the_view_and_publisher(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    registry = CollectorRegistry()
    metrics = PublisherMetrics(registry)
    topic = labels(topic=topic_name)
    publisher = InstrumentedPublisher(config, metrics=metrics, max_value_bytes=2000)
    async with publisher, SnapshotView(config, fetch_max_wait_ms=20) as view:
        ViewMetrics(view, registry)
        snapshots = [make_snapshot() for _ in range(5)]
        for snapshot in snapshots:
            await publisher.publish(snapshot)
        await publisher.touch(snapshots[0])
        await publisher.evict(snapshots[1].session_id)
        receipts = await publisher.publish_many([make_snapshot() for _ in range(3)])
        with pytest.raises(ValidationError):
            await publisher.publish(make_snapshot(intent="x" * 3000))
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(topic_name, b"not avro", key=str(uuid.uuid4()).encode())
            stray = make_snapshot()  # on a partition that is not its key's: ignored
            wrong = (partition_of(stray.key.encode(), DEFAULT_PARTITIONS) + 1) % DEFAULT_PARTITIONS
            await producer.send_and_wait(topic_name, encode(stray), key=stray.key.encode(),
                                         partition=wrong)
        finally:
            await producer.stop()
        await view.barrier(timeout=WAIT_S)
        for receipt in receipts:
            await view.wait_for(receipt, timeout=WAIT_S)

        stats = view.stats
        found = scrape(registry)  # no await in between: the same state
        assert stats.decode_errors == 1
        assert stats.records_applied == 10
        assert found["snapbus_view_sessions", topic] == stats.sessions == 7
        assert found["snapbus_view_records_applied_total", topic] == stats.records_applied
        assert found["snapbus_view_tombstones_total", topic] == stats.tombstones == 1
        assert found["snapbus_view_decode_errors_total", topic] == stats.decode_errors
        assert found["snapbus_view_expired_total", topic] == stats.expired == 0
        assert found["snapbus_view_misplaced_total", topic] == stats.misplaced == 1
        assert found["snapbus_view_dead_lettered_total", topic] == 0
        assert found["snapbus_view_resyncs_total", topic] == 0
        lag = {int(dict(key)["partition"]): value for (name, key), value in found.items()
               if name == "snapbus_view_lag_records"}
        assert lag == stats.lag
        assert lag
        assert set(lag) == set(range(len(lag)))
        last = {int(dict(key)["partition"]): value for (name, key), value in found.items()
                if name == "snapbus_view_last_offset"}
        assert last == stats.last_offsets
        assert found["snapbus_view_staleness_seconds", topic] == pytest.approx(
            stats.staleness_s, abs=1.0)
        assert found["snapbus_view_catch_up_seconds", topic] == stats.catch_up_seconds
        assert found["snapbus_view_ready", topic] == 1
        status = {dict(key)["status"]: value for (name, key), value in found.items()
                  if name == "snapbus_view_status"}
        assert status == {"starting": 0, "catching_up": 0, "live": 1, "degraded": 0,
                          "failed": 0, "stopped": 0}

        publish = labels(topic=topic_name, operation="publish")
        evict = labels(topic=topic_name, operation="evict")
        assert found["snapbus_publisher_publishes_total", publish] == 5 + 1 + 3
        assert found["snapbus_publisher_publishes_total", evict] == 1
        assert found["snapbus_publisher_ack_seconds_count", publish] == 9
        assert found["snapbus_publisher_ack_seconds_count", evict] == 1
        assert 0 < found["snapbus_publisher_ack_seconds_sum", publish] < 9 * WAIT_S
        assert found["snapbus_publisher_failures_total",
                     publish | {("error", "ValidationError")}] == 1

    with pytest.raises(PublishError):
        await publisher.publish(make_snapshot())
    found = scrape(registry)
    assert found["snapbus_publisher_failures_total",
                 labels(topic=topic_name, operation="publish", error="PublishError")] == 1
    stopped = {dict(key)["status"] for (name, key), value in found.items()
               if name == "snapbus_view_status" and value == 1}
    assert stopped == {"stopped"}
    assert found["snapbus_view_ready", topic] == 0


async def test_expired_sessions_are_counted(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with InstrumentedPublisher(config) as publisher, \
            SnapshotView(config, fetch_max_wait_ms=20, ttl_s=0.5) as view:
        registry = ViewMetrics(view).registry
        await view.wait_for(await publisher.publish(make_snapshot()), timeout=WAIT_S)
        assert scrape(registry)["snapbus_view_sessions", labels(topic=topic_name)] == 1
        await eventually(lambda: view.stats.expired == 1)
        found = scrape(registry)
        assert found["snapbus_view_expired_total", labels(topic=topic_name)] == 1
        assert found["snapbus_view_sessions", labels(topic=topic_name)] == 0
        assert publisher.metrics.registry is not registry  # each defaults to its own


async def test_a_view_that_has_not_started_has_metrics(broker: BrokerAddress) -> None:
    first = SnapshotView(KafkaConfig(bootstrap_servers=broker.bootstrap_servers,
                                     topic=f"test-{uuid.uuid4().hex[:12]}"))
    second = SnapshotView(first.config.replace(topic=f"test-{uuid.uuid4().hex[:12]}"))
    registry = ViewMetrics(first).registry
    ViewMetrics(second, registry)  # several views of different topics share a registry
    found = scrape(registry)
    for view in (first, second):
        topic = view.config.topic
        assert found["snapbus_view_sessions", labels(topic=topic)] == 0
        assert found["snapbus_view_status", labels(topic=topic, status="starting")] == 1
        assert ("snapbus_view_catch_up_seconds", labels(topic=topic)) not in found
    assert not any(name == "snapbus_view_lag_records" for name, _ in found)
    async with first, second:  # started and stopped, so that their consumers are closed
        found = scrape(registry)
        for view in (first, second):
            key = labels(topic=view.config.topic)
            assert found["snapbus_view_catch_up_seconds", key] == view.stats.catch_up_seconds


def test_publisher_metrics_observe() -> None:
    metrics = PublisherMetrics(buckets=(0.01, 0.1))
    metrics.observe("t", "publish", 0.05, records=3)
    metrics.observe("t", "evict", 0.5)
    metrics.observe("t", "publish", 1.0, records=2, error=TimeoutError())
    found = scrape(metrics.registry)
    assert found["snapbus_publisher_publishes_total", labels(topic="t", operation="publish")] == 3
    assert found["snapbus_publisher_ack_seconds_bucket",
                 labels(topic="t", operation="publish", le="0.1")] == 3
    assert found["snapbus_publisher_ack_seconds_bucket",
                 labels(topic="t", operation="evict", le="0.1")] == 0
    assert found["snapbus_publisher_failures_total",
                 labels(topic="t", operation="publish", error="TimeoutError")] == 2


def test_missing_prometheus_client_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "snapbus.metrics")
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'snapbus\[metrics\]'"):
        importlib.import_module("snapbus.metrics")
