"""Reads by the caller's own key type, and the whole process's memory per session.

Reads. A topic of 200k records over 100k sessions (quick: 20k over 10k), 12 partitions, is
written once (pre-encoded) and a `SnapshotView` started over it. Every session is read once
first (random order, timed: the first-read cost, which decodes the value), then over one
random sequence of 200k session ids (quick 50k), each run times every case below with gc off,
best of 5 passes, the cases in a new random order each run:

- ``uuid.UUID`` keys (fresh objects, as parsed from a request): ``view.get(u)``, ``view[u]``,
  ``u in view``, each against the same operation on a dict keyed by the same UUID objects
  (the baseline of its table).
- canonical ``str`` keys (fresh objects, not the view's own strings): ``view.get(s)``,
  ``view[s]``, ``s in view`` against a dict keyed by the same string objects (the baseline);
  and, for reference, a dict keyed by equal strings that are not the probes (the view's own
  key objects), which pays the same string compare as the view.
- ``by_repo(uuid.UUID)`` over random repositories (5,000 queries, quick 2,000) against a
  hand-built ``dict[uuid.UUID, set[str]]`` keyed by the same UUID objects, read into a list of
  snapshots; ``by_repo(str)`` against the same keyed by the same strings.

Memory. For the whole process: `tracemalloc` runs from just before the view is created; after
``start()`` returned live (the view still running: the client, its buffers and fetched
batches included) and a full collection, the traced total minus the total before, per
session, is the size as started; after ``view.snapshots()`` read (decoded) every session, the
size once every session was read; then after every session was also read by `uuid.UUID`
(what ids read that way keep). 100k sessions over 200k records with the default benchmark
values (``--scale``: also 1M sessions over 1M records, one pass). The first-read cost per
session (untraced, from the read section) goes beside it.

    python benchmarks/bench_reads.py [--runs N] [--quick] [--scale]
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

FETCH_MAX_WAIT_MS = 100
PASSES = 5
SCALE_SESSIONS = 1_000_000
MEMORY_PASSES = 2
FIRST_READ = "view.get(str) of a session not read before (decodes it), random order"


def _fresh(s: str) -> str:
    """An equal string that is not the same object (as a request handler would hold)."""
    return s.encode("ascii").decode("ascii")


def _best_ns(body: Callable[[], object], count: int) -> float:
    """Best of `PASSES` timed passes of `body` (after one untimed), gc off; ns per item."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        body()
        best = float("inf")
        for _ in range(PASSES):
            t0 = time.perf_counter_ns()
            body()
            best = min(best, time.perf_counter_ns() - t0)
    finally:
        if enabled:
            gc.enable()
    return best / count


def _loops(view: Any, probes: list[Any], same: dict[Any, Any], other: dict[Any, Any] | None,
           kind: str) -> dict[str, list[tuple[str, Callable[[], object]]]]:
    """Per operation (get, getitem, contains): (case, body) with the dict baseline first."""

    def dict_get(d: dict[Any, Any]) -> Callable[[], object]:
        def body() -> None:
            get = d.get
            for k in probes:
                get(k)
        return body

    def dict_item(d: dict[Any, Any]) -> Callable[[], object]:
        def body() -> None:
            for k in probes:
                d[k]
        return body

    def dict_in(d: dict[Any, Any]) -> Callable[[], object]:
        def body() -> None:
            for k in probes:
                k in d  # noqa: B015
        return body

    def view_get() -> None:
        get = view.get
        for k in probes:
            get(k)

    def view_item() -> None:
        v = view
        for k in probes:
            v[k]

    def view_in() -> None:
        v = view
        for k in probes:
            k in v  # noqa: B015

    def wrapped() -> None:
        def get(key: Any, default: Any = None, _get: Any = same.get) -> Any:
            return _get(key, default)
        for k in probes:
            get(k)

    same_name = f"dict keyed by the same {kind} objects"
    other_name = "dict keyed by equal strings (the view's own key objects)"
    out = {
        "get": [(f"{same_name}: d.get(k)", dict_get(same))],
        "getitem": [(f"{same_name}: d[k]", dict_item(same))],
        "contains": [(f"{same_name}: k in d", dict_in(same))],
    }
    if other is not None:
        out["get"].append((f"{other_name}: d.get(k)", dict_get(other)))
        out["getitem"].append((f"{other_name}: d[k]", dict_item(other)))
        out["contains"].append((f"{other_name}: k in d", dict_in(other)))
    out["get"].append(("a one-line Python function returning that d.get(k) (the floor of any "
                       "Python API)", wrapped))
    out["get"].append((f"view.get({kind})", view_get))
    out["getitem"].append((f"view[{kind}]", view_item))
    out["contains"].append((f"{kind} in view", view_in))
    return out


def _repo_loops(view: Any, plain: dict[str, Any], queries: list[Any], kind: str
                ) -> list[tuple[str, Callable[[], object]]]:
    index: dict[Any, set[str]] = {}
    by_text = {str(q): q for q in queries}
    for key, s in plain.items():
        q = by_text.get(s.repo_key)
        if q is not None:
            index.setdefault(q, set()).add(key)

    def hand() -> None:
        d = plain
        for q in queries:
            [d[k] for k in index.get(q, ())]

    def method() -> None:
        by_repo = view.by_repo
        for q in queries:
            by_repo(q)

    return [(f"hand-built dict[{kind}, set[str]] keyed by the same {kind} objects", hand),
            (f"view.by_repo({kind})", method)]


async def _reads(c: common.Collector, config: Any, expected: int, runs: int,
                 n_lookups: int, n_repo: int) -> None:
    from snapbus.view import SnapshotView

    view = SnapshotView(config, fetch_max_wait_ms=FETCH_MAX_WAIT_MS, start_timeout_s=600)
    async with view:
        if view.status != "live" or len(view) != expected:
            raise RuntimeError(f"view is {view.status} with {len(view)} sessions, "
                               f"expected live with {expected}")
        rng = random.Random(23)
        ids = sorted(str(session_id) for session_id in view)
        order = [_fresh(k) for k in rng.sample(ids, len(ids))]
        enabled = gc.isenabled()
        gc.disable()
        t0 = time.perf_counter_ns()
        for k in order:
            view.get(k).intent  # noqa: B018 - the read is the point
        c.add("first", FIRST_READ, (time.perf_counter_ns() - t0) / len(order))
        if enabled:
            gc.enable()
        plain = {s.key: s for s in view.snapshots()}
        texts = [_fresh(k) for k in rng.choices(ids, k=n_lookups)]
        uuids = [uuid.UUID(k) for k in texts]
        tables = {}
        for kind, probes in (("uuid.UUID", uuids), ("str", texts)):
            same = {k: plain[str(k)] for k in probes}
            other = plain if kind == "str" else None
            for op, cases in _loops(view, probes, same, other, kind).items():
                tables[f"{op}-{kind}"] = cases
        repos = sorted({s.repo_key for s in plain.values()})
        repo_texts = [_fresh(r) for r in rng.choices(repos, k=n_repo)]
        tables["by_repo-uuid.UUID"] = _repo_loops(view, plain, [uuid.UUID(r) for r in repo_texts],
                                                  "uuid.UUID")
        tables["by_repo-str"] = _repo_loops(view, plain, repo_texts, "str")
        counts = {name: (n_repo if name.startswith("by_repo") else n_lookups) for name in tables}
        shuffle = random.Random(29)
        for _ in range(runs):
            for name in shuffle.sample(list(tables), len(tables)):
                for case, body in shuffle.sample(tables[name], len(tables[name])):
                    c.add(name, case, _best_ns(body, counts[name]))
            await asyncio.sleep(0)  # let the view's task run between runs


async def _memory(c: common.Collector, config: Any, expected: int, passes: int,
                  suffix: str) -> None:
    from snapbus.view import SnapshotView

    for _ in range(passes):
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            view = SnapshotView(config, fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
                                start_timeout_s=3600)
            await view.start()
            try:
                if view.status != "live" or len(view) != expected:
                    raise RuntimeError(f"view is {view.status} with {len(view)} sessions")
                gc.collect()
                started = tracemalloc.get_traced_memory()[0] - before
                view.snapshots()
                gc.collect()
                read = tracemalloc.get_traced_memory()[0] - before
                for session_id in view:  # (fresh uuid.UUID objects, as a request parses)
                    view.get(session_id)
                del session_id
                gc.collect()
                by_uuid = tracemalloc.get_traced_memory()[0] - before
            finally:
                await view.stop()
        finally:
            tracemalloc.stop()
        del view
        c.add("memory" + suffix, "as started (values kept encoded)", started / expected)
        c.add("memory" + suffix, "after every session was read once", read / expected)
        c.add("memory" + suffix, "after every session was also read once by uuid.UUID",
              by_uuid / expected)


async def run(runs: int, quick: bool, scale: bool = False) -> list[dict[str, Any]]:
    n_sessions, n_records = (10_000, 20_000) if quick else (100_000, 200_000)
    n_lookups, n_repo = (50_000, 2_000) if quick else (200_000, 5_000)
    params: dict[str, Any] = {"sessions": n_sessions, "records": n_records,
                              "lookups": n_lookups, "repo_queries": n_repo,
                              "passes": PASSES, "partitions": common.PARTITIONS}
    if scale:
        params["scale_sessions"] = SCALE_SESSIONS
    c = common.Collector("reads", params)
    for op, what in (("get", "get"), ("getitem", "[]"), ("contains", "in")):
        for kind in ("uuid.UUID", "str"):
            c.table(f"{op}-{kind}", f"{what} with {kind} keys, {n_sessions:,} sessions, "
                    f"{n_lookups:,} random hits", "ns/lookup",
                    baseline=next(iter(_loops(None, [], {}, None, kind)[op]))[0],
                    higher_is_better=False,
                    note=f"Best of {PASSES} passes per run, gc off, loop overhead included; "
                         "every session read once before.")
    for kind in ("uuid.UUID", "str"):
        c.table(f"by_repo-{kind}", f"by_repo with {kind} keys, {n_sessions:,} sessions, "
                f"{n_repo:,} random repositories", "ns/query",
                baseline=f"hand-built dict[{kind}, set[str]] keyed by the same {kind} objects",
                higher_is_better=False, digits=3,
                note="Each query builds its result list of snapshots.")
    c.table("first", f"First read of a session, {n_sessions:,} sessions", "ns/session",
            baseline=None, higher_is_better=False)
    sizes = [(n_sessions, n_records, min(runs, MEMORY_PASSES), "")]
    if scale:
        sizes.append((SCALE_SESSIONS, SCALE_SESSIONS, 1, "-scale"))
    for sessions, records, _, suffix in sizes:
        c.table("memory" + suffix, f"Whole-process memory per session, {sessions:,} sessions "
                f"({records:,} records read)", "bytes/session", baseline=None,
                higher_is_better=False,
                note="tracemalloc from before the view is created; the view running (client "
                     "and buffers included), after a full collection.")

    async with common.bench_broker() as broker:
        bootstrap = broker.bootstrap_servers
        for sessions, n, passes, suffix in sizes:
            records = common.make_records(sessions, n, seed=17)
            expected = common.expected_sessions(records)
            pairs = common.encode_pairs(records)
            del records
            config = await common.new_topic(bootstrap, "reads")
            produce_s = await common.bulk_produce(bootstrap, config.topic, pairs)
            print(f"(wrote {len(pairs):,} records in {produce_s:.1f} s)", file=sys.stderr)
            del pairs
            try:
                if not suffix:
                    await _reads(c, config, expected, runs, n_lookups, n_repo)
                await _memory(c, config, expected, passes, suffix)
            finally:
                await common.delete_topic(bootstrap, config.topic)
    return c.results()


if __name__ == "__main__":
    common.main(run, __doc__.splitlines()[0] if __doc__ else "",
                flags={"--scale": "also the memory at 1M sessions (minutes, GBs)"})
