"""Prometheus metrics for views and publishers (needs the extra ``snapbus[metrics]``).

``ViewMetrics(view, registry)`` registers a collector that reads `SnapshotView.stats` when
Prometheus scrapes: nothing polls and nothing runs on the view's hot path, and one scrape sees
one consistent set of counters. ``InstrumentedPublisher`` is a `SnapshotPublisher` that counts
and times every publish and eviction into a `PublisherMetrics`.

Lag is measured by the view itself. A view reads with no consumer group (every partition
assigned by hand) and commits no offsets, so consumer-group lag exporters cannot see it;
``snapbus_view_lag_records`` is, per partition, the latest high watermark a fetch reported
minus the view's position.

Every series carries the label ``topic``:

======================================  =========  =============================================
``snapbus_view_sessions``               gauge      sessions in the view
``snapbus_view_records_applied_total``  counter    records applied (upserts and tombstones)
``snapbus_view_tombstones_total``       counter    tombstones applied
``snapbus_view_decode_errors_total``    counter    records skipped as undecodable
``snapbus_view_misplaced_total``        counter    records ignored: on another partition than
                                                   their key's (docs/misplaced-records.md)
``snapbus_view_expired_total``          counter    sessions hidden by the TTL
``snapbus_view_dead_lettered_total``    counter    bad records copied to the dead-letter topic
``snapbus_view_resyncs_total``          counter    full re-reads after the log was truncated
``snapbus_view_lag_records``            gauge      records behind the log end (``partition``)
``snapbus_view_last_offset``            gauge      offset of the last record read (``partition``)
``snapbus_view_staleness_seconds``      gauge      time since the broker last answered
``snapbus_view_catch_up_seconds``       gauge      duration of the initial replay (once done)
``snapbus_view_status``                 gauge      1 for the current status (``status``), else 0
``snapbus_view_ready``                  gauge      1 when caught up and live
``snapbus_publisher_publishes_total``   counter    records acknowledged (``operation``)
``snapbus_publisher_failures_total``    counter    records not published (``operation``,
                                                   ``error``: the exception's class name)
``snapbus_publisher_ack_seconds``       histogram  publish-to-acknowledgement time
                                                   (``operation``)
======================================  =========  =============================================

Counters restart from zero with a new view or publisher, as Prometheus counters may.
"""

from __future__ import annotations

import time
import typing
import uuid
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "snapbus.metrics needs prometheus-client: pip install 'snapbus[metrics]'"
    ) from exc

from snapbus.config import KafkaConfig
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import SnapshotView, ViewStatus

__all__ = [
    "DEFAULT_ACK_BUCKETS",
    "InstrumentedPublisher",
    "Operation",
    "PublisherMetrics",
    "ViewMetrics",
]

T = TypeVar("T")

Operation = Literal["publish", "evict"]
"""What a publisher did: publish a snapshot (``touch`` included) or evict (a tombstone)."""

DEFAULT_ACK_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
"""Histogram buckets (seconds) of ``snapbus_publisher_ack_seconds``."""

_STATUSES: tuple[str, ...] = typing.get_args(ViewStatus)


class ViewMetrics:
    """A Prometheus collector reporting a view's `stats` at scrape time.

    Registers itself on `registry` on construction. Several views may share a registry as
    long as they read different topics (their series differ by the ``topic`` label).

    Args:
        view: the view to report on; it need not be started yet.
        registry: where to register (default: a new `CollectorRegistry`, so that nothing
            collides with the process-wide default registry; pass
            ``prometheus_client.REGISTRY`` to use that one).
    """

    def __init__(self, view: SnapshotView, registry: CollectorRegistry | None = None) -> None:
        self.view = view
        self.registry = registry if registry is not None else CollectorRegistry()
        """The registry the collector is registered on."""
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """Yield the view's metrics as of now (called by the registry on each scrape)."""
        stats = self.view.stats
        topic = [self.view.config.topic]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["topic"])
            family.add_metric(topic, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["topic"])
            family.add_metric(topic, value)
            return family

        yield gauge("snapbus_view_sessions", "Sessions in the view.", stats.sessions)
        yield counter("snapbus_view_records_applied",
                      "Records applied to the view (upserts and tombstones).",
                      stats.records_applied)
        yield counter("snapbus_view_tombstones", "Tombstones applied to the view.",
                      stats.tombstones)
        yield counter("snapbus_view_decode_errors",
                      "Records skipped because they could not be decoded.", stats.decode_errors)
        yield counter("snapbus_view_misplaced",
                      "Records ignored because they are on another partition than their key's.",
                      stats.misplaced)
        yield counter("snapbus_view_expired",
                      "Sessions hidden because their latest record grew older than the TTL.",
                      stats.expired)
        yield counter("snapbus_view_dead_lettered",
                      "Bad records copied to the dead-letter topic.", stats.dead_lettered)
        yield counter("snapbus_view_resyncs",
                      "Times the view re-read the log because the broker's log ended before it.",
                      stats.resyncs)
        lag = GaugeMetricFamily(
            "snapbus_view_lag_records",
            "Records between the view's position and the latest high watermark it saw, per "
            "partition (computed by the view: it has no consumer group).",
            labels=["topic", "partition"],
        )
        for partition, behind in sorted(stats.lag.items()):
            lag.add_metric([*topic, str(partition)], behind)
        yield lag
        last = GaugeMetricFamily("snapbus_view_last_offset",
                                 "Offset of the last record the view read, per partition.",
                                 labels=["topic", "partition"])
        for partition, offset in sorted(stats.last_offsets.items()):
            last.add_metric([*topic, str(partition)], offset)
        yield last
        yield gauge("snapbus_view_staleness_seconds",
                    "Seconds since the broker last answered the view, for the least recently "
                    "answered partition.", stats.staleness_s)
        if stats.catch_up_seconds is not None:
            yield gauge("snapbus_view_catch_up_seconds",
                        "How long the view's initial replay took.", stats.catch_up_seconds)
        status = GaugeMetricFamily("snapbus_view_status",
                                   "1 for the view's current status, 0 for the others.",
                                   labels=["topic", "status"])
        for name in _STATUSES:
            status.add_metric([*topic, name], 1.0 if name == stats.status else 0.0)
        yield status
        yield gauge("snapbus_view_ready", "1 when the view is caught up and live, else 0.",
                    1.0 if stats.status == "live" else 0.0)


class PublisherMetrics:
    """Counters and a latency histogram for publishers, on one registry.

    One `PublisherMetrics` can serve several publishers (series are labelled by topic).

    Args:
        registry: where to register (default: a new `CollectorRegistry`).
        buckets: the latency histogram's buckets, in seconds.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float] = DEFAULT_ACK_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        """The registry the metrics are registered on."""
        self.publishes = Counter(
            "snapbus_publisher_publishes", "Records the broker acknowledged.",
            ["topic", "operation"], registry=self.registry,
        )
        self.failures = Counter(
            "snapbus_publisher_failures",
            "Records not published: rejected before sending, or not acknowledged.",
            ["topic", "operation", "error"], registry=self.registry,
        )
        self.ack_seconds = Histogram(
            "snapbus_publisher_ack_seconds",
            "Seconds from a publish call to the broker's acknowledgement.",
            ["topic", "operation"], buckets=tuple(buckets), registry=self.registry,
        )

    def observe(
        self,
        topic: str,
        operation: Operation,
        seconds: float,
        *,
        records: int = 1,
        error: BaseException | None = None,
    ) -> None:
        """Record the outcome of publishing `records` records that took `seconds`.

        With `error` the records count as failures (and the time is not observed); otherwise
        as acknowledged, each with the latency `seconds`.
        """
        if error is not None:
            self.failures.labels(topic, operation, type(error).__name__).inc(records)
            return
        self.publishes.labels(topic, operation).inc(records)
        histogram = self.ack_seconds.labels(topic, operation)
        for _ in range(records):
            histogram.observe(seconds)


class InstrumentedPublisher(SnapshotPublisher):
    """A `SnapshotPublisher` that records every publish and eviction in a `PublisherMetrics`.

    Takes the arguments of `SnapshotPublisher`, plus `metrics` (default: a new
    `PublisherMetrics` on a new registry). ``touch`` counts as a publish.
    """

    def __init__(
        self,
        config: KafkaConfig | None = None,
        *,
        metrics: PublisherMetrics | None = None,
        **options: Any,
    ) -> None:
        super().__init__(config, **options)
        self.metrics = metrics if metrics is not None else PublisherMetrics()
        """Where the publisher's metrics are recorded."""

    async def _observed(self, operation: Operation, call: Awaitable[T], records: int = 1) -> T:
        start = time.perf_counter()
        try:
            result = await call
        except Exception as exc:
            self.metrics.observe(self.topic, operation, time.perf_counter() - start,
                                 records=records, error=exc)
            raise
        self.metrics.observe(self.topic, operation, time.perf_counter() - start,
                             records=records)
        return result

    async def publish(self, snapshot: WorkspaceSnapshot) -> Receipt:
        """Publish a snapshot (see `SnapshotPublisher.publish`), recording the outcome."""
        return await self._observed("publish", super().publish(snapshot))

    async def evict(self, session_id: uuid.UUID | str) -> Receipt:
        """Publish a tombstone (see `SnapshotPublisher.evict`), recording the outcome."""
        return await self._observed("evict", super().evict(session_id))

    async def publish_many(self, snapshots: Iterable[WorkspaceSnapshot]) -> list[Receipt]:
        """Publish several snapshots (see `SnapshotPublisher.publish_many`), recording them.

        Each acknowledged record is observed with the latency of the whole batch.
        """
        items = list(snapshots)
        return await self._observed("publish", super().publish_many(items), len(items))
