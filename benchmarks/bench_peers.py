"""Peers: cold rebuild with the `ktables` package beside snapbus and a bare aiokafka loop.

`ktables <https://pypi.org/project/ktables/>`_ (``KafkaTable``) is a GlobalKTable-style
replay-then-follow table over aiokafka: the closest peer of `SnapshotView`. The topic is written
once (pre-encoded, by a fast bare producer): 300k records over 100k sessions (quick: 30k over
10k), 12 partitions, as in ``bench_rebuild``. Each run then times, from a cold client (connect
included) until the table holds the whole topic, interleaved:

- ``bare aiokafka, no decode``: the baseline (``bench_rebuild``'s loop: the transport floor).
- ``bare aiokafka + fastavro -> dict``: the same loop decoding every value with bare fastavro.
- ``ktables KafkaTable, same fetch settings``: ``KafkaTable(value_decoder=...)`` with the same
  bare fastavro decoder (``schemaless_reader`` of the body after the 10-byte header, into a
  dict), ``fetch_max_wait_ms=100`` and the consumer's fetch sizes set like snapbus's reader
  (4 MiB per partition, 64 MiB per fetch, through ``KafkaConnectionConfig.consumer_opts``).
- ``ktables KafkaTable, defaults``: the same decoder, everything else as shipped
  (``fetch_max_wait_ms=500``, ``poll_timeout_ms=200``, aiokafka's fetch sizes).
- ``ktables KafkaTable, same fetch settings, ids decoded as uuid.UUID``: as the first ktables
  case, with the schema's ``uuid`` logical types kept, so fastavro builds `uuid.UUID` ids: the
  decoder of the issue's reference measurement (3.8 s for ktables there).
- ``snapbus SnapshotView start``: as in ``bench_rebuild`` (`WorkspaceSnapshot` values and the
  three indexes; ``len(view)`` checked).

ktables' ``start()`` returns once every partition's position reached the ``end_offsets`` taken
at start. Apache Kafka answers ListOffsets with the high watermark; the embedded Tansu broker
answers the base offset of the newest batch plus one (BROKER.md), so there ktables could return
before the rest of a partition's last batch is applied (it does not when the fetch brings whole
batches, as here: it applies everything fetched before it checks). So, on either broker,
ktables is timed until its counters show every record of the topic applied
(``stats.records_applied + stats.tombstones_applied``, polled every millisecond; the target is
the count the untimed bare read saw, and nothing is compacted during the run: Tansu never
compacts, and Kafka cleans only closed segments while each partition's log here stays in its
first, open one; when that already holds as ``start()`` returns, the time is start()'s), and a
second table gives the records not applied yet when ``start()`` returned. Its contents are then
compared with the last write of every session (as fastavro decodes it).

ktables is optional: if it is not installed (``pip install ktables``) its rows are skipped with
a note.

    python benchmarks/bench_peers.py [--runs N] [--quick]
"""

from __future__ import annotations

import asyncio
import copy
import io
import sys
import time
import uuid
from typing import Any

try:
    from benchmarks import common
    from benchmarks.bench_rebuild import FETCH_MAX_WAIT_MS, _bare_read, _StallMeter, _view
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]
    from bench_rebuild import (  # type: ignore[no-redef]
        FETCH_MAX_WAIT_MS,
        _bare_read,
        _StallMeter,
        _view,
    )

BASELINE = "bare aiokafka, no decode"
COMPLETE_TIMEOUT_S = 300.0


def _ktables_version() -> str | None:
    try:
        from importlib.metadata import version

        import ktables  # noqa: F401
    except ImportError:
        return None
    return version("ktables")


def _decoder(uuids: bool = False) -> Any:
    """Bare fastavro: the body after the single-object header, into a plain dict (ids as
    strings; with `uuids`, as `uuid.UUID` through the schema's logical types)."""
    import fastavro

    from snapbus.codec import HEADER_SIZE, default_codec

    writer = default_codec().writer
    parsed = fastavro.parse_schema(copy.deepcopy(dict(writer.raw))) if uuids else writer.parsed
    reader = fastavro.schemaless_reader

    def decode(value: bytes) -> Any:
        buf = io.BytesIO(value)
        buf.seek(HEADER_SIZE)
        return reader(buf, parsed, None)

    return decode


async def _ktables(bootstrap: str, topic: str, total: int, tuned: bool, uuids: bool = False
                   ) -> tuple[float, float, int, dict[str, Any], Any]:
    """Return (seconds until complete, seconds until start() returned, records not yet
    applied when start() returned, contents, stats)."""
    from ktables import KafkaConnectionConfig, KafkaTable

    if tuned:
        connection: Any = KafkaConnectionConfig(
            bootstrap_servers=bootstrap,
            consumer_opts={"max_partition_fetch_bytes": 4 * 1024 * 1024,
                           "fetch_max_bytes": 64 * 1024 * 1024})
        options: dict[str, Any] = {"fetch_max_wait_ms": FETCH_MAX_WAIT_MS}
    else:
        connection, options = bootstrap, {}
    t0 = time.perf_counter()
    table: Any = KafkaTable(connection=connection, topic=topic, value_decoder=_decoder(uuids),
                            catchup_timeout=COMPLETE_TIMEOUT_S, **options)
    await table.start()
    try:
        started = time.perf_counter() - t0
        if table.status != "caught_up":
            raise RuntimeError(f"ktables table is {table.status}: {table.failure!r}")

        def applied() -> int:
            stats = table.stats
            return int(stats.records_applied + stats.tombstones_applied
                       + stats.value_decode_errors + stats.key_decode_errors
                       + stats.keyless_records)

        missing = total - applied()
        while applied() < total:
            if time.perf_counter() - t0 > COMPLETE_TIMEOUT_S:
                raise RuntimeError(f"ktables applied {applied()} of {total} records")
            await asyncio.sleep(0.001)
        complete = time.perf_counter() - t0
        return complete, started, missing, table.snapshot(), table.stats
    finally:
        await table.stop()


async def run(runs: int, quick: bool) -> list[dict[str, Any]]:
    n_sessions, n_records = (10_000, 30_000) if quick else (100_000, 300_000)
    records = common.make_records(n_sessions, n_records, seed=11)
    expected = common.expected_sessions(records)
    final: dict[str, Any] = {}  # the state every reader must end with: last write wins
    for r in records:
        if isinstance(r, tuple):
            final.pop(r[0], None)
        else:
            final[r["session_id"]] = r
    pairs = common.encode_pairs(records)
    del records
    mib = sum(len(k) + len(v or b"") for k, v in pairs) / 2**20
    kt_version = _ktables_version()
    params = {"records": n_records, "sessions": n_sessions, "partitions": common.PARTITIONS,
              "fetch_max_wait_ms": FETCH_MAX_WAIT_MS, "payload_mib": round(mib, 1),
              "ktables": kt_version or "not installed"}
    c = common.Collector("peers", params)
    about = (f" ktables {kt_version}: until its counters show every record applied (see the "
             "last table)." if kt_version else
             " ktables rows skipped: the package is not installed (pip install ktables).")
    c.table("seconds", f"Cold rebuild with peers, {n_records:,} records over {n_sessions:,} "
            f"sessions ({mib:.0f} MiB)", "seconds", baseline=BASELINE,
            higher_is_better=False,
            note="From a cold client until the table holds every record (connect included)."
                 + about)
    c.table("rate", "Cold rebuild rate with peers", "records/s", baseline=BASELINE,
            higher_is_better=True)
    c.table("stall", "Longest event-loop stall during the rebuild, with peers", "ms",
            baseline=BASELINE, higher_is_better=False,
            note="How long a 5 ms ticker task in the same loop was kept from running at worst.")
    if kt_version:
        c.table("early", f"ktables: records of the {n_records:,} not yet applied when "
                "start() returned", "records", baseline=None, higher_is_better=False,
                note="0: the table was complete when start() returned. start() waits for "
                     "positions >= ListOffsets(latest) taken at start; the embedded Tansu "
                     "broker answers the newest batch's base offset + 1 (BROKER.md), Apache "
                     "Kafka the high watermark.")

    async with common.bench_broker() as broker:
        bootstrap = broker.bootstrap_servers
        config = await common.new_topic(bootstrap, "peers")
        produce_s = await common.bulk_produce(bootstrap, config.topic, pairs)
        print(f"(wrote {len(pairs):,} records in {produce_s:.1f} s)", file=sys.stderr)
        del pairs
        total = 0

        async def raw() -> float:
            nonlocal total
            seconds, count, _ = await _bare_read(bootstrap, config.topic, decode=False)
            total = max(total, count)
            return seconds

        async def decoded() -> float:
            seconds, _, sessions = await _bare_read(bootstrap, config.topic, decode=True)
            if sessions != expected:
                raise RuntimeError(f"bare decode holds {sessions} sessions, expected {expected}")
            return seconds

        def ktables_case(tuned: bool, uuids: bool = False) -> Any:
            label = "same fetch settings" if tuned else "defaults"
            if uuids:
                label += ", ids decoded as uuid.UUID (the issue's reference decoder)"

            async def case() -> float:
                complete, started, missing, contents, stats = await _ktables(
                    bootstrap, config.topic, total, tuned, uuids)
                if uuids:
                    contents = {k: {f: str(x) if isinstance(x, uuid.UUID) else x
                                    for f, x in v.items()} for k, v in contents.items()}
                if contents != final:
                    raise RuntimeError(f"ktables holds {len(contents)} sessions (expected "
                                       f"{expected}), not equal to the last write of each")
                c.add("early", f"ktables, {label}", missing)
                if missing:
                    print(f"(ktables, {label}: start() returned after {started:.2f} s with "
                          f"{missing} records not applied yet)", file=sys.stderr)
                if stats.value_decode_errors:
                    raise RuntimeError(f"ktables saw {stats.value_decode_errors} decode errors")
                return complete

            return f"ktables {kt_version} KafkaTable, {label}", case

        async def view() -> float:
            return await _view(config, expected)

        cases: list[tuple[str, Any]] = [(BASELINE, raw),
                                        ("bare aiokafka + fastavro -> dict", decoded)]
        if kt_version:
            cases += [ktables_case(True), ktables_case(False), ktables_case(True, uuids=True)]
        else:
            print("(skipping ktables: not installed; pip install ktables)", file=sys.stderr)
        cases.append((f"snapbus SnapshotView start (len == {expected:,} checked)", view))
        await raw()  # untimed warm-up: the broker's first full read; also counts the records
        for _ in range(runs):
            for name, case in cases:
                async with _StallMeter() as meter:
                    seconds = await case()
                c.add("seconds", name, seconds)
                c.add("rate", name, n_records / seconds)
                c.add("stall", name, 1000 * meter.max_stall)
        await common.delete_topic(bootstrap, config.topic)
    return c.results()


if __name__ == "__main__":
    common.main(run, __doc__.splitlines()[0])
