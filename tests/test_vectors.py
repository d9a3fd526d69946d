"""The wire contract's shared test vectors (interop/vectors): snapbus byte for byte.

The Java and Rust pods check their own libraries against the same files
(tests/test_interop.py); this checks snapbus's codec and partitioner, and that the committed
files are what interop/make_vectors.py writes today.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from snapbus import WorkspaceSnapshot
from snapbus.codec import decode, default_codec, encode, encode_key
from snapbus.publisher import _MurmurPartitioner

ROOT = Path(__file__).resolve().parent.parent
VECTOR_DIR = ROOT / "interop" / "vectors"


def _load_script() -> Any:
    path = ROOT / "interop" / "make_vectors.py"
    spec = importlib.util.spec_from_file_location("make_vectors", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_vectors = _load_script()


def _files() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(VECTOR_DIR.glob("*.json"))}


FILES = _files()
SNAPSHOTS = [v for doc in FILES.values() for v in doc["snapshots"]]
KEYS = [k for doc in FILES.values() for k in doc["keys"]]


def first_difference(actual: bytes, expected: bytes) -> str:
    """Where two byte strings first differ, for a failure message."""
    for i, (a, b) in enumerate(zip(actual, expected, strict=False)):
        if a != b:
            return f"byte {i}: {a:02x} != expected {b:02x}"
    return f"length {len(actual)} != expected {len(expected)}"


def test_the_vectors_cover_the_edge_cases() -> None:
    names = {v["name"] for v in SNAPSHOTS}
    assert {"every_field", "empty_text", "non_ascii", "long_intent", "max_value"} <= names
    assert set(FILES) == {"snapshots.json", "max-value.json"}
    assert len(KEYS) >= 64


def test_the_committed_vectors_are_what_the_script_writes() -> None:
    fresh = make_vectors.build()
    assert set(fresh) == set(FILES)
    for name, text in fresh.items():
        assert (VECTOR_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run python interop/make_vectors.py")


def test_fingerprint_is_the_current_schema() -> None:
    fingerprint = default_codec().writer.fingerprint
    for doc in FILES.values():
        assert doc["fingerprint"]["wire_hex"] == fingerprint.hex() == "c2c55d77c6120393"
        assert doc["fingerprint"]["java_parsing_fingerprint64"] == "0x930312c6775dc5c2"


@pytest.mark.parametrize("vector", SNAPSHOTS, ids=[v["name"] for v in SNAPSHOTS])
def test_snapbus_writes_and_reads_each_vector_byte_for_byte(vector: dict[str, Any]) -> None:
    snapshot = WorkspaceSnapshot.from_dict(vector["snapshot"])
    key, value = encode_key(snapshot.session_id), encode(snapshot)
    expected_key = bytes.fromhex(vector["key_hex"])
    expected_value = bytes.fromhex(vector["value_hex"])
    assert key == expected_key, f"key {first_difference(key, expected_key)}"
    assert value == expected_value, f"value {first_difference(value, expected_value)}"
    assert len(value) == vector["value_size"]
    assert decode(expected_value).to_dict() == vector["snapshot"]


def test_the_largest_vector_is_the_publishers_limit() -> None:
    from snapbus.publisher import DEFAULT_MAX_VALUE_BYTES

    assert max(v["value_size"] for v in SNAPSHOTS) == DEFAULT_MAX_VALUE_BYTES


@pytest.mark.parametrize("count", [12, 50])
def test_snapbus_partitions_each_key_as_the_vectors_say(count: int) -> None:
    partitioner = _MurmurPartitioner()
    placed = [(bytes.fromhex(v["key_hex"]), v) for v in SNAPSHOTS]
    placed += [(k["key"].encode(), k) for k in KEYS]
    spread = set()
    for key, vector in placed:
        assert aiokafka_murmur2(key) == vector["murmur2"] & 0xFFFFFFFF, key  # (unsigned there)
        got = partitioner(key, list(range(count)), list(range(count)))
        assert got == vector["partition"][str(count)], f"key {key.decode()}: partition {got}"
        spread.add(got)
    assert len(spread) > count // 2  # the keys reach many partitions, not a few


def test_the_scripts_murmur2_is_javas() -> None:
    # values from Kafka's own UtilsTest.testMurmur2
    known = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829,
             b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
             bytes([ord("a"), ord("b"), ord("c")]): 479470107}
    for data, expected in known.items():
        assert make_vectors.murmur2(data) == expected, data
    rng = random.Random(7)
    for size in range(80):
        data = rng.randbytes(size)
        assert make_vectors.murmur2(data) & 0xFFFFFFFF == aiokafka_murmur2(data), data.hex()
