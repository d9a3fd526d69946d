"""Write the wire contract's shared test vectors (interop/vectors/*.json) from snapbus's codec.

Each vector is a snapshot with the exact bytes every implementation must produce for it: the
Kafka key, the Avro single-object value, the schema fingerprint, and the partition Kafka's
default partitioner (Java's murmur2 of the key bytes) gives it in a topic of 12 and of 50
partitions. `tests/test_vectors.py` checks snapbus against them and that the committed files
are what this script writes; the Java and Rust pods in interop/ check their own libraries
against them.

    python interop/make_vectors.py           # rewrite the files
    python interop/make_vectors.py --check   # exit 1 when a committed file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"
PARTITION_COUNTS = (12, 50)
MAX_VALUE_BYTES = 1_000_000
"""The largest value a snapbus publisher accepts by default (`max_value_bytes`)."""


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Java's ``Utils.murmur2``, seed 0x9747b28c), as a signed 32-bit int.

    Written here on its own, from the Java source, so that the vectors do not depend on the
    partitioner snapbus uses (the tests compare the two).
    """
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length % 4
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition(key: bytes, partitions: int) -> int:
    """Kafka's default partition for a keyed record: ``toPositive(murmur2(key)) % n``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _ids(rng: random.Random) -> tuple[str, str, str]:
    return tuple(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(3))  # type: ignore[return-value]


def _snapshots() -> list[tuple[str, str, dict[str, str]]]:
    """(name, what it covers, fields) of every vector, small ones first, the largest last."""
    rng = random.Random(20)
    commit = "9fceb02d0ae598e95dc970b74767f19372d61af8"

    def snap(intent: str = "fix the flaky test", **fields: str) -> dict[str, str]:
        sid, rid, cid = _ids(rng)
        base = {"session_id": sid, "repo_id": rid, "agent_id": "user_2abc", "agent_name": "agent-3",
                "changeset_id": cid, "intent": intent, "base_commit": commit, "state": "active",
                "mode": "ephemeral"}
        base.update(fields)
        return base

    vectors = [
        ("every_field", "a typical snapshot: every field set to a different, ordinary value",
         snap(agent_id="user_42", agent_name="agent-7", intent="refactor the parser",
              state="submitted", mode="persistent")),
        ("empty_text", "every text field empty (ids are never empty)",
         snap(intent="", agent_id="", agent_name="", base_commit="", state="", mode="")),
        ("non_ascii", "text of 2-, 3- and 4-byte UTF-8, combining marks, right-to-left, U+0000",
         snap(intent="réparer le café ☕ — 修复测试 🚀 e\u0301 שלום \u0000 end",
              agent_id="usér_ß", agent_name="агент-3", state="активен", mode="éphémère")),
        ("length_63", "text of 63 bytes: the longest whose Avro length is one byte",
         snap(intent="x" * 63)),
        ("length_64", "text of 64 bytes: the shortest whose Avro length takes two bytes",
         snap(intent="y" * 64)),
        ("long_intent", "an intent of 20,000 characters (a three-byte Avro length)",
         snap(intent=("Make the importer stream large files instead of loading them whole; "
                      * 300)[:20_000])),
        ("nil_and_max_ids", "the nil UUID and the all-f UUID as ids",
         snap(session_id="00000000-0000-0000-0000-000000000000",
              repo_id="ffffffff-ffff-ffff-ffff-ffffffffffff",
              changeset_id="00000000-0000-0000-0000-000000000000")),
        ("open_labels", "state and mode values no pod knows yet (they are open sets)",
         snap(state="quarantined-by-policy", mode="hybrid")),
    ]
    # a value of exactly MAX_VALUE_BYTES: a multi-byte intent, padded with ASCII to the byte
    big = snap(intent="")
    overhead = len(_encode(big))
    text = ("snapbus ✓ 大 " * 100_000)
    budget = MAX_VALUE_BYTES - overhead - 2  # the intent's length grows from 1 to 3 bytes
    encoded = text.encode()[:budget].decode("utf-8", "ignore")
    encoded += "." * (budget - len(encoded.encode()))
    big["intent"] = encoded
    vectors.append(("max_value", f"a value of exactly {MAX_VALUE_BYTES:,} bytes, the default "
                    "max_value_bytes (multi-byte text: bytes, not characters, count)", big))
    return vectors


def _encode(fields: dict[str, str]) -> bytes:
    from snapbus import WorkspaceSnapshot
    from snapbus.codec import encode

    return encode(WorkspaceSnapshot.from_dict(fields))


def _placement(key: bytes) -> dict[str, Any]:
    return {"murmur2": murmur2(key),
            "partition": {str(n): partition(key, n) for n in PARTITION_COUNTS}}


def build() -> dict[str, str]:
    """Return the vector files' names and text."""
    from snapbus.codec import default_codec, encode_key

    fp = default_codec().writer.fingerprint
    common = {
        "schema": "schemas/workspace_snapshot.avsc",
        "fingerprint": {
            "wire_hex": fp.hex(),
            "java_parsing_fingerprint64": f"0x{int.from_bytes(fp, 'little'):016x}",
        },
        "partition_counts": list(PARTITION_COUNTS),
    }
    small: list[dict[str, Any]] = []
    large: list[dict[str, Any]] = []
    for name, about, fields in _snapshots():
        key = encode_key(fields["session_id"])
        value = _encode(fields)
        assert value[2:10] == fp
        entry = {"name": name, "about": about, "snapshot": fields, "key_hex": key.hex(),
                 "value_size": len(value), "value_hex": value.hex(), **_placement(key)}
        (large if name == "max_value" else small).append(entry)
    assert large[0]["value_size"] == MAX_VALUE_BYTES, large[0]["value_size"]
    rng = random.Random(50)
    keys = []
    for _ in range(64):
        key = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
        keys.append({"key": key.decode(), **_placement(key)})
    about = ("snapbus wire-contract test vectors, written by interop/make_vectors.py: for each "
             "snapshot, the Kafka key and the Avro single-object value (hex) every "
             "implementation must produce, and the partition Kafka's default partitioner "
             "gives the key (toPositive(murmur2(key)) % n); 'keys' checks the partitioner "
             "alone. Ids are canonical lowercase hyphenated UUID text.")
    files = {
        "snapshots.json": {"about": about, **common, "snapshots": small, "keys": keys},
        "max-value.json": {"about": about + " This file holds the largest value alone.",
                           **common, "snapshots": large, "keys": []},
    }
    return {name: json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
            for name, doc in files.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a file is stale")
    args = parser.parse_args()
    stale = []
    for name, text in build().items():
        path = VECTORS / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            VECTORS.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)} (run python interop/make_vectors.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
