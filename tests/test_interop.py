"""The wire contract, proven by reference implementations: a Java pod and a Rust pod.

interop/java (Apache Avro's single-object encoding, the official kafka-clients producer and
consumer with their default partitioner) and interop/rust (the upstream's language:
apache-avro and rdkafka with ``partitioner=murmur2_random``) are built here when missing or
stale (`make pods` does the same), then each checks the shared vectors, publishes sessions
that a snapbus view must show field for field (one updated, one evicted), and reads back what
snapbus published. Apache Kafka only (``kafka``); a missing Maven or cargo fails the test:
the contract is never skipped. docs/interop.md has the versions and findings.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snapbus import KafkaConfig, SnapshotPublisher, SnapshotView, WorkspaceSnapshot
from snapbus.publisher import _MurmurPartitioner
from snapbus.topic import ensure_topic
from tests.conftest import BrokerAddress
from tests.helpers import make_snapshot

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
INTEROP = ROOT / "interop"
VECTOR_FILES = sorted(str(p) for p in (INTEROP / "vectors").glob("*.json"))
VECTOR_SNAPSHOTS = [v for f in VECTOR_FILES
                   for v in json.loads(Path(f).read_text(encoding="utf-8"))["snapshots"]]
RUST_TARGET = Path(os.environ.get(
    "SNAPBUS_INTEROP_RUST_TARGET", Path.home() / ".cache" / "snapbus" / "interop-rust"))
"""Where cargo builds the Rust pod: outside the work tree, so a new clone (CI) reuses it."""
POD_TIMEOUT_S = 120.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    rustup = Path.home() / ".cargo" / "bin" / name  # (rustup's, when not on PATH)
    if path is None and rustup.is_file():
        path = str(rustup)
    if path is None:
        pytest.fail(f"{name} is not installed: the {name} pod of the wire-contract tests "
                    "cannot be built (docs/interop.md)")
    return path


def _newest(folder: Path) -> float:
    return max(p.stat().st_mtime for p in folder.rglob("*") if p.is_file())


def build_java() -> list[str]:
    """Build interop/java unless its jar is newer than its sources; return the command."""
    folder = INTEROP / "java"
    jar, classpath = folder / "target" / "pod.jar", folder / "target" / "classpath.txt"
    sources = max(_newest(folder / "src"), (folder / "pom.xml").stat().st_mtime,
                  (ROOT / "schemas" / "workspace_snapshot.avsc").stat().st_mtime)
    if not (jar.is_file() and classpath.is_file() and jar.stat().st_mtime > sources):
        _run([_tool("mvn"), "-q", "-B", "package", "-DskipTests"], cwd=folder, timeout=900)
    return [_tool("java"), "-cp", f"{jar}{os.pathsep}{classpath.read_text().strip()}",
            "dev.snapbus.interop.Pod"]


def build_rust() -> list[str]:
    """Build interop/rust (cargo does nothing when it is fresh); return the command."""
    folder = INTEROP / "rust"
    env = {**os.environ, "CARGO_TARGET_DIR": str(RUST_TARGET)}
    _run([_tool("cargo"), "build", "--quiet", "--locked"], cwd=folder, timeout=1800, env=env)
    return [str(RUST_TARGET / "debug" / "snapbus-interop-pod")]


def _run(command: list[str], *, cwd: Path | None = None, timeout: float = POD_TIMEOUT_S,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command[:1] + command[-4:])} exited {result.returncode}:\n"
                    f"{result.stderr[-4000:]}{result.stdout[-2000:]}")
    return result


PODS: dict[str, Callable[[], list[str]]] = {"java": build_java, "rust": build_rust}
_built: dict[str, list[str]] = {}


@pytest.fixture(params=sorted(PODS))
def pod(request: pytest.FixtureRequest) -> list[str]:
    """The command that runs one pod, built first when needed."""
    name: str = request.param
    if name not in _built:
        _built[name] = PODS[name]()
    return _built[name]


def partition_of(key: str, count: int) -> int:
    """The partition snapbus's publisher chooses for a key."""
    return _MurmurPartitioner()(key.encode(), list(range(count)), list(range(count)))


def test_pod_checks_every_vector(pod: list[str]) -> None:
    result = _run([*pod, "vectors", *VECTOR_FILES])
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["failures"] == 0
    assert summary["fingerprint"].removeprefix("0x") in ("c2c55d77c6120393", "930312c6775dc5c2")
    expected = sum(len(d["snapshots"]) + len(d["keys"])
                   for d in (json.loads(Path(f).read_text(encoding="utf-8")) for f in VECTOR_FILES))
    assert summary["checked"] == expected


def test_pod_catches_a_wrong_vector(pod: list[str], tmp_path: Path) -> None:
    """The pods' check can fail, and names the byte, field and partition that differ."""
    doc = json.loads(Path(VECTOR_FILES[-1]).read_text(encoding="utf-8"))
    assert doc["snapshots"][0]["name"] == "every_field"
    vector = doc["snapshots"][0]
    value = bytearray.fromhex(vector["value_hex"])
    value[150] ^= 0x01
    vector["value_hex"] = value.hex()
    vector["partition"]["50"] = (vector["partition"]["50"] + 1) % 50
    doc["snapshots"][1]["snapshot"]["intent"] = "not what the value holds"
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    result = subprocess.run([*pod, "vectors", str(path)], capture_output=True, text=True,
                            timeout=POD_TIMEOUT_S, check=False)
    assert result.returncode == 1, result.stderr
    assert "every_field: value byte 150:" in result.stderr
    assert "every_field: partition of 50 is" in result.stderr
    assert "empty_text: field intent decodes to" in result.stderr
    assert "every_field: field intent decodes to" in result.stderr  # (byte 150)
    # and the value of empty_text, which no longer holds its (changed) fields
    assert json.loads(result.stdout.splitlines()[-1])["failures"] == 5


async def test_a_view_shows_what_the_pod_publishes(
    pod: list[str], broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config)
    async with SnapshotView(config, fetch_max_wait_ms=20) as view:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "published.json"
            await asyncio.to_thread(
                _run, [*pod, "publish", broker.bootstrap_servers, topic_name, str(out)])
            report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        await view.barrier(timeout=30)
        count = report["partitions"]
        latest: dict[str, dict[str, str]] = {}
        for entry in report["published"] + report["evicted"]:
            key = entry["snapshot"]["session_id"] if "snapshot" in entry else entry["session_id"]
            assert entry["partition"] == partition_of(key, count), (
                f"{report['client']} put {key} on partition {entry['partition']}")
        for entry in report["published"]:
            latest[entry["snapshot"]["session_id"]] = entry["snapshot"]
        gone = {entry["session_id"] for entry in report["evicted"]}
        assert len(latest) == 5
        assert len(gone) == 1
        assert gone < latest.keys()
        for key, fields in latest.items():
            if key in gone:
                assert key not in view
                assert view.get(key) is None
                continue
            shown = view.get(key)
            assert shown is not None, f"the view lacks {key} that {report['client']} published"
            assert shown.to_dict() == fields
        assert sum(1 for e in report["published"] if e["snapshot"]["state"] == "merged") == 1
        assert view.stats.decode_errors == 0
        assert len(view) == 4


async def test_the_pod_reads_what_snapbus_publishes(
    pod: list[str], broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    snapshots = [WorkspaceSnapshot.from_dict(v["snapshot"]) for v in VECTOR_SNAPSHOTS]
    evicted = make_snapshot(intent="evicted by snapbus")
    async with SnapshotPublisher(config) as publisher:
        await publisher.publish_many([*snapshots, evicted])
        updated = snapshots[0].replace(state="merged", intent="updated by snapbus")
        await publisher.publish(updated)
        await publisher.evict(evicted.session_id)
    result = await asyncio.to_thread(_run, [*pod, "read", broker.bootstrap_servers, topic_name])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(snapshots) + 3
    last: dict[str, dict[str, str] | None] = {}
    for line in sorted(lines, key=lambda item: (item["partition"], item["offset"])):
        assert "error" not in line, line
        assert line["partition"] == line["default_partition"] == partition_of(line["key"], 12)
        last[line["key"]] = line["snapshot"]
    expected = {s.key: s.to_dict() for s in snapshots} | {updated.key: updated.to_dict()}
    assert last.pop(evicted.key) is None  # the tombstone
    assert last == expected
