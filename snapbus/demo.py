"""The demo: several simulated pods publish session lifecycles while their views follow.

Each pod has its own `SnapshotPublisher` and `SnapshotView` (separate Kafka clients, as in
separate processes). Pods create sessions, move them through their lifecycle (``active`` ->
``submitted`` -> ``merged``), pick up sessions other pods created (any pod can pick up any
session: that is the point), and evict merged ones. Every publish is timed until each view
shows it. At the end every view must equal the expected final state, which is computed from
the acknowledged records: for each session the record with the highest offset wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from snapbus._partition import partition_of
from snapbus.config import KafkaConfig
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import ensure_topic
from snapbus.view import ChangeStream, SnapshotView

__all__ = ["DemoResult", "run_demo"]

_NEXT_STATE = {"active": "submitted", "submitted": "merged"}
_INTENTS = (
    "fix flaky test in the payment service",
    "add retry with backoff to the webhook sender",
    "rename the user settings endpoint",
    "upgrade the HTTP client and fix deprecations",
    "write docs for the export job",
)


@dataclasses.dataclass
class DemoResult:
    """What the demo did and whether the views converged."""

    pods: int
    duration_s: float
    publishes: int
    evictions: int
    sessions: int
    converged: bool
    mismatches: list[str]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_samples: int
    handoffs: int
    bootstrap_servers: str
    topic: str


@dataclasses.dataclass
class _Pod:
    name: str
    publisher: SnapshotPublisher
    view: SnapshotView
    stream: ChangeStream
    rng: random.Random
    publishes: int = 0
    evictions: int = 0


@dataclasses.dataclass(frozen=True)
class _Ack:
    """One acknowledged record, as the ledger keeps it (for stress reports)."""

    pod: str
    session_id: uuid.UUID
    partition: int
    offset: int
    value: WorkspaceSnapshot | None  # None: a tombstone
    sent_s: float  # perf_counter when the publish began
    acked_s: float  # perf_counter when it was acknowledged


class _Ledger:
    """The acknowledged records, from which the expected final state is computed."""

    def __init__(self, initial: dict[uuid.UUID, WorkspaceSnapshot], *,
                 keep_acks: bool = False) -> None:
        self.initial = initial
        self.keep_acks = keep_acks
        self.acks: list[_Ack] = []  # (every acknowledgement, for an inspecting stress run)
        self.latest: dict[uuid.UUID, tuple[int, WorkspaceSnapshot | None]] = {}
        self.sent_at: dict[tuple[uuid.UUID, WorkspaceSnapshot | None], float] = {}
        self.latencies: list[float] = []
        self.creators: dict[uuid.UUID, str] = {}
        self.handoffs = 0

    def record(self, pod: str, receipt: Receipt, value: WorkspaceSnapshot | None,
               sent_s: float) -> None:
        if self.keep_acks:
            self.acks.append(_Ack(pod, receipt.session_id, receipt.partition, receipt.offset,
                                  value, sent_s, time.perf_counter()))
        previous = self.latest.get(receipt.session_id)
        if previous is None or receipt.offset > previous[0]:
            self.latest[receipt.session_id] = (receipt.offset, value)

    def expected(self) -> dict[uuid.UUID, WorkspaceSnapshot]:
        state = dict(self.initial)
        for session_id, (_, value) in self.latest.items():
            if value is None:
                state.pop(session_id, None)
            else:
                state[session_id] = value
        return state


def _new_snapshot(rng: random.Random, pod: str, repos: list[uuid.UUID]) -> WorkspaceSnapshot:
    return WorkspaceSnapshot(
        session_id=uuid.UUID(int=rng.getrandbits(128), version=4),
        repo_id=rng.choice(repos),
        agent_id=f"user_{rng.randrange(20):02d}",
        agent_name=f"agent-{rng.randrange(1, 100)}",
        changeset_id=uuid.UUID(int=rng.getrandbits(128), version=4),
        intent=rng.choice(_INTENTS),
        base_commit=f"{rng.getrandbits(160):040x}",
        state="active",
        mode=rng.choice(("ephemeral", "persistent")),
    )


async def _publish(pod: _Pod, ledger: _Ledger, snapshot: WorkspaceSnapshot) -> None:
    sent = time.perf_counter()
    ledger.sent_at.setdefault((snapshot.session_id, snapshot), sent)
    receipt = await pod.publisher.publish(snapshot)
    ledger.record(pod.name, receipt, snapshot, sent)
    pod.publishes += 1


async def _evict(pod: _Pod, ledger: _Ledger, session_id: uuid.UUID) -> None:
    sent = time.perf_counter()
    ledger.sent_at.setdefault((session_id, None), sent)
    receipt = await pod.publisher.evict(session_id)
    ledger.record(pod.name, receipt, None, sent)
    pod.evictions += 1


async def _pod_loop(
    pod: _Pod, ledger: _Ledger, deadline: float, rate: float, repos: list[uuid.UUID],
    max_sessions: int,
) -> None:
    rng = pod.rng
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.perf_counter()
    step = 0
    while time.perf_counter() < deadline:
        step += 1
        live = [s for s in pod.view.snapshots() if s.session_id not in ledger.initial]
        merged = [s for s in live if s.state == "merged"]
        roll = rng.random()
        if merged and (roll < 0.12 or len(live) >= max_sessions):
            victim = rng.choice(merged)
            await _evict(pod, ledger, victim.session_id)
        elif live and roll < 0.65:
            current = rng.choice(live)  # any pod picks up any session
            state = _NEXT_STATE.get(current.state, current.state)
            update = current.replace(state=state, intent=f"{current.intent.split(' #')[0]} #{step}",
                                     agent_name=pod.name)
            if ledger.creators.get(current.session_id, pod.name) != pod.name:
                ledger.handoffs += 1
            await _publish(pod, ledger, update)
        else:
            snapshot = _new_snapshot(rng, pod.name, repos)
            ledger.creators[snapshot.session_id] = pod.name
            await _publish(pod, ledger, snapshot)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


async def _measure(pod: _Pod, ledger: _Ledger) -> None:
    async for change in pod.stream:
        sent = ledger.sent_at.get((change.session_id, change.new))
        if sent is not None:
            ledger.latencies.append(time.perf_counter() - sent)


def _progress(pods: list[_Pod], started: float, duration: float) -> Table:
    table = Table(title=f"snapbus demo: {min(time.perf_counter() - started, duration):4.1f} s "
                        f"of {duration:g} s")
    for column in ("pod", "published", "evicted", "sessions in view", "lag", "status"):
        table.add_column(column, justify="right" if column != "pod" else "left")
    for pod in pods:
        stats = pod.view.stats
        table.add_row(pod.name, str(pod.publishes), str(pod.evictions), str(stats.sessions),
                      str(sum(stats.lag.values())), stats.status)
    return table


async def _prime_partitions(config: KafkaConfig) -> None:
    """Write one no-op tombstone to each partition, one at a time.

    Tansu 0.6 (the embedded broker) can lose a partition's very first records when several
    producers write them at once; writing one record alone first avoids it. Each tombstone's
    key is a version-0 UUID (no session has one: snapbus makes version 4) that belongs on its
    partition (`_priming_key`), so views apply it as the delete of an absent session, not as
    a misplaced record. Harmless on Apache Kafka.
    """
    from aiokafka import AIOKafkaProducer

    from snapbus._kafka import start_client
    from snapbus.topic import describe_topic

    info = await describe_topic(config)
    producer = AIOKafkaProducer(acks="all", **config.client_kwargs())
    await start_client(producer, config, "demo warm-up producer")
    try:
        for partition in range(info.partitions):
            await (await producer.send(config.topic, None, partition=partition,
                                       key=_priming_key(partition, info.partitions)))
    finally:
        await producer.stop()


def _priming_key(partition: int, partitions: int) -> bytes:
    """The first key ``00000000-0000-0000-0000-<n>`` that murmur2 puts on `partition`."""
    keys = (f"00000000-0000-0000-0000-{n:012d}".encode() for n in itertools.count())
    return next(key for key in keys if partition_of(key, partitions) == partition)


@contextlib.asynccontextmanager
async def _broker_for(config: KafkaConfig | None) -> AsyncIterator[KafkaConfig]:
    if config is not None:
        yield config
        return
    from snapbus.broker import EmbeddedBroker

    async with EmbeddedBroker() as broker:
        yield KafkaConfig(bootstrap_servers=broker.bootstrap_servers,
                          topic=f"snapbus-demo-{uuid.uuid4().hex[:8]}")


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def run_demo(
    config: KafkaConfig | None = None,
    *,
    pods: int = 3,
    duration_s: float = 10.0,
    rate: float = 50.0,
    max_sessions: int = 200,
    fetch_max_wait_ms: int = 20,
    seed: int | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo and return its result (see the module docstring).

    With no `config`, an embedded broker is started for the demo and stopped after it.

    Args:
        config: the cluster and topic to use; None starts an embedded broker.
        pods: simulated pods, each with a publisher and a view.
        duration_s: how long the pods publish.
        rate: operations per second per pod (0: as fast as acknowledgements allow).
        max_sessions: live sessions the pods aim to stay under.
        fetch_max_wait_ms: the views' fetch wait (lower: fresher views, more idle requests).
        seed: seed for the simulated workload, for a repeatable run.
        console: where to show progress and the summary (default: stdout).
    """
    return await _run_demo(config, pods=pods, duration_s=duration_s, rate=rate,
                           max_sessions=max_sessions, fetch_max_wait_ms=fetch_max_wait_ms,
                           seed=seed, console=console, inspect=None)


_Inspect = Callable[[list[_Pod], _Ledger, dict[uuid.UUID, WorkspaceSnapshot]], Awaitable[None]]
"""Called with the pods (views still open), the ledger and the expected state, right after
the comparison (the stress runner's hook: benchmarks/stress_demo.py)."""


async def _run_demo(
    config: KafkaConfig | None,
    *,
    pods: int,
    duration_s: float,
    rate: float,
    max_sessions: int,
    fetch_max_wait_ms: int,
    seed: int | None,
    console: Console | None,
    inspect: _Inspect | None,
) -> DemoResult:
    console = console or Console()
    rng = random.Random(seed)
    async with _broker_for(config) as cfg, contextlib.AsyncExitStack() as stack:
        console.print(f"[bold]snapbus demo[/]: {pods} pods on {cfg.bootstrap_servers}, "
                      f"topic [cyan]{cfg.topic}[/]")
        members: list[_Pod] = []
        if config is None:  # a fresh topic on the embedded broker
            await ensure_topic(cfg)
            await _prime_partitions(cfg)
        for i in range(pods):
            publisher = await stack.enter_async_context(SnapshotPublisher(cfg))
            view = await stack.enter_async_context(
                SnapshotView(cfg, fetch_max_wait_ms=fetch_max_wait_ms))
            stream = view.changes()
            stack.callback(stream.close)
            members.append(_Pod(f"pod-{i + 1}", publisher, view, stream,
                                random.Random(rng.getrandbits(64))))
        initial = {s.session_id: s for s in members[0].view.snapshots()}
        ledger = _Ledger(initial, keep_acks=inspect is not None)
        repos = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(5)]
        measurers = [asyncio.create_task(_measure(pod, ledger)) for pod in members]
        started = time.perf_counter()
        deadline = started + duration_s
        workers = [asyncio.create_task(_pod_loop(pod, ledger, deadline, rate, repos,
                                                 max_sessions)) for pod in members]
        if console.is_terminal:
            with Live(_progress(members, started, duration_s), console=console,
                      refresh_per_second=4, transient=False) as live:
                while not all(w.done() for w in workers):
                    await asyncio.wait(workers, timeout=0.25)
                    live.update(_progress(members, started, duration_s))
        else:
            while not all(w.done() for w in workers):
                await asyncio.wait(workers, timeout=1.0)
                total = sum(p.publishes + p.evictions for p in members)
                console.print(f"{time.perf_counter() - started:5.1f} s: {total} operations")
        for worker in workers:
            worker.result()  # re-raise a pod's failure
        for pod in members:
            await pod.view.barrier(timeout=60)
        for task in measurers:
            task.cancel()
        expected = ledger.expected()
        mismatches: list[str] = []
        for pod in members:
            actual = {s.session_id: s for s in pod.view.snapshots()}
            if actual != expected:
                missing = len(expected.keys() - actual.keys())
                extra = len(actual.keys() - expected.keys())
                differ = sum(1 for k in expected.keys() & actual.keys() if expected[k] != actual[k])
                mismatches.append(f"{pod.name}: {missing} missing, {extra} extra, {differ} differ")
        if inspect is not None:
            await inspect(members, ledger, expected)
        latencies_ms = [x * 1000 for x in ledger.latencies]
        result = DemoResult(
            pods=pods,
            duration_s=time.perf_counter() - started,
            publishes=sum(p.publishes for p in members),
            evictions=sum(p.evictions for p in members),
            sessions=len(expected),
            converged=not mismatches,
            mismatches=mismatches,
            latency_p50_ms=_percentile(latencies_ms, 50),
            latency_p99_ms=_percentile(latencies_ms, 99),
            latency_samples=len(latencies_ms),
            handoffs=ledger.handoffs,
            bootstrap_servers=cfg.bootstrap_servers,
            topic=cfg.topic,
        )
    _summary(console, result)
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _summary(console: Console, result: DemoResult) -> None:
    table = Table(title="summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("pods (publisher + view each)", result.pods),
        ("operations (publishes + evictions)",
         f"{result.publishes + result.evictions} ({result.publishes} + {result.evictions})"),
        ("sessions at the end", result.sessions),
        ("updates by a pod other than the creator", result.handoffs),
        ("views converged", "[green]yes[/]" if result.converged else "[red]NO[/]"),
        ("publish-to-visible p50", _fmt(result.latency_p50_ms)),
        ("publish-to-visible p99", _fmt(result.latency_p99_ms)),
        ("latency samples (publishes x views)", result.latency_samples),
    ]
    for what, value in rows:
        table.add_row(what, str(value))
    console.print(table)
    for line in result.mismatches:
        console.print(f"[red]mismatch[/] {line}")
