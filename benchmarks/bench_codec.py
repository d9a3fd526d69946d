"""Codec micro-benchmark: snapbus encode/decode against bare fastavro and MessagePack.

The same generated snapshots go through:

- snapbus ``encode`` / ``decode`` (single-object framing, validation, `WorkspaceSnapshot` out);
- bare ``fastavro.schemaless_writer`` / ``schemaless_reader`` with the project schema as written
  (ids carry ``logicalType: uuid``: the writer gets `uuid.UUID` objects, the reader returns them),
  no framing, plain dicts: the floor snapbus is measured against (goal: <= 1.15x);
- ``msgpack.packb`` / ``unpackb`` of the snapshot dict (ids as strings): the Redis cache format
  snapbus replaces.

Each case runs over all records once to warm up, then ``--repeat`` times (interleaved, garbage
collection off while timing); the table gives the median ns/record with min..max.

Run ``python benchmarks/bench_codec.py [--records N] [--repeat R] [--json]`` from a checkout.
For a runner: `main` (and `measure`) return the results as a dict; ``async def run(runs, quick)``
returns them as rows in the ``benchmarks/common.py`` format (`common.Collector`, `common.render`).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fastavro
import msgpack

if __package__ in (None, ""):  # run as a script: make the checkout's snapbus importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snapbus.codec import HEADER_SIZE, Codec
from snapbus.schema import CURRENT_SCHEMA_FILE, schema_dir
from snapbus.snapshot import FIELDS, WorkspaceSnapshot

__all__ = ["CaseResult", "generate_snapshots", "main", "measure", "run"]

USES_BROKER = False
"""No broker involved: ``run_all.py --engine both`` runs this module once."""

GOAL_RATIO = 1.15
"""snapbus may cost at most this much more than bare fastavro per record."""

SNAPBUS_ENCODE = "snapbus `encode` (snapshot -> framed bytes)"
SNAPBUS_DECODE = "snapbus `decode` (framed bytes -> snapshot)"

_STATES = ("active", "active", "active", "submitted", "merged", "abandoned")
_MODES = ("ephemeral", "ephemeral", "persistent")
_WORDS = (
    *("refactor", "fix", "add", "remove", "the", "parser", "cache", "session", "workspace"),
    *("handler", "test", "flaky", "retry", "timeout", "config", "migrate", "schema"),
    *("endpoint", "docs", "for", "in", "of", "and", "with", "a", "to", "🚀", "naïve", "café"),
    "日本語",
)


def generate_snapshots(count: int, seed: int = 20261124) -> list[WorkspaceSnapshot]:
    """Return `count` realistic snapshots, the same for the same seed."""
    rng = random.Random(seed)

    def uuid4() -> uuid.UUID:
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    repos = [uuid4() for _ in range(50)]
    agents = [f"auth0|{rng.getrandbits(96):024x}" for _ in range(200)]
    snapshots = []
    for _ in range(count):
        words = rng.choices(_WORDS, k=rng.randint(3, 30))
        snapshots.append(
            WorkspaceSnapshot(
                session_id=uuid4(),
                repo_id=rng.choice(repos),
                agent_id=rng.choice(agents),
                agent_name=f"agent-{rng.randint(1, 64)}",
                changeset_id=uuid4(),
                intent=" ".join(words).capitalize(),
                base_commit=f"{rng.getrandbits(160):040x}",
                state=rng.choice(_STATES),
                mode=rng.choice(_MODES),
            )
        )
    return snapshots


@dataclass(frozen=True)
class CaseResult:
    """Timing of one case over all records."""

    operation: str
    """``encode`` or ``decode``."""
    name: str
    """What ran."""
    median_ns: float
    """Median over the repetitions, ns per record."""
    min_ns: float
    """Fastest repetition, ns per record."""
    max_ns: float
    """Slowest repetition, ns per record."""
    ratio: float
    """Median divided by the bare fastavro median of the same operation."""
    baseline: bool
    """Whether this is the bare fastavro case the ratios are taken against."""
    samples: tuple[float, ...]
    """Every repetition, ns per record."""


def _time_once(body: Callable[[], object], count: int) -> float:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        body()
        elapsed = time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return elapsed / count


def measure(records: int = 10_000, repeat: int = 7, seed: int = 20261124) -> dict[str, Any]:
    """Run every case and return the results (see `format_markdown` for the printed form)."""
    if repeat < 1 or records < 1:
        raise ValueError("records and repeat must be positive")
    snapshots = generate_snapshots(records, seed)
    codec = Codec()
    raw_schema = json.loads((schema_dir() / CURRENT_SCHEMA_FILE).read_text(encoding="utf-8"))
    schema = fastavro.parse_schema(raw_schema)  # with logicalType uuid, as shipped

    # The equivalent inputs, prepared outside the timed loops.
    typed_dicts = [{name: getattr(s, name) for name in FIELDS} for s in snapshots]
    str_dicts = [s.to_dict() for s in snapshots]
    encoded = [codec.encode(s) for s in snapshots]
    bodies = [value[HEADER_SIZE:] for value in encoded]
    packed = [msgpack.packb(d) for d in str_dicts]

    # The same bytes and the same values, or the comparison means nothing.
    for snap, typed, value, body in zip(snapshots, typed_dicts, encoded, bodies, strict=True):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, typed)
        assert buf.getvalue() == body, "bare fastavro must write the bytes snapbus writes"
        assert fastavro.schemaless_reader(io.BytesIO(body), schema) == typed
        assert codec.decode(value) == snap

    bytes_io = io.BytesIO
    writer = fastavro.schemaless_writer
    reader = fastavro.schemaless_reader
    packb = msgpack.packb
    unpackb = msgpack.unpackb

    def snapbus_encode() -> None:
        enc = codec.encode
        for snap in snapshots:
            enc(snap)

    def fastavro_encode() -> None:
        for record in typed_dicts:
            buf = bytes_io()
            writer(buf, schema, record)
            buf.getvalue()

    def fastavro_str_ids() -> None:
        for record in str_dicts:
            buf = bytes_io()
            writer(buf, schema, record)
            buf.getvalue()

    def msgpack_encode() -> None:
        for record in str_dicts:
            packb(record)

    def snapbus_decode() -> None:
        dec = codec.decode
        for value in encoded:
            dec(value)

    def snapbus_decode_record() -> None:
        dec = codec.decode_record
        for value in encoded:
            dec(value)

    def fastavro_decode() -> None:
        for body in bodies:
            reader(bytes_io(body), schema)

    def msgpack_decode() -> None:
        for value in packed:
            unpackb(value)

    cases: Sequence[tuple[str, str, Callable[[], None], bool]] = (
        ("encode", SNAPBUS_ENCODE, snapbus_encode, False),
        ("encode", "bare fastavro `schemaless_writer` (UUID objects)", fastavro_encode, True),
        ("encode", "bare fastavro `schemaless_writer` (ids as str)", fastavro_str_ids, False),
        ("encode", "msgpack `packb` (dict, ids as str)", msgpack_encode, False),
        ("decode", SNAPBUS_DECODE, snapbus_decode, False),
        ("decode", "snapbus `decode_record` (-> dict, no snapshot)", snapbus_decode_record, False),
        ("decode", "bare fastavro `schemaless_reader` (-> UUID objects)", fastavro_decode, True),
        ("decode", "msgpack `unpackb` (-> dict, ids as str)", msgpack_decode, False),
    )

    for _, _, body_fn, _ in cases:  # warm up
        body_fn()
    samples: dict[str, list[float]] = {name: [] for _, name, _, _ in cases}
    for _ in range(repeat):
        for _, name, body_fn, _ in cases:
            samples[name].append(_time_once(body_fn, records))

    baselines = {op: statistics.median(samples[name]) for op, name, _, base in cases if base}
    results = [
        CaseResult(
            operation=op,
            name=name,
            median_ns=statistics.median(samples[name]),
            min_ns=min(samples[name]),
            max_ns=max(samples[name]),
            ratio=statistics.median(samples[name]) / baselines[op],
            baseline=base,
            samples=tuple(samples[name]),
        )
        for op, name, _, base in cases
    ]
    snapbus_ratio = {
        r.operation: r.ratio for r in results if r.name in (SNAPBUS_ENCODE, SNAPBUS_DECODE)
    }
    sizes = {
        "snapbus (single-object: 10-byte header + Avro body)": sum(map(len, encoded)) / records,
        "bare Avro body": sum(map(len, bodies)) / records,
        "MessagePack (dict, ids as str)": sum(map(len, packed)) / records,
    }
    return {
        "benchmark": "codec",
        "records": records,
        "repeat": repeat,
        "python": sys.version.split()[0],
        "fastavro": fastavro.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "cases": [asdict(r) for r in results],
        "sizes_bytes_per_record": sizes,
        "goal_ratio": GOAL_RATIO,
        "snapbus_ratio": snapbus_ratio,
        "goal_met": {op: ratio <= GOAL_RATIO for op, ratio in snapbus_ratio.items()},
    }


def format_markdown(results: dict[str, Any]) -> str:
    """Return the results as Markdown tables."""
    lines = [
        f"Codec benchmark: {results['records']:,} snapshots, median of {results['repeat']} "
        f"runs (Python {results['python']}, fastavro {results['fastavro']}, "
        f"msgpack {results['msgpack']})",
        "",
        "| op | implementation | ns/record (median) | min..max | vs bare fastavro |",
        "|---|---|---:|---:|---:|",
    ]
    for case in results["cases"]:
        ratio = "1.00x (baseline)" if case["baseline"] else f"{case['ratio']:.2f}x"
        lines.append(
            f"| {case['operation']} | {case['name']} | {case['median_ns']:,.0f} | "
            f"{case['min_ns']:,.0f}..{case['max_ns']:,.0f} | {ratio} |"
        )
    lines += ["", "| encoding | bytes/record (mean) |", "|---|---:|"]
    for name, size in results["sizes_bytes_per_record"].items():
        lines.append(f"| {name} | {size:,.1f} |")
    lines.append("")
    for op, ratio in results["snapbus_ratio"].items():
        verdict = "met" if results["goal_met"][op] else "NOT met"
        lines.append(
            f"- snapbus {op}: {ratio:.2f}x bare fastavro (goal <= {results['goal_ratio']}x: "
            f"{verdict})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown table (or JSON) and return the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=10_000, help="snapshots (default 10000)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case (>= 5)")
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    results = measure(records=args.records, repeat=args.repeat, seed=args.seed)
    print(json.dumps(results, indent=2) if args.json else format_markdown(results))
    return results


async def run(runs: int, quick: bool) -> list[dict[str, Any]]:
    """The ``benchmarks/common.py`` entry point: the same measurement as rows for `render`."""
    try:
        from benchmarks import common
    except ImportError:  # run from benchmarks/ as the working directory
        import common  # type: ignore[no-redef]

    results = measure(records=2_000 if quick else 10_000, repeat=runs)
    params = {"records": results["records"], "goal_ratio": GOAL_RATIO}
    collector = common.Collector("codec", params)
    note = f"Goal: snapbus <= {GOAL_RATIO}x bare fastavro."
    for op in ("encode", "decode"):
        cases = [case for case in results["cases"] if case["operation"] == op]
        baseline = next(case["name"] for case in cases if case["baseline"])
        collector.table(
            op, f"Codec {op}, per record", "ns/record", baseline=baseline,
            higher_is_better=False, note=note,
        )
        for case in cases:
            for sample in case["samples"]:
                collector.add(op, case["name"], sample)
    collector.table(
        "size", "Encoded size", "bytes/record", baseline="bare Avro body", higher_is_better=False
    )
    for name, size in results["sizes_bytes_per_record"].items():
        collector.add("size", name, size)
    rows: list[dict[str, Any]] = collector.results()
    return rows


if __name__ == "__main__":
    main()
