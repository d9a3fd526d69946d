"""The Redis-protocol sidecar beside redis-server, measured with redis-benchmark in one run.

A topic holds 1,000 sessions; ``snapbus serve --no-http --redis-port 0`` (a child process, as
deployed) serves it, and a local ``redis-server`` (no persistence) holds the same snapshot
under the same key in the same bytes. ``redis-benchmark`` then runs ``GET ws:{id}:meta`` of
that cached snapshot against each, interleaved round by round (the order alternates), in two
cases: 16 connections (requests per second) and one connection (median latency). The goals
(issue 23): the sidecar's throughput at 16 connections >= 0.5x redis-server's, its
single-connection median latency <= 1.5x. redis-benchmark's histogram puts latencies this
small in 8 us buckets (its p50 reads 7 or 15 us), so the single-connection latency compared is
the mean round trip, one over the requests per second, which resolves them. The machine is
shared: read the ratios, per round and their median, not the absolute figures.

    python benchmarks/bench_resp.py [--rounds N] [--quick] [--without-extras]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

from common import Collector, bench_broker, new_topic

from snapbus.publisher import SnapshotPublisher
from snapbus.resp import encode_snapshot
from snapbus.snapshot import WorkspaceSnapshot

SESSIONS = 1_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _redis_server(key: str, value: bytes) -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
    import redis

    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly",
                                 "no", "--dir", workdir], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(500):
                try:
                    client.set(key, value)
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None:
                        raise SystemExit("redis-server did not start") from None
                    import time

                    time.sleep(0.01)  # (a child starting: nothing to wait on but its port)
            client.close()
            yield port
        finally:
            proc.terminate()
            proc.wait(30)


# ``--without-extras``: the sidecar as it runs without snapbus[resp] (import of hiredis and
# uvloop made to fail), for comparison
_PLAIN = ("import sys; sys.modules['hiredis'] = sys.modules['uvloop'] = None; "
          "from snapbus.cli import main; sys.argv[0] = 'snapbus'; main()")


@contextlib.asynccontextmanager
async def _sidecar(bootstrap: str, topic: str, plain: bool) -> AsyncIterator[int]:
    launch = ["-c", _PLAIN] if plain else ["-m", "snapbus"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *launch, "-b", bootstrap, "-t", topic, "serve", "--no-http",
        "--redis-port", "0", stdout=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "SNAPBUS_SERVE_TOKEN"})
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith("serving redis://"):
            raise SystemExit(f"the sidecar did not start: {line!r}")
        yield int(line.split()[1].rsplit(":", 1)[1])
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def _benchmark(port: int, key: str, connections: int, requests: int) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        "redis-benchmark", "-p", str(port), "-c", str(connections), "-n", str(requests),
        "--csv", "GET", key, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    rows = list(csv.DictReader(io.StringIO(out.decode())))
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"redis-benchmark failed: {err.decode()[-500:]}")
    rps = float(rows[0]["rps"])
    return {"rps": rps, "p50_us": float(rows[0]["p50_latency_ms"]) * 1000,
            "mean_us": connections * 1e6 / rps}


def _build_probe(workdir: str) -> str | None:
    """Compile resp_latency.c (beside this file); None, with a note, without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        print("note: no C compiler: single-connection latency from redis-benchmark only")
        return None
    binary = os.path.join(workdir, "resp_latency")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resp_latency.c")
    subprocess.run([compiler, "-O2", "-o", binary, source], check=True)
    return binary


async def _probe(binary: str, port: int, key: str, requests: int) -> float:
    """The median round trip in microseconds of `requests` sequential GETs on one connection."""
    proc = await asyncio.create_subprocess_exec(
        binary, str(port), key, str(requests), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit("the latency probe failed")
    return int(out.split()[0]) / 1000


async def _wait_until_served(port: int, key: str, value: bytes) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis(port=port)
    try:
        for _ in range(3000):
            if await client.get(key) == value:
                return
            await asyncio.sleep(0.01)  # (the view replays the topic: nothing to wait on)
        raise SystemExit("the sidecar never served the snapshot")
    finally:
        await client.aclose()


async def run(rounds: int, quick: bool, plain: bool = False) -> list[dict[str, Any]]:
    """Run the comparison; return its medians as `common.Collector` rows (for run_all)."""
    if shutil.which("redis-benchmark") is None:
        raise SystemExit("redis-benchmark is not on PATH (apt-get install redis-tools)")
    n16, n1 = (20_000, 5_000) if quick else (100_000, 20_000)
    with tempfile.TemporaryDirectory() as workdir:
        probe = _build_probe(workdir)
        results = await _run(rounds, n16, n1, probe, plain)
    c = Collector("bench_resp", {"sessions": SESSIONS, "n16": n16, "n1": n1, "plain": plain})
    c.table("c16", "GET throughput, 16 connections (redis-benchmark -c 16)", "requests/s",
            baseline="redis-server", higher_is_better=True, digits=0)
    c.table("c1", "GET mean round trip, 1 connection (redis-benchmark -c 1)", "us",
            baseline="redis-server", higher_is_better=False, digits=1)
    if probe is not None:
        c.table("probe", "GET p50 round trip, 1 connection (C probe)", "us",
                baseline="redis-server", higher_is_better=False, digits=1)
    for name in ("snapbus", "redis-server"):
        case = "snapbus serve --redis-port" if name == "snapbus" else name
        for x in results[(name, 16)]:
            c.add("c16", case, x["rps"])
        for x in results[(name, 1)]:
            c.add("c1", case, x["mean_us"])
            if probe is not None:
                c.add("probe", case, x["probe_us"])
    return c.results()


async def _run(rounds: int, n16: int, n1: int, probe: str | None,
               plain: bool) -> dict[tuple[str, int], list[dict[str, float]]]:
    async with bench_broker() as broker:
        config = await new_topic(broker.bootstrap_servers, "resp")
        async with SnapshotPublisher(config) as publisher:
            import uuid

            snapshots = [WorkspaceSnapshot(
                session_id=uuid.uuid4(), repo_id=uuid.uuid4(), agent_id="auth0|agent",
                agent_name=f"agent-{i % 50}", changeset_id=uuid.uuid4(),
                intent="refactor the parser and keep the public API", base_commit="0" * 40,
                state="active", mode="ephemeral") for i in range(SESSIONS)]
            await publisher.publish_many(snapshots)
        target = snapshots[SESSIONS // 2]
        key, value = f"ws:{target.session_id}:meta", encode_snapshot(target)
        async with _sidecar(broker.bootstrap_servers, config.topic, plain) as sidecar_port:
            await _wait_until_served(sidecar_port, key, value)
            with _redis_server(key, value) as redis_port:
                extras = "without hiredis and uvloop" if plain else "snapbus[resp] as installed"
                print(f"{broker.description}; sidecar {extras}; GET of a {len(value)}-byte "
                      f"snapshot; -c 16 -n {n16}, -c 1 -n {n1}; {rounds} rounds")
                results: dict[tuple[str, int], list[dict[str, float]]] = {}
                for r in range(rounds):
                    order = [("snapbus", sidecar_port), ("redis-server", redis_port)]
                    if r % 2:
                        order.reverse()
                    for connections, n in ((16, n16), (1, n1)):
                        for name, port in order:
                            result = await _benchmark(port, key, connections, n)
                            if connections == 1 and probe is not None:
                                result["probe_us"] = await _probe(probe, port, key, n)
                            results.setdefault((name, connections), []).append(result)
                    s16, r16 = results[("snapbus", 16)][-1], results[("redis-server", 16)][-1]
                    s1, r1 = results[("snapbus", 1)][-1], results[("redis-server", 1)][-1]
                    print(f"round {r + 1}: -c 16 {s16['rps']:,.0f} vs {r16['rps']:,.0f} req/s "
                          f"({s16['rps'] / r16['rps']:.2f}x); -c 1 mean {s1['mean_us']:.1f} vs "
                          f"{r1['mean_us']:.1f} us ({s1['mean_us'] / r1['mean_us']:.2f}x), "
                          f"p50 {s1['p50_us']:.0f} vs {r1['p50_us']:.0f} us"
                          + (f"; C probe p50 {s1['probe_us']:.1f} vs {r1['probe_us']:.1f} us "
                             f"({s1['probe_us'] / r1['probe_us']:.2f}x)" if probe else ""))
    thr = [s["rps"] / r["rps"] for s, r in zip(results[("snapbus", 16)],
                                                results[("redis-server", 16)], strict=True)]
    lat = [s["mean_us"] / r["mean_us"] for s, r in zip(results[("snapbus", 1)],
                                                        results[("redis-server", 1)], strict=True)]

    if probe is not None:
        ratios = [s["probe_us"] / r["probe_us"] for s, r in zip(
            results[("snapbus", 1)], results[("redis-server", 1)], strict=True)]
        print(f"median: -c 1 p50 round trip (C probe) snapbus "
              f"{statistics.median(x['probe_us'] for x in results[('snapbus', 1)]):.1f} us, "
              f"redis-server "
              f"{statistics.median(x['probe_us'] for x in results[('redis-server', 1)]):.1f}"
              f" us, ratio {statistics.median(ratios):.2f}x (goal <= 1.5x)")

    def med(name: str, conns: int, field: str) -> float:
        return statistics.median(x[field] for x in results[(name, conns)])

    print(f"median: -c 16 snapbus {med('snapbus', 16, 'rps'):,.0f} req/s, redis-server "
          f"{med('redis-server', 16, 'rps'):,.0f} req/s, ratio {statistics.median(thr):.2f}x "
          f"(goal >= 0.5x)")
    print(f"median: -c 1 mean round trip snapbus {med('snapbus', 1, 'mean_us'):.1f} us, "
          f"redis-server {med('redis-server', 1, 'mean_us'):.1f} us, ratio "
          f"{statistics.median(lat):.2f}x (goal <= 1.5x); p50 as redis-benchmark prints it "
          f"(8 us buckets at this range): {med('snapbus', 1, 'p50_us'):.0f} vs "
          f"{med('redis-server', 1, 'p50_us'):.0f} us")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer requests per case")
    parser.add_argument("--without-extras", action="store_true",
                        help="run the sidecar without hiredis and uvloop")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.quick, args.without_extras))


if __name__ == "__main__":
    main()
