"""A steady publish load and view watchers for fault tests on a Kafka cluster.

`Load` runs a few writers that keep publishing new versions of their own sessions through one
`SnapshotPublisher`, recording every outcome in a `WriteModel` (acknowledged, or failed and so
maybe stored) and how long each publish took. `Watch` samples views' staleness and status while
a fault lasts. tests/test_cluster.py and benchmarks/cluster_faults.py share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from aiokafka.admin import AIOKafkaAdminClient

from snapbus.errors import PublishError
from snapbus.publisher import SnapshotPublisher
from snapbus.view import SnapshotView, ViewStatus
from tests.faultproxy import WriteModel
from tests.helpers import make_snapshot

PACE_S = 0.02
"""Pause of a writer between two publishes (a load of about 50 publishes/s per writer)."""


@dataclasses.dataclass
class Outcome:
    """One publish: when it began, how long it took, and whether it raised."""

    began: float
    took_s: float
    error: PublishError | None
    session_id: uuid.UUID | None = None
    partition: int | None = None
    """The partition its receipt named (None when it raised)."""

    @property
    def ended(self) -> float:
        return self.began + self.took_s


class Load:
    """Writers publishing new versions of their own sessions until `stop`."""

    def __init__(self, publisher: SnapshotPublisher, *, writers: int = 3,
                 sessions_per_writer: int = 20) -> None:
        self.publisher = publisher
        self.model = WriteModel()
        self.outcomes: list[Outcome] = []
        self._sessions = [[uuid.uuid4() for _ in range(sessions_per_writer)]
                          for _ in range(writers)]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def acked(self) -> int:
        return self.model.acked_writes

    @property
    def sessions(self) -> list[uuid.UUID]:
        return [sid for sessions in self._sessions for sid in sessions]

    @property
    def errors(self) -> list[PublishError]:
        return [o.error for o in self.outcomes if o.error is not None]

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._writer(sessions))
                       for sessions in self._sessions]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _writer(self, sessions: Sequence[uuid.UUID]) -> None:
        version = 0
        while not self._stop.is_set():
            sid = sessions[version % len(sessions)]
            version += 1
            snapshot = make_snapshot(session_id=sid, intent=f"version {version}")
            began = time.monotonic()
            try:
                receipt = await self.publisher.publish(snapshot)
            except PublishError as exc:
                self.outcomes.append(Outcome(began, time.monotonic() - began, exc, sid))
                self.model.fail(sid, snapshot)
            else:
                self.outcomes.append(Outcome(began, time.monotonic() - began, None, sid,
                                             receipt.partition))
                self.model.ack(receipt, snapshot)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PACE_S)

    def partitions(self) -> dict[uuid.UUID, int]:
        """Each session mapped to its partition, from the receipts so far."""
        return {o.session_id: o.partition for o in self.outcomes
                if o.session_id is not None and o.partition is not None}

    def longest_stall_s(self, since: float = 0.0) -> float:
        """The longest time without an acknowledged publish after `since` (monotonic): the
        gap between consecutive acknowledgements, or a publish that took that long."""
        ends = sorted(o.began + o.took_s for o in self.outcomes
                      if o.error is None and o.began + o.took_s >= since)
        gaps = [b - a for a, b in itertools.pairwise(ends)]
        if ends:
            gaps.append(ends[0] - since)
        return max(gaps, default=0.0)


class Watch:
    """Samples the views' staleness and statuses every 50 ms until stopped."""

    def __init__(self, views: Sequence[SnapshotView]) -> None:
        self.views = views
        self.max_staleness_s = 0.0
        self.statuses: set[ViewStatus] = set()
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Watch]:
        self._task = asyncio.create_task(self._sample())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        while True:
            for view in self.views:
                health = view.health()
                self.max_staleness_s = max(self.max_staleness_s, health.staleness_s)
                self.statuses.add(health.status)
            await asyncio.sleep(0.05)


def converged(model: WriteModel, views: Sequence[SnapshotView]) -> bool:
    """Whether every view holds what the model says (every acknowledged write)."""
    return all(not model.mismatches(view) for view in views)


async def leaders(bootstrap_servers: str, topic: str) -> dict[int, int]:
    """Each partition of `topic` mapped to its leader's node id (-1: none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        for entry in await admin.describe_topics(None):
            if entry["topic"] == topic:
                return {p["partition"]: p["leader"] for p in entry["partitions"]}
        return {}
    finally:
        await admin.close()


async def in_sync(bootstrap_servers: str, topic: str, replicas: int) -> bool:
    """Whether every partition of `topic` has a leader and `replicas` in-sync replicas."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        for entry in await admin.describe_topics(None):
            if entry["topic"] == topic:
                return all(p["leader"] >= 0 and len(p["isr"]) >= replicas
                           for p in entry["partitions"])
        return False
    finally:
        await admin.close()
