"""Run the demo scenario many times and explain every failure (snapbus issue 21).

    python benchmarks/stress_demo.py --runs 200 --duration 3            # Tansu, one broker
    python benchmarks/stress_demo.py --runs 20 --engine kafka            # Apache Kafka
    python benchmarks/stress_demo.py --runs 50 --fresh-broker --load 2   # a broker per run,
                                                                         # two CPU burners

Each run is what ``snapbus demo`` does (fresh topic, partitions primed, pods publish for
``--duration`` seconds, every view's ``barrier()``, then the comparison with the ledger of
acknowledged records), in this process, against an embedded broker of ``--engine``. After
every run a bare aiokafka consumer reads the whole topic up to the fetch-reported high
watermarks (and at least past the highest acknowledged offset) and checks every acknowledged
record is in the log at its acknowledged offset with its key and value: that catches a broker
losing a record even when no view shows it (the record was later superseded).

A run fails when a view differs from the ledger, or the log lacks an acknowledged record. A
failed run writes ``<out>/run-NNNN/``: ``output.txt`` (the demo's full output), ``ledger.jsonl``
(every acknowledged record: pod, session, partition, offset, tombstone or state and intent),
``views.json`` (each view's stats, positions, high watermarks, missing/extra/differing session
ids, and whether the view converged after more barriers), ``log.jsonl`` (what the bare consumer
read) and ``verdict.json`` (what the log says about each missing session, lost acks). The
summary of all runs goes to ``<out>/summary.json``. Exit status 1 when any run failed.

It lives with the benchmarks (not in tests/) because it runs for minutes against a real broker
and reports counts, like them; it is linted with them (``make lint``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console

if __package__ in (None, ""):  # run as a script: the worktree's snapbus, not an installed one
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from snapbus.broker import EmbeddedBroker
from snapbus.codec import Codec
from snapbus.config import KafkaConfig
from snapbus.demo import _Ledger, _Pod, _prime_partitions, _run_demo
from snapbus.reader import decode_value
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.topic import describe_topic, ensure_topic

RECHECKS = 3  # more barriers after a mismatch: did the view converge later (a barrier bug)?


def _value_json(value: WorkspaceSnapshot | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"state": value.state, "intent": value.intent, "agent_name": value.agent_name}


def _diff(expected: dict[uuid.UUID, WorkspaceSnapshot],
          actual: dict[uuid.UUID, WorkspaceSnapshot]) -> dict[str, list[str]]:
    return {
        "missing": sorted(str(k) for k in expected.keys() - actual.keys()),
        "extra": sorted(str(k) for k in actual.keys() - expected.keys()),
        "differ": sorted(str(k) for k in expected.keys() & actual.keys()
                         if expected[k] != actual[k]),
    }


@dataclasses.dataclass
class _Capture:
    """What the inspect hook saw while the views were still open."""

    views: dict[str, Any] = dataclasses.field(default_factory=dict)
    ledger: _Ledger | None = None
    expected: dict[uuid.UUID, WorkspaceSnapshot] = dataclasses.field(default_factory=dict)

    async def __call__(self, pods: list[_Pod], ledger: _Ledger,
                       expected: dict[uuid.UUID, WorkspaceSnapshot]) -> None:
        self.ledger, self.expected = ledger, expected
        for pod in pods:
            view = pod.view
            reader = view._reader
            actual = {s.session_id: s for s in view.snapshots()}
            entry: dict[str, Any] = {
                "stats": dataclasses.asdict(view.stats),
                "positions": dict(reader.positions),
                "highwater": {p: reader.highwater(p) for p in reader.partitions},
                **_diff(expected, actual),
            }
            if actual != expected:
                # Did the view only need more time? Then barrier() returned too early.
                later = []
                for _ in range(RECHECKS):
                    started = time.perf_counter()
                    await view.barrier(timeout=30)
                    now = {s.session_id: s for s in view.snapshots()}
                    later.append({"barrier_s": round(time.perf_counter() - started, 3),
                                  **{k: len(v) for k, v in _diff(expected, now).items()}})
                entry["rechecks"] = later
                entry["converged_later"] = {s.session_id: s for s in view.snapshots()} == expected
                entry["values"] = {k: _value_json(actual.get(uuid.UUID(k)))
                                   for k in entry["missing"] + entry["differ"]}
            self.views[pod.name] = entry


async def _read_log(config: KafkaConfig, at_least: dict[int, int],
                    timeout_s: float = 30.0) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Every record of the topic, read by a bare consumer up to the fetch-reported high
    watermarks and at least to `at_least` (partition -> next offset)."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=50,
                                **config.client_kwargs())
    await consumer.start()
    codec = Codec()
    records: list[dict[str, Any]] = []
    try:
        parts = list(range((await describe_topic(config)).partitions))
        tps = [TopicPartition(config.topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, recs in batch.items():
                for r in recs:
                    key, value = decode_value(r, codec)
                    records.append({"partition": tp.partition, "offset": r.offset, "key": key,
                                    "value": _value_json(value)})
            done = True
            for tp in tps:
                hw = consumer.highwater(tp)
                target = max(hw or 0, at_least.get(tp.partition, 0))
                if hw is None or await consumer.position(tp) < target:
                    done = False
            if done and not batch:
                break
        highwater = {tp.partition: consumer.highwater(tp) or -1 for tp in tps}
    finally:
        await consumer.stop()
    return records, highwater


async def _tail(config: KafkaConfig, stop: asyncio.Event, seen: dict[int, list[int]]) -> None:
    """A bare consumer following the topic like a view does: the offsets it receives."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=20,
                                **config.client_kwargs())
    await consumer.start()
    try:
        parts = list(range((await describe_topic(config)).partitions))
        tps = [TopicPartition(config.topic, p) for p in parts]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=50)
            for tp, recs in batch.items():
                seen.setdefault(tp.partition, []).extend(r.offset for r in recs)
    finally:
        await consumer.stop()


def _skips(seen: dict[int, list[int]], log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Jumps in a tail's offsets (a partition's offsets are contiguous here: no compaction)."""
    held = {(r["partition"], r["offset"]) for r in log}
    found = []
    for p, offsets in seen.items():
        expected = 0
        for o in offsets:
            if o > expected:
                found.append({"partition": p, "skipped": list(range(expected, o)),
                              "in_log": all((p, x) in held for x in range(expected, o))})
            expected = o + 1
    return found


def _check_log(ledger: _Ledger, log: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare acknowledged records with the log: lost acks, offsets acked twice."""
    at = {(r["partition"], r["offset"]): r for r in log}
    lost, wrong, seen = [], [], {}
    twice = []
    for ack in ledger.acks:
        where = (ack.partition, ack.offset)
        if where in seen:
            twice.append([_ack_json(seen[where]), _ack_json(ack)])
        seen[where] = ack
        found = at.get(where)
        if found is None:
            lost.append(_ack_json(ack))
        elif found["key"] != str(ack.session_id) or found["value"] != _value_json(ack.value):
            wrong.append({"ack": _ack_json(ack), "log": found})
    # the final state per the log (last record per key by offset; partitions are per key)
    log_state: dict[str, Any] = {}
    for r in sorted(log, key=lambda r: (r["partition"], r["offset"])):
        log_state[r["key"]] = r["value"]
    return {"lost": lost, "wrong": wrong, "acked_twice": twice,
            "log_state": {k: v for k, v in log_state.items() if v is not None}}


def _ack_json(ack: Any) -> dict[str, Any]:
    return {"pod": ack.pod, "session": str(ack.session_id), "partition": ack.partition,
            "offset": ack.offset, "tombstone": ack.value is None,
            "value": _value_json(ack.value), "sent_s": round(ack.sent_s, 4),
            "acked_s": round(ack.acked_s, 4)}


def _broker_log(broker: EmbeddedBroker) -> str:
    """The tail of the broker's output (diagnostics; reaches into the broker's internals)."""
    for holder in (getattr(broker, "_kafka", None), broker):
        child = getattr(holder, "_child", None) or getattr(holder, "_broker", None)
        if child is not None and hasattr(child, "log_tail"):
            return str(child.log_tail())[-3000:]
    return "(no log)"


@contextlib.asynccontextmanager
async def _broker(engine: str) -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(engine=engine) as broker:  # type: ignore[arg-type]
        yield broker


async def _one_run(n: int, broker: EmbeddedBroker, args: argparse.Namespace,
                   out: pathlib.Path) -> dict[str, Any]:
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap_servers,
                      topic=f"snapbus-stress-{n:04d}-{uuid.uuid4().hex[:6]}")
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, force_terminal=False, color_system=None)
    capture = _Capture()
    started = time.perf_counter()
    error = None
    result = None
    tail_stop = asyncio.Event()
    tail_seen: dict[int, list[int]] = {}
    tail = None
    try:
        await ensure_topic(cfg, partitions=args.partitions)
        await _prime_partitions(cfg)  # what run_demo does for its own embedded broker
        tail = asyncio.create_task(_tail(cfg, tail_stop, tail_seen))
        result = await _run_demo(cfg, pods=args.pods, duration_s=args.duration, rate=args.rate,
                                 max_sessions=args.max_sessions,
                                 fetch_max_wait_ms=args.fetch_max_wait_ms, seed=None,
                                 console=console, inspect=capture)
    except Exception as exc:  # a failed run is reported, not fatal to the loop
        error = f"{type(exc).__name__}: {exc}"
        console.print_exception()
    demo_s = time.perf_counter() - started
    tail_stop.set()
    if tail is not None:
        await tail
    ledger = capture.ledger
    check: dict[str, Any] = {"lost": [], "wrong": [], "acked_twice": [], "log_state": {}}
    log: list[dict[str, Any]] = []
    highwater: dict[int, int] = {}
    if ledger is not None:
        at_least: dict[int, int] = {}
        for ack in ledger.acks:
            at_least[ack.partition] = max(at_least.get(ack.partition, 0), ack.offset + 1)
        try:
            log, highwater = await _read_log(cfg, at_least)
            check = _check_log(ledger, log)
        except BaseException as exc:  # (the broker died; aiokafka then leaks CancelledError)
            error = f"{error or ''} reading the log: {type(exc).__name__}: {exc}".strip()
    skips = _skips(tail_seen, log)
    expected = {str(k): _value_json(v) for k, v in capture.expected.items()}
    log_matches_ledger = check["log_state"] == expected
    # Records each view applied against the records in the log: fewer means the view skipped
    # some, even when later records hid it in the final state (not comparable after a resync)
    short = {name: len(log) - v["stats"]["records_applied"] for name, v in capture.views.items()
             if v["stats"]["resyncs"] == 0}
    summary = {
        "run": n, "engine": args.engine, "topic": cfg.topic,
        "seconds": round(demo_s, 2),
        "check_seconds": round(time.perf_counter() - started - demo_s, 2),
        "operations": None if result is None else result.publishes + result.evictions,
        "converged": None if result is None else result.converged,
        "mismatches": [] if result is None else result.mismatches,
        "error": error,
        "lost_acks": len(check["lost"]), "wrong_acks": len(check["wrong"]),
        "acked_twice": len(check["acked_twice"]),
        "bare_tail_skips": len(skips),
        "view_records_skipped": sum(x for x in short.values() if x > 0),
        "view_resyncs": sum(v["stats"]["resyncs"] for v in capture.views.values()),
        "bare_tail_skips_in_log": sum(1 for x in skips if x["in_log"]),
        "log_final_state_matches_ledger": log_matches_ledger if ledger else None,
        "converged_later": {name: v.get("converged_later") for name, v in capture.views.items()
                            if "converged_later" in v},
    }
    failed = (error is not None or not summary["converged"] or check["lost"]
              or summary["view_records_skipped"]
              or check["wrong"] or check["acked_twice"] or not log_matches_ledger)
    summary["failed"] = bool(failed)
    if failed:
        where = out / f"run-{n:04d}"
        where.mkdir(parents=True, exist_ok=True)
        (where / "output.txt").write_text(buffer.getvalue())
        if ledger is not None:
            with (where / "ledger.jsonl").open("w") as f:
                for ack in ledger.acks:
                    f.write(json.dumps(_ack_json(ack)) + "\n")
        with (where / "log.jsonl").open("w") as f:
            for r in log:
                f.write(json.dumps(r) + "\n")
        (where / "views.json").write_text(json.dumps(capture.views, indent=1, default=str))
        missing = {s for v in capture.views.values() for s in v.get("missing", [])
                   + v.get("differ", []) + v.get("extra", [])}
        verdict = {
            "summary": summary, "log_highwater": highwater,
            "lost": check["lost"], "wrong": check["wrong"], "acked_twice": check["acked_twice"],
            "bare_tail_skips": skips,
            "sessions": {s: {
                "ledger": [_ack_json(a) for a in (ledger.acks if ledger else [])
                           if str(a.session_id) == s],
                "log": [r for r in log if r["key"] == s],
                "expected": expected.get(s),
                "views": {name: ("missing" if s in v["missing"] else "extra" if s in v["extra"]
                                 else "differ" if s in v["differ"] else "ok")
                          for name, v in capture.views.items()},
            } for s in sorted(missing)},
        }
        (where / "verdict.json").write_text(json.dumps(verdict, indent=1, default=str))
        summary["report"] = str(where)
    return summary


async def _main(args: argparse.Namespace, out: pathlib.Path) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        shared = None
        if not args.fresh_broker:
            shared = await stack.enter_async_context(_broker(args.engine))
        for n in range(1, args.runs + 1):
            if shared is None:
                async with _broker(args.engine) as broker:
                    summary = await _one_run(n, broker, args, out)
            else:
                summary = await _one_run(n, shared, args, out)
            broker_now = shared
            if broker_now is not None and not broker_now.running:
                summary["failed"] = True
                summary["error"] = f"{summary['error'] or ''} the broker died".strip()
                print(f"the {args.engine} broker died; its log ends:\n{_broker_log(broker_now)}")
            runs.append(summary)
            if broker_now is not None and not broker_now.running:
                break
            flag = "FAIL" if summary["failed"] else "ok"
            print(f"run {n:4d} {args.engine} {flag:4s} {summary['seconds']:5.1f}"
                  f"+{summary['check_seconds']:.1f} s "
                  f"ops={summary['operations']} mismatches={summary['mismatches']} "
                  f"lost={summary['lost_acks']} tail_skips={summary['bare_tail_skips']} "
                  f"view_skips={summary['view_records_skipped']} "
                  f"resyncs={summary['view_resyncs']} "
                  f"error={summary['error']}"
                  + (f" -> {summary['report']}" if "report" in summary else ""), flush=True)
            if summary["failed"] and args.stop_on_failure:
                break
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of publishing")
    parser.add_argument("--engine", choices=("tansu", "kafka"), default="tansu")
    parser.add_argument("--pods", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=12,
                        help="the topic's partitions (fewer: more writers per partition)")
    parser.add_argument("--rate", type=float, default=50.0, help="operations/s per pod")
    parser.add_argument("--max-sessions", type=int, default=200)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=20)
    parser.add_argument("--fresh-broker", action="store_true",
                        help="start a broker per run (as `snapbus demo` does)")
    parser.add_argument("--load", type=int, default=0, help="CPU-burning processes meanwhile")
    parser.add_argument("--stop-on-failure", action="store_true")
    parser.add_argument("--out", default="stress-reports")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(args.load)]
    try:
        runs = asyncio.run(_main(args, out))
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    failures = [r for r in runs if r["failed"]]
    totals = {"engine": args.engine, "runs": len(runs), "failures": len(failures),
              "duration_s": args.duration, "pods": args.pods, "load": args.load,
              "partitions": args.partitions, "rate": args.rate,
              "fresh_broker": args.fresh_broker, "failed_runs": failures}
    name = f"summary-{args.engine}-{os.getpid()}.json"
    (out / name).write_text(json.dumps({**totals, "all": runs}, indent=1, default=str))
    print(f"{args.engine}: {len(runs)} runs, {len(failures)} failed; summary in {out / name}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
