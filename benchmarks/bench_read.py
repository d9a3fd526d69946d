"""Read latency: looking sessions up in a live `SnapshotView`, beside a plain dict and Redis.

A topic of 200k records over 100k sessions (quick: 20k over 10k), 12 partitions, is written
once (pre-encoded) and a `SnapshotView` is started over it (it must hold every session). Then,
over one random sequence of session ids (200k lookups, quick 50k; canonical lowercase strings
that are distinct objects from the view's keys, as if parsed from a request), each run times a tight
loop per case with ``time.perf_counter_ns``, garbage collection off, right after an untimed
pass of the same loop (so every case runs with warm caches and the strings' hashes cached),
the cases in a new random order each run:

- ``dict.get(str)``: the baseline, a plain ``dict`` holding the same `WorkspaceSnapshot`
  objects under the same keys: the floor of an in-memory lookup (loop overhead included, as
  in every case).
- ``dict.get(str)`` followed by ``len(str)`` of the key: one more C call per lookup and no
  other memory touched. In a tight loop the CPU overlaps the cache misses of consecutive
  lookups; any work added per lookup, even this, overlaps fewer of them and costs far more
  than its own few nanoseconds (see the README).
- A one-line Python function around that ``dict.get``: what any method of a Python class
  costs at least (one call frame), the floor for ``view.get``.
- ``view.get(str)``, ``view.get(uuid.UUID)``, ``view[str]``, ``str in view``; and
  ``view.get(str)`` of sessions that are not in the view (misses, a separate random sequence).
- ``Redis GET + msgpack.unpackb``: the cache snapbus replaces. A local ``redis-server``
  (started on a free loopback port, no persistence) holds the same snapshots as MessagePack
  maps under the same keys; redis-py's synchronous client does one GET per lookup and unpacks
  it (20k lookups, quick 5k: the first ones of the same sequence). Synchronous and on loopback,
  this is the most favourable case for Redis. Skipped, with a note, when ``redis-server`` is
  not on PATH or the ``redis`` package is missing.

Index queries (microseconds per query, result lists built): `by_repo` (str and `uuid.UUID`),
`by_agent` and `by_state` over random repositories / agents (5,000 queries, quick 2,000) and
every state in turn (10 times), against a hand-built ``dict[str, set[str]]`` index of the plain
dict read the same way (the baseline), and a full scan of the plain dict (what a store without
secondary indexes does; fewer queries, every state once).

    python benchmarks/bench_read.py [--runs N] [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common  # type: ignore[no-redef]

FETCH_MAX_WAIT_MS = 100
BASELINE = "dict.get(str) (plain dict, same snapshots)"
ONE_MORE_CALL = "dict.get(str), then len(str): one more C call per lookup, nothing else"
WRAPPED = "a one-line Python function returning dict.get(str) (the floor of any Python API)"
INDEX_BASELINE = "hand-built dict[str, set[str]] index"
FIRST_READ = "view.get(str).intent, first read of a session (decodes it)"


def _fresh(s: str) -> str:
    """An equal string that is not the same object (as a request handler would hold)."""
    return s.encode("ascii").decode("ascii")


def _time_ns(body: Callable[[], object], count: int) -> float:
    """Run `body` twice with the garbage collector off, untimed then timed (so every case
    starts with its own data in the CPU caches, whatever ran before); return ns per item."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        body()
        t0 = time.perf_counter_ns()
        body()
        elapsed = time.perf_counter_ns() - t0
    finally:
        if enabled:
            gc.enable()
    return elapsed / count


# ----------------------------------------------------------------------------- redis


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _redis_server() -> Iterator[Any]:
    """Start a throwaway redis-server on loopback; yield a connected redis-py client."""
    import redis

    binary = shutil.which("redis-server")
    assert binary is not None
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"redis-server did not start: {err[-500:]}") from None
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _redis_available() -> str | None:
    """None when the Redis case can run, else why not."""
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (apt-get install redis-server)"
    try:
        import msgpack  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install redis msgpack)"
    return None


def _redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), "?")
    except (OSError, subprocess.SubprocessError):
        return "?"


# ----------------------------------------------------------------------------- cases


def _lookup_cases(view: Any, plain: dict[str, Any], keys: list[str], uuids: list[uuid.UUID],
                  misses: list[str]) -> list[tuple[str, Callable[[], object], int]]:
    def dict_get() -> None:
        get = plain.get
        for k in keys:
            get(k)

    def dict_get_len() -> None:
        get = plain.get
        for k in keys:
            get(k)
            len(k)

    def wrapped_get() -> None:
        def get(key: str, default: Any = None, _get: Any = plain.get) -> Any:
            return _get(key, default)
        for k in keys:
            get(k)

    def view_get() -> None:
        get = view.get
        for k in keys:
            get(k)

    def view_get_uuid() -> None:
        get = view.get
        for k in uuids:
            get(k)

    def view_getitem() -> None:
        v = view
        for k in keys:
            v[k]

    def view_contains() -> None:
        v = view
        for k in keys:
            k in v  # noqa: B015

    def view_get_miss() -> None:
        get = view.get
        for k in misses:
            get(k)

    def dict_get_miss() -> None:
        get = plain.get
        for k in misses:
            get(k)

    n, m = len(keys), len(misses)
    return [
        (BASELINE, dict_get, n),
        (ONE_MORE_CALL, dict_get_len, n),
        (WRAPPED, wrapped_get, n),
        ("view.get(str)", view_get, n),
        ("view.get(uuid.UUID)", view_get_uuid, n),
        ("view[str]", view_getitem, n),
        ("str in view", view_contains, n),
        ("dict.get(str), absent session", dict_get_miss, m),
        ("view.get(str), absent session", view_get_miss, m),
    ]


def _index_cases(
    view: Any, plain: dict[str, Any], repos: list[str], agents: list[str], states: list[str],
    scan_queries: int, state_scan_queries: int,
) -> dict[str, list[tuple[str, Callable[[], object], int]]]:
    """Per index: (case, body, queries) with the baseline first."""
    idx: dict[str, dict[str, set[str]]] = {"repo": {}, "agent": {}, "state": {}}
    for key, s in plain.items():
        idx["repo"].setdefault(s.repo_key, set()).add(key)
        idx["agent"].setdefault(s.agent_id, set()).add(key)
        idx["state"].setdefault(s.state, set()).add(key)
    repo_uuids = [uuid.UUID(r) for r in repos]
    values = list(plain.values())

    def hand(index: dict[str, set[str]], queries: list[str]) -> Callable[[], object]:
        def body() -> None:
            d = plain
            for q in queries:
                [d[k] for k in index.get(q, ())]
        return body

    def method(fn: Callable[[Any], object], queries: Sequence[Any]) -> Callable[[], object]:
        def body() -> None:
            for q in queries:
                fn(q)
        return body

    def scan(attr: str, queries: list[str]) -> Callable[[], object]:
        def body() -> None:
            for q in queries:
                [s for s in values if getattr(s, attr) == q]
        return body

    out: dict[str, list[tuple[str, Callable[[], object], int]]] = {}
    for name, index, queries, fn, attr in (
        ("by_repo", idx["repo"], repos, view.by_repo, "repo_key"),
        ("by_agent", idx["agent"], agents, view.by_agent, "agent_id"),
        ("by_state", idx["state"], states, view.by_state, "state"),
    ):
        few = queries[:state_scan_queries if name == "by_state" else scan_queries]
        cases = [(INDEX_BASELINE, hand(index, queries), len(queries)),
                 (f"view.{name}(str)", method(fn, queries), len(queries))]
        if name == "by_repo":
            cases.append(("view.by_repo(uuid.UUID)", method(view.by_repo, repo_uuids),
                          len(repo_uuids)))
        cases.append((f"full scan of the plain dict ({len(few)} queries)", scan(attr, few),
                      len(few)))
        out[name] = cases
    return out


# ----------------------------------------------------------------------------- run


async def run(runs: int, quick: bool) -> list[dict[str, Any]]:
    from snapbus.view import SnapshotView

    n_sessions, n_records = (10_000, 20_000) if quick else (100_000, 200_000)
    n_lookups, n_redis = (50_000, 5_000) if quick else (200_000, 20_000)
    n_index, n_scan = (2_000, 5) if quick else (5_000, 10)
    records = common.make_records(n_sessions, n_records, seed=17)
    expected = common.expected_sessions(records)
    pairs = common.encode_pairs(records)
    del records
    redis_skip = _redis_available()
    params = {"sessions": n_sessions, "records": n_records, "lookups": n_lookups,
              "redis_lookups": 0 if redis_skip else n_redis, "index_queries": n_index,
              "partitions": common.PARTITIONS}
    c = common.Collector("read", params)
    redis_note = (f" Redis row: redis-server {_redis_version()} on loopback, redis-py "
                  f"synchronous client, {n_redis:,} lookups (the first of the same sequence)."
                  if not redis_skip else f" Redis row skipped: {redis_skip}.")
    c.table("lookup", f"Point lookup over {n_sessions:,} sessions, {n_lookups:,} random hits",
            "ns/lookup", baseline=BASELINE, higher_is_better=False,
            note="Tight loop, gc off, loop overhead included in every case. First read: "
                 f"{FIRST_READ!r} over sessions not read before (the view decodes lazily), "
                 "each run other sessions. Misses: "
                 f"{n_lookups // 4:,} random session ids not in the view." + redis_note)

    async with common.bench_broker() as broker:
        bootstrap = broker.bootstrap_servers
        config = await common.new_topic(bootstrap, "read")
        produce_s = await common.bulk_produce(bootstrap, config.topic, pairs)
        print(f"(wrote {len(pairs):,} records in {produce_s:.1f} s)", file=sys.stderr)
        del pairs
        view = SnapshotView(config, fetch_max_wait_ms=FETCH_MAX_WAIT_MS, start_timeout_s=600)
        async with view:
            if view.status != "live" or len(view) != expected:
                raise RuntimeError(f"view is {view.status} with {len(view)} sessions, "
                                   f"expected live with {expected}")
            rng = random.Random(23)
            # the view decodes lazily: the first read of a session decodes it (once; so each
            # run reads other sessions, and only once); measured before anything reads them
            ids = sorted(str(session_id) for session_id in view)
            n_first = min(10_000, len(ids) // (runs + 1))
            cold = rng.sample(ids, n_first * runs)
            for r in range(runs):
                chunk = [_fresh(k) for k in cold[r * n_first:(r + 1) * n_first]]
                enabled = gc.isenabled()
                gc.disable()
                t0 = time.perf_counter_ns()
                for k in chunk:
                    view.get(k).intent  # noqa: B018 - the read is the point
                c.add("lookup", FIRST_READ, (time.perf_counter_ns() - t0) / n_first)
                if enabled:
                    gc.enable()
            snapshots = view.snapshots()
            plain = {s.key: s for s in snapshots}
            ids = list(plain)
            keys = [_fresh(k) for k in rng.choices(ids, k=n_lookups)]
            uuids = [uuid.UUID(k) for k in keys]
            misses = [str(uuid.UUID(int=rng.getrandbits(128), version=4))
                      for _ in range(n_lookups // 4)]
            assert not any(m in plain for m in misses)
            lookups = _lookup_cases(view, plain, keys, uuids, misses)

            repos = sorted({s.repo_key for s in snapshots})
            agents = sorted({s.agent_id for s in snapshots})
            states = sorted({s.state for s in snapshots})
            repo_q = [_fresh(r) for r in rng.choices(repos, k=n_index)]
            agent_q = [_fresh(a) for a in rng.choices(agents, k=n_index)]
            state_q = [_fresh(s) for s in states] * 10  # every state in turn: the scan's mix
            indexes = _index_cases(view, plain, repo_q, agent_q, state_q, n_scan, len(states))
            sizes = {
                "by_repo": statistics.mean(len(view.by_repo(q)) for q in repo_q),
                "by_agent": statistics.mean(len(view.by_agent(q)) for q in agent_q),
            }
            per_state = ", ".join(f"{s} {len(view.by_state(s)):,}" for s in states)
            for name in indexes:
                if name == "by_state":
                    what = (f"{len(state_q)} queries cycling through every state (the scan: "
                            f"each state once); results: {per_state}")
                else:
                    what = (f"{n_index:,} random {name[3:]}s, mean result "
                            f"{sizes[name]:.1f} sessions")
                c.table(name, f"Index query {name}, {n_sessions:,} sessions", "µs/query",
                        baseline=INDEX_BASELINE, higher_is_better=False,
                        note=f"{what}. Each query builds its result list of snapshots.")

            order = random.Random(29)
            timed: dict[str, list[float]] = {name: [] for name, _, _ in lookups}
            for _ in range(runs):
                # a new order each run: no case always runs right after the same other one
                for name, body, count in order.sample(lookups, len(lookups)):
                    timed[name].append(_time_ns(body, count))
                for table, cases in indexes.items():
                    for name, body, count in cases:
                        c.add(table, name, _time_ns(body, count) / 1000)
                await asyncio.sleep(0)  # let the view's task run between runs
            for name, values in timed.items():  # (rows in the cases' order)
                for value in values:
                    c.add("lookup", name, value)
        await common.delete_topic(bootstrap, config.topic)
    if redis_skip is None:  # blocking client: run it with the view stopped, nothing else going
        _run_redis(c, plain, keys[:n_redis], runs)
    else:
        print(f"(skipping the Redis + MessagePack case: {redis_skip})", file=sys.stderr)
    return c.results()


def _run_redis(c: common.Collector, plain: dict[str, Any], keys: list[str], runs: int) -> None:
    import msgpack

    with _redis_server() as client:
        pipe = client.pipeline(transaction=False)
        t0 = time.perf_counter()
        for i, (key, snapshot) in enumerate(plain.items(), 1):
            pipe.set(key, msgpack.packb(snapshot.to_dict()))
            if i % 5000 == 0:
                pipe.execute()
        pipe.execute()
        print(f"(loaded {len(plain):,} snapshots into redis in {time.perf_counter() - t0:.1f} s)",
              file=sys.stderr)
        first = msgpack.unpackb(client.get(keys[0]))
        if first != plain[keys[0]].to_dict():
            raise RuntimeError("redis returned a different snapshot")

        def body() -> None:
            get, unpack = client.get, msgpack.unpackb
            for k in keys:
                unpack(get(k))

        parser = "hiredis" if _has_hiredis() else "pure-Python parser"
        name = f"Redis GET + msgpack.unpackb (redis-py sync, {parser})"
        for _ in range(runs):
            c.add("lookup", name, _time_ns(body, len(keys)))


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    common.main(run, __doc__.splitlines()[0])
