"""Shared fixtures: one Kafka broker per test session, unique topic names.

Tests that use the ``broker`` fixture (directly or through another fixture) are marked
``integration`` automatically, so ``pytest -m "not integration"`` runs the unit tests alone.

The engine under test is ``SNAPBUS_TEST_ENGINE``: ``tansu`` (the default) or ``kafka`` (Apache
Kafka; `make test` runs the integration suite on both). Tests marked ``kafka`` need what only
the real Kafka broker has (compaction, SASL, transactions): they are deselected, not skipped,
on the Tansu leg.

``SNAPBUS_TEST_BOOTSTRAP_SERVERS=host:port`` runs the integration tests on that cluster instead
of an embedded broker, taken to be Apache Kafka (engine ``kafka``, so the ``kafka`` tests run
and engine-specific assertions expect Kafka) unless ``SNAPBUS_TEST_ENGINE=tansu`` says it is
Tansu: ``SNAPBUS_TEST_BOOTSTRAP_SERVERS=host:9092 pytest -m "integration or kafka"``. Tests
that need a broker of their own (fault proxy, crash, SASL/TLS listeners) still start an
embedded one of that engine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol
from uuid import uuid4

import pytest
from hypothesis import HealthCheck, settings

from snapbus.broker import EmbeddedBroker
from tests.faultproxy import FaultProxy, proxied_broker
from tests.helpers import ENGINE, EXTERNAL_BOOTSTRAP_SERVERS, new_broker

# Timing goals belong in the benchmarks: on a small shared machine a slow example is noise,
# not a failure. Property tests check behaviour only.
settings.register_profile(
    "snapbus", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("snapbus")


class BrokerAddress(Protocol):
    """What integration tests may rely on from the ``broker`` fixture."""

    @property
    def bootstrap_servers(self) -> str: ...


@dataclass(frozen=True)
class ExternalBroker:
    """A broker the test session did not start."""

    bootstrap_servers: str


@pytest.fixture(scope="session")
async def broker() -> AsyncIterator[BrokerAddress]:
    """The session's Kafka broker: the embedded one in memory mode, or an external one."""
    if EXTERNAL_BOOTSTRAP_SERVERS:
        yield ExternalBroker(EXTERNAL_BOOTSTRAP_SERVERS)
        return
    async with new_broker() as embedded:
        yield embedded


@pytest.fixture
def quiet_aiokafka() -> Iterator[None]:
    """Silence aiokafka, which logs every failed reconnect or handshake as an error: for tests
    whose faults are on purpose (``pytestmark = pytest.mark.usefixtures("quiet_aiokafka")``)."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
async def network() -> AsyncIterator[tuple[FaultProxy, EmbeddedBroker]]:
    """The module's own broker (memory storage) behind its own fault proxy (fault tests)."""
    async with proxied_broker() as pair:
        yield pair


@pytest.fixture
async def proxy(network: tuple[FaultProxy, EmbeddedBroker]) -> AsyncIterator[FaultProxy]:
    """The module's fault proxy (`network`), healed before and after each test."""
    proxy, _ = network
    proxy.heal()
    yield proxy
    proxy.heal()


@pytest.fixture
def topic_name() -> str:
    """A topic name no other test uses."""
    return f"test-{uuid4().hex[:12]}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, deselected = [], []
    for item in items:
        if "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
        if ENGINE != "kafka" and item.get_closest_marker("kafka") is not None:
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_report_header() -> str:
    where = (f"the cluster at {EXTERNAL_BOOTSTRAP_SERVERS} (SNAPBUS_TEST_BOOTSTRAP_SERVERS)"
             if EXTERNAL_BOOTSTRAP_SERVERS else "embedded")
    return f"snapbus engine under test: {ENGINE} (SNAPBUS_TEST_ENGINE), {where}"
