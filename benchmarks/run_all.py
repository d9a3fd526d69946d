"""Run every benchmark and write the tables to ``benchmarks/RESULTS.md``.

Each ``benchmarks/bench_*.py`` module's ``async def run(runs, quick)`` runs in turn, each in
its own event loop (each starts its own broker), in the order below, then any other
``bench_*.py`` module alphabetically. ``--engine`` picks the embedded broker (``tansu``, the
default, ``kafka`` or ``both``: each module on Tansu, then on Apache Kafka; a module with
``USES_BROKER = False`` runs once). The Markdown file gets the environment line, a summary of
the headline ratios with one column per engine, then one section per module with, per engine,
its tables (`common.render`); it is rewritten after every module, so an interrupted run keeps
what finished. A module that fails is reported in its section and the others still run; the
exit status is then 1.

    python benchmarks/run_all.py [--engine tansu|kafka|both] [--runs N] [--quick] [--scale]
                                 [--only bench_read ...] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script: import the modules as ``benchmarks.X``
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

ORDER = ("bench_codec", "bench_publish", "bench_rebuild", "bench_replay", "bench_latency",
         "bench_read", "bench_reads", "bench_memory", "bench_peers")
DEFAULT_OUTPUT = HERE / "RESULTS.md"


def discover() -> list[str]:
    """The benchmark modules present: `ORDER` first, then any others alphabetically."""
    present = {p.stem for p in HERE.glob("bench_*.py")}
    return [m for m in ORDER if m in present] + sorted(present - set(ORDER))


def _summary(module: Any, name: str) -> str:
    doc = (module.__doc__ or "").strip().splitlines()
    return doc[0].rstrip(".") if doc else name


def _write(path: Path, header: list[str], sections: list[str]) -> None:
    path.write_text("\n".join(header + sections).rstrip() + "\n", encoding="utf-8")


def _engines(choice: str) -> list[str]:
    return list(common.ENGINES) if choice == "both" else [choice]


def _uses_broker(module: Any) -> bool:
    return bool(getattr(module, "USES_BROKER", True))


# The summary: (label, bench, table, case prefix, reference case prefix or None for the table's
# baseline). Each cell is the ratio of the case's median to the reference's median, both
# measured in the same run on the same broker.
HEADLINES: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("Cold start: SnapshotView vs bare aiokafka (no decode)", "rebuild", "seconds",
     "snapbus SnapshotView start (len", None),
    ("Cold start: SnapshotView vs bare aiokafka + fastavro", "rebuild", "seconds",
     "snapbus SnapshotView start (len", "bare aiokafka + fastavro"),
    ("Cold start: SnapshotView vs ktables (same fetch settings)", "peers", "seconds",
     "snapbus SnapshotView start", "ktables"),
    ("Publish throughput: publish_many vs bare pre-encoded", "publish", "throughput",
     "snapbus publish_many", None),
    ("Publish throughput: publish() x gather vs bare send+await x gather", "publish",
     "throughput", "snapbus publish() x gather", "bare aiokafka send+await"),
    ("Publish-to-visible p50, wait=20", "latency", "p50-20", "snapbus", None),
    ("Publish-to-visible p99, wait=20", "latency", "p99-20", "snapbus", None),
    ("Publish-to-visible p50, wait=100", "latency", "p50-100", "snapbus", None),
    ("Publish-to-visible p99, wait=100", "latency", "p99-100", "snapbus", None),
    ("Idle barrier vs one bare fetch round trip, wait=20", "latency", "barrier-20",
     "snapbus", None),
    ("Idle barrier vs one bare fetch round trip, wait=100", "latency", "barrier-100",
     "snapbus", None),
    ("Checkpoint start vs full replay (fresh process)", "checkpoint", "process",
     "from checkpoint", None),
)


def _summary_table(rows: list[dict[str, Any]], engines: list[str], names: dict[str, str]
                   ) -> list[str]:
    """Markdown: one line per headline, one column per engine (ratio, and the two medians)."""
    by_engine: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for r in rows:
        by_engine.setdefault(r.get("engine") or "", {}).setdefault(
            (r["bench"], r["table"]), []).append(r)
    lines = ["| headline | " + " | ".join(names[e] for e in engines) + " |",
             "|---|" + "---:|" * len(engines)]
    any_cell = False
    for label, bench, table, case, reference in HEADLINES:
        cells = []
        for e in engines:
            group = by_engine.get(e, {}).get((bench, table), [])
            row = next((r for r in group if r["case"].startswith(case)), None)
            ref = next((r for r in group if (r["case"].startswith(reference) if reference
                                             else r["is_baseline"])), None)
            if row is None or ref is None or not ref["median"]:
                cells.append("-")
                continue
            any_cell = True
            d = row["digits"]
            cells.append(f"{row['median'] / ref['median']:.2f}x "
                         f"({common.fmt_value(row['median'], d)} vs "
                         f"{common.fmt_value(ref['median'], d)} {row['unit']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines if any_cell else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scale", action="store_true",
                        help="also the large cases of the modules that have them (1M records)")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"measured runs per case (default {common.DEFAULT_RUNS}, "
                             f"{common.QUICK_RUNS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--only", nargs="+", metavar="MODULE",
                        help="run only these modules (e.g. bench_read bench_memory)")
    parser.add_argument("--engine", choices=[*common.ENGINES, "both"], default=None,
                        help="the embedded broker every module runs on; 'both' runs each module "
                             "on Tansu then on Apache Kafka (default: SNAPBUS_BENCH_ENGINE, "
                             "else tansu)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"Markdown file to write (default {DEFAULT_OUTPUT.relative_to(ROOT)})")
    parser.add_argument("--json", metavar="FILE", help="also write every result row as JSON")
    args = parser.parse_args()
    runs = args.runs if args.runs is not None else (
        common.QUICK_RUNS if args.quick else common.DEFAULT_RUNS)
    if runs < 1:
        parser.error("--runs must be at least 1")
    engines = _engines(args.engine or common.engine())
    external = bool(os.environ.get("SNAPBUS_BENCH_BOOTSTRAP_SERVERS"))
    if external and len(engines) > 1:
        parser.error("--engine both starts embedded brokers: unset "
                     "SNAPBUS_BENCH_BOOTSTRAP_SERVERS")
    names = {e: common.broker_description(e) for e in engines}
    modules = discover()
    if args.only:
        unknown = [m for m in args.only if m not in modules]
        if unknown:
            parser.error(f"unknown module(s) {', '.join(unknown)}; have {', '.join(modules)}")
        modules = [m for m in modules if m in args.only]

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python benchmarks/run_all.py", *sys.argv[1:]])
    header = [
        "# snapbus benchmark results",
        "",
        f"_{common.environment()}_",
        "",
        "_Brokers: " + "; ".join(names[e] for e in engines) + "._",
        "",
        f"_`{command}`: {'quick sizes, ' if args.quick else ''}{runs} runs per case; "
        f"started {started}. Generated by `benchmarks/run_all.py`; each table gives the median "
        "with min..max and the ratio to a baseline measured in the same run on the same "
        "broker._",
        "",
    ]
    sections: list[str] = []
    rows_all: list[dict[str, Any]] = []
    failed: list[str] = []
    previous_engine = os.environ.get("SNAPBUS_BENCH_ENGINE")
    t_all = time.perf_counter()
    for name in modules:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except Exception as exc:
            failed.append(name)
            traceback.print_exc()
            sections += [f"## {name}", "", f"**Failed** to import: "
                         f"`{type(exc).__name__}: {exc}`", ""]
            continue
        sections += [f"## {name}: {_summary(module, name)}", ""]
        on = engines if _uses_broker(module) else [None]
        for engine in on:
            label = f"{name} on {engine}" if engine else name
            print(f"== {label} ({runs} runs{', quick' if args.quick else ''})", file=sys.stderr)
            if engine:
                os.environ["SNAPBUS_BENCH_ENGINE"] = engine
                sections += [f"### On {names[engine]}", ""]
            t0 = time.perf_counter()
            try:
                extra = ({"scale": True} if args.scale
                         and "scale" in inspect.signature(module.run).parameters else {})
                rows = _rows(asyncio.run(module.run(runs, args.quick, **extra)), name)
            except Exception as exc:  # report it and go on with the other benchmarks
                failed.append(label)
                traceback.print_exc()
                sections += [f"**Failed** after {time.perf_counter() - t0:.1f} s: "
                             f"`{type(exc).__name__}: {exc}`", ""]
            else:
                elapsed = time.perf_counter() - t0
                for r in rows:
                    r["engine"] = engine
                rows_all += rows
                params = json.dumps(rows[0]["params"]) if rows else "{}"
                sections += [f"_wall {elapsed:.1f} s; params {params}_", "",
                             common.render(rows, level=4 if engine else 3)]
                print(common.render(rows), file=sys.stderr)
            summary = _summary_table(rows_all, engines, names)
            _write(args.output, header + _summary_section(summary), sections)
    if previous_engine is None:
        os.environ.pop("SNAPBUS_BENCH_ENGINE", None)
    else:
        os.environ["SNAPBUS_BENCH_ENGINE"] = previous_engine
    total = time.perf_counter() - t_all
    header += [f"_Total wall time {total:.0f} s"
               f"{'; failed: ' + ', '.join(failed) if failed else ''}._", ""]
    _write(args.output, header + _summary_section(_summary_table(rows_all, engines, names)),
           sections)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows_all, f, indent=2)
    print(f"wrote {args.output} ({len(modules)} modules on {', '.join(engines)}; "
          f"{len(failed)} failed; {total:.0f} s)")
    return 1 if failed else 0


def _rows(result: object, name: str) -> list[dict[str, Any]]:
    """A module's `run` result, which must be its rows (`common.Collector.results`)."""
    if not isinstance(result, list):
        raise TypeError(f"{name}.run returned {type(result).__name__}, not rows")
    return result


def _summary_section(table: list[str]) -> list[str]:
    if not table:
        return []
    return ["## Summary", "",
            "Each cell: the snapbus case's median over the reference's median (and both "
            "medians), measured in the same run on the same broker; the module sections below "
            "have every case with min..max. For throughput higher is better, for times lower.",
            "", *table, ""]


if __name__ == "__main__":
    sys.exit(main())
