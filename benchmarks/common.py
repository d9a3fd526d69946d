"""Shared helpers for the snapbus benchmarks.

Every benchmark starts its own broker (an `EmbeddedBroker` of the engine chosen by
``SNAPBUS_BENCH_ENGINE``: ``tansu``, the default, in memory mode, or ``kafka``, Apache Kafka in
KRaft mode; or an external one named by ``SNAPBUS_BENCH_BOOTSTRAP_SERVERS``), runs snapbus and a
bare-aiokafka baseline doing the same work in the same process on that broker, and reports the
median of N runs with min..max and the ratio to the baseline.

A benchmark module exposes ``async def run(runs: int, quick: bool) -> list[dict]``; each dict is
one (table, case) row as built by `Collector.results`, and `render` turns a list of them into
Markdown. ``python benchmarks/bench_X.py [--runs N] [--quick] [--json FILE]`` goes through `main`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_INTENT_WORDS",
    "ENGINES",
    "BenchBroker",
    "Collector",
    "bare_idempotence",
    "bench_broker",
    "broker_description",
    "bulk_produce",
    "delete_topic",
    "encode_pairs",
    "engine",
    "engine_description",
    "expected_sessions",
    "main",
    "make_records",
    "new_topic",
    "process_cpu_seconds",
    "render",
    "to_snapshots",
]

DEFAULT_RUNS = 5
QUICK_RUNS = 3
PARTITIONS = 12  # snapbus.topic.DEFAULT_PARTITIONS: what a view reads in production

# ----------------------------------------------------------------------------- broker / topics


ENGINES = ("tansu", "kafka")
"""The broker engines a benchmark can run on (`snapbus.broker.EmbeddedBroker`'s)."""


def engine() -> str:
    """The engine chosen by ``SNAPBUS_BENCH_ENGINE`` (``tansu`` when unset)."""
    name = os.environ.get("SNAPBUS_BENCH_ENGINE", "tansu").strip().lower() or "tansu"
    if name not in ENGINES:
        raise SystemExit(f"SNAPBUS_BENCH_ENGINE={name!r}: use one of {', '.join(ENGINES)}")
    return name


def bare_idempotence() -> bool:
    """`enable_idempotence` for a bare aiokafka producer doing a snapbus publisher's work: the
    publisher is idempotent where the broker allows it (Kafka), plain where refused (Tansu)."""
    return engine() == "kafka"


def engine_description(name: str) -> str:
    """The embedded broker of engine `name`, with its version, as the results name it."""
    if name == "kafka":
        from snapbus.broker import kafka_version

        return f"embedded Apache Kafka {kafka_version()} (KRaft, one node, log on disk)"
    return "embedded Tansu 0.6.0 (memory storage)"


@dataclasses.dataclass(frozen=True)
class BenchBroker:
    """Where the benchmark's clients connect, and the broker's pid when we started it."""

    bootstrap_servers: str
    pid: int | None
    description: str
    engine: str | None = None
    """``tansu`` or ``kafka`` for an embedded broker; None for an external one."""


@contextlib.asynccontextmanager
async def bench_broker(engine_name: str | None = None) -> AsyncIterator[BenchBroker]:
    """Start an embedded broker of `engine_name` (default: `engine()`), or use the one named by
    ``SNAPBUS_BENCH_BOOTSTRAP_SERVERS``."""
    external = os.environ.get("SNAPBUS_BENCH_BOOTSTRAP_SERVERS")
    if external:
        yield BenchBroker(external, None, f"external broker at {external}")
        return
    from snapbus.broker import EmbeddedBroker

    name = engine_name or engine()
    async with EmbeddedBroker(engine=name) as broker:  # type: ignore[arg-type]
        yield BenchBroker(broker.bootstrap_servers, broker.pid, engine_description(name), name)


async def new_topic(bootstrap: str, prefix: str, partitions: int = PARTITIONS) -> Any:
    """Create a fresh compacted topic (as snapbus would) and return a `KafkaConfig` for it."""
    from snapbus.config import KafkaConfig
    from snapbus.topic import ensure_topic

    topic = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
    config = KafkaConfig(bootstrap_servers=bootstrap, topic=topic)
    await ensure_topic(config, partitions=partitions)
    await _wait_ready(bootstrap, topic)
    return config


async def _wait_ready(bootstrap: str, topic: str) -> None:
    """Wait until every partition's leader answers for `topic`.

    Apache Kafka lists a new topic's leaders in metadata a little before they accept requests:
    a produce right after creation got NOT_LEADER_OR_FOLLOWER on most partitions and retried
    after retry_backoff_ms, which a timed publish run then counted. A ListOffsets of every
    partition (aiokafka retries it until the leaders answer) waits that out untimed; only its
    success is used, not its answer (Tansu's is wrong, BROKER.md).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        partitions = cluster.partitions_for_topic(topic) or set()
        await consumer.beginning_offsets([TopicPartition(topic, p) for p in partitions])
    finally:
        await consumer.stop()


async def delete_topic(bootstrap: str, topic: str) -> None:
    """Delete a benchmark topic so the memory broker does not keep growing (errors ignored)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        await admin.delete_topics([topic])
    except Exception as exc:  # a benchmark must not fail on cleanup
        print(f"(could not delete topic {topic}: {exc!r})", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def bulk_produce(
    bootstrap: str,
    topic: str,
    pairs: Sequence[tuple[bytes, bytes | None]],
    *,
    acks: Any = 1,
    linger_ms: int = 20,
    max_batch_size: int = 512 * 1024,
    window: int = 20_000,
) -> float:
    """Write pre-encoded (key, value) pairs as fast as a bare producer can; return seconds."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=acks,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        request_timeout_ms=60_000,
    )
    await producer.start()
    try:
        t0 = time.perf_counter()
        for i in range(0, len(pairs), window):
            futures = [
                await producer.send(topic, value, key=key) for key, value in pairs[i : i + window]
            ]
            await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


# ----------------------------------------------------------------------------- data

_WORDS = (  # noqa: SIM905  (a sentence is easier to edit than a list of words)
    "refactor fix add remove migrate the auth flow cache layer retry logic for billing api "
    "tests flaky integration endpoint schema parser docs readme ci pipeline bump deps "
    "upgrade typescript react component dashboard query index database timeout handler "
    "websocket reconnect rate limiter metrics tracing logging config feature flag cleanup "
    "dead code rename module split service extract helper improve error messages in cli"
).split()
_STATES = ("active",) * 6 + ("submitted",) * 2 + ("merged", "abandoned")
_MODES = ("ephemeral",) * 3 + ("persistent",)


DEFAULT_INTENT_WORDS = (8, 60)
"""How many words `make_records` puts in an intent by default (values of about 460 bytes)."""


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_records(
    n_sessions: int, n_records: int, *, seed: int = 1, tombstone_every: int = 0,
    intent_words: tuple[int, int] = DEFAULT_INTENT_WORDS,
) -> list[dict[str, str] | tuple[str, None]]:
    """Return `n_records` snapshot records (plain dicts, as the codec takes them) over
    `n_sessions` sessions.

    The first `n_sessions` records create every session (state ``active``); the rest update
    random sessions: state transitions, a new base commit, sometimes an edited intent. Sizes are
    like production: ~60-400 character intents (`intent_words`: 8 to 60 words; values average
    about 460 bytes), 40-hex commits, ~1 repo per 20 sessions, ~1 agent per 5. With
    `tombstone_every` > 0, every n-th update is a tombstone, returned as
    ``(session_id, None)`` (a later update of that session re-creates it).
    """
    if n_records < n_sessions:
        raise ValueError("need at least one record per session")
    rng = random.Random(seed)
    repos = [_uuid(rng) for _ in range(max(1, n_sessions // 20))]
    agents = [
        (
            f"auth0|{rng.getrandbits(96):024x}"
            if rng.random() < 0.7
            else f"sk_live_{rng.getrandbits(32):08x}",
            f"agent-{i + 1}",
        )
        for i in range(max(1, n_sessions // 5))
    ]
    intents = [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*intent_words))).capitalize()
        for _ in range(2000)
    ]
    sessions: list[dict[str, str]] = []
    out: list[dict[str, str] | tuple[str, None]] = []
    for _ in range(n_sessions):
        agent_id, agent_name = rng.choice(agents)
        record = {
            "session_id": _uuid(rng),
            "repo_id": rng.choice(repos),
            "agent_id": agent_id,
            "agent_name": agent_name,
            "changeset_id": _uuid(rng),
            "intent": rng.choice(intents),
            "base_commit": f"{rng.getrandbits(160):040x}",
            "state": "active",
            "mode": rng.choice(_MODES),
        }
        sessions.append(record)
        out.append(record)
    for i in range(n_records - n_sessions):
        j = rng.randrange(n_sessions)
        if tombstone_every and i % tombstone_every == tombstone_every - 1:
            out.append((sessions[j]["session_id"], None))
            continue
        record = dict(sessions[j])
        record["state"] = rng.choice(_STATES)
        record["base_commit"] = f"{rng.getrandbits(160):040x}"
        if rng.random() < 0.2:
            record["intent"] = f"{rng.choice(intents)} (rev {i})"
        sessions[j] = record
        out.append(record)
    return out


def expected_sessions(records: Iterable[dict[str, str] | tuple[str, None]]) -> int:
    """How many sessions a view holds after applying `records` in order (last write wins)."""
    live: set[str] = set()
    for record in records:
        if isinstance(record, tuple):
            live.discard(record[0])
        else:
            live.add(record["session_id"])
    return len(live)


def to_snapshots(records: Iterable[dict[str, str] | tuple[str, None]]) -> list[Any]:
    """Turn the non-tombstone records into `WorkspaceSnapshot` values."""
    from snapbus.snapshot import WorkspaceSnapshot

    return [WorkspaceSnapshot(**r) for r in records if isinstance(r, dict)]


def encode_pairs(
    records: Iterable[dict[str, str] | tuple[str, None]],
) -> list[tuple[bytes, bytes | None]]:
    """Pre-encode records into Kafka (key, value) pairs exactly as snapbus writes them."""
    from snapbus.codec import default_codec

    codec = default_codec()
    pairs: list[tuple[bytes, bytes | None]] = []
    for r in records:
        if isinstance(r, tuple):
            pairs.append((r[0].encode("ascii"), None))
        else:
            pairs.append((r["session_id"].encode("ascii"), codec.encode_record(r)))
    return pairs


# ----------------------------------------------------------------------------- measuring


# ---------------------------------------------------------------------------- bare consumers


@contextlib.asynccontextmanager
async def bare_consumer(bootstrap: str, topic: str, wait_ms: int) -> AsyncIterator[Any]:
    """A started group-less aiokafka consumer on every partition of `topic`, from the start,
    with the fetch settings snapbus's reader uses (the baselines' consumer)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        # whole-cluster metadata: the client's bootstrap asked for no topics (Metadata v1+)
        cluster = await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        yield consumer
    finally:
        await consumer.stop()


async def reached_end(consumer: Any, targets: dict[Any, int]) -> bool:
    """Whether every assigned partition reached the high watermark its first fetch reported
    (BROKER.md: the right end target on every broker); `targets` remembers those marks."""
    done = True
    for tp in consumer.assignment():
        if tp not in targets:
            hw = consumer.highwater(tp)
            if hw is None:
                done = False
                continue
            targets[tp] = hw
        if await consumer.position(tp) < targets[tp]:
            done = False
    return done


def process_cpu_seconds(pid: int | None) -> float | None:
    """User+system CPU seconds of another process (Linux /proc), or None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@dataclasses.dataclass
class _Table:
    title: str
    metric: str
    unit: str
    baseline: str | None
    higher_is_better: bool
    digits: int
    note: str | None
    cases: dict[str, list[float]] = dataclasses.field(default_factory=dict)


class Collector:
    """Collects samples per (table, case) across runs and summarizes them.

    ``c.table("publish", "throughput", "records/s", baseline="bare", higher_is_better=True)``
    then ``c.add("publish", "bare", 51234.0)`` once per run per case.
    """

    def __init__(self, bench: str, params: dict[str, Any]) -> None:
        self.bench = bench
        self.params = params
        self._tables: dict[str, _Table] = {}

    def table(
        self,
        key: str,
        title: str,
        unit: str,
        *,
        baseline: str | None,
        higher_is_better: bool,
        digits: int = 3,
        note: str | None = None,
        metric: str | None = None,
    ) -> None:
        """Declare a table; cases appear in the order they are first added."""
        self._tables[key] = _Table(
            title, metric or key, unit, baseline, higher_is_better, digits, note
        )

    def add(self, key: str, case: str, value: float) -> None:
        self._tables[key].cases.setdefault(case, []).append(float(value))

    def results(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for key, t in self._tables.items():
            base_median = None
            if t.baseline is not None and t.cases.get(t.baseline):
                base_median = statistics.median(t.cases[t.baseline])
            for case, values in t.cases.items():
                median = statistics.median(values)
                ratio = None
                if base_median:
                    ratio = median / base_median
                rows.append({
                    "bench": self.bench,
                    "table": key,
                    "title": t.title,
                    "metric": t.metric,
                    "unit": t.unit,
                    "case": case,
                    "baseline": t.baseline,
                    "is_baseline": case == t.baseline,
                    "higher_is_better": t.higher_is_better,
                    "digits": t.digits,
                    "note": t.note,
                    "values": values,
                    "n": len(values),
                    "median": median,
                    "min": min(values),
                    "max": max(values),
                    "ratio": ratio,
                    "params": self.params,
                })
        return rows


def fmt_value(value: float | None, digits: int = 3) -> str:
    """Format with `digits` significant digits, thousands separators for big numbers."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - int(f"{magnitude:e}".split("e")[1]))
    return f"{value:,.{decimals}f}"


def render(results: Sequence[dict[str, Any]], level: int = 3) -> str:
    """Render result rows as Markdown, one table per (bench, table), titled at heading
    `level`."""
    out: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["bench"], row["table"]), []).append(row)
    for rows in groups.values():
        first = rows[0]
        direction = "higher is better" if first["higher_is_better"] else "lower is better"
        n = max(r["n"] for r in rows)
        out.append(f"{'#' * level} {first['title']} ({first['unit']}, {direction}; median of {n})")
        out.append("")
        out.append("| case | median | min..max | ratio to baseline |")
        out.append("|---|---:|---:|---:|")
        d = first["digits"]
        for r in rows:
            ratio = "baseline" if r["is_baseline"] else (
                "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x")
            out.append(
                f"| {r['case']} | {fmt_value(r['median'], d)} | "
                f"{fmt_value(r['min'], d)}..{fmt_value(r['max'], d)} | {ratio} |"
            )
        if first["note"]:
            out.append("")
            out.append(first["note"])
        out.append("")
    return "\n".join(out)


def _revision() -> str:
    """The checkout's commit, with ``+dirty`` when snapbus/ has uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "snapbus"], cwd=root,
                               text=True, capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"snapbus {commit}{'+dirty' if dirty else ''}"


def environment() -> str:
    """One line describing where the numbers come from."""
    import aiokafka
    import fastavro

    load = ", load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(
        os, "getloadavg") else ""
    return (
        f"{_revision()}, python {platform.python_version()}, aiokafka {aiokafka.__version__}, "
        f"fastavro {fastavro.__version__}, {os.cpu_count()} CPUs, {platform.machine()}{load}"
    )


def broker_description(engine_name: str | None = None) -> str:
    """The broker `bench_broker(engine_name)` uses, as the results name it."""
    external = os.environ.get("SNAPBUS_BENCH_BOOTSTRAP_SERVERS")
    if external:
        return f"external broker at {external}"
    return engine_description(engine_name or engine())


def main(
    run: Callable[..., Awaitable[list[dict[str, Any]]]], description: str,
    *, flags: Mapping[str, str] | None = None,
) -> None:
    """Command line for one benchmark module: parse flags, run, print Markdown.

    `flags` maps extra on/off options of the module (``{"--scale": "..."}``, option -> help)
    to keyword arguments of `run` (``scale=True``).
    """
    parser = argparse.ArgumentParser(description=description)
    for flag, help_text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    parser.add_argument("--runs", type=int, default=None,
                        help=f"measured runs per case (default {DEFAULT_RUNS}, "
                             f"{QUICK_RUNS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = parser.parse_args()
    runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    if runs < 1:
        parser.error("--runs must be at least 1")
    broker = broker_description()
    print(f"_start: {environment()}; broker: {broker}_", file=sys.stderr)
    t0 = time.perf_counter()
    extra = {flag.lstrip("-").replace("-", "_"): True for flag in (flags or {})
             if getattr(args, flag.lstrip("-").replace("-", "_"))}
    results = asyncio.run(run(runs, args.quick, **extra))
    elapsed = time.perf_counter() - t0
    print(render(results))
    params = results[0]["params"] if results else {}
    print(f"_{environment()}; broker: {broker}; params {json.dumps(params)}; "
          f"wall {elapsed:.1f} s_")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
