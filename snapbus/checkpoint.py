"""Checkpoint files: a view's state and offsets on local disk, for a fast restart.

A view started with a checkpoint loads it, then reads only the records after the saved
offsets, instead of replaying the whole topic. Anything wrong with the file makes the view
fall back to a full replay, never to a wrong state:

- **corrupt** (truncated, bit flips): a SHA-256 digest over the body is checked before use;
- **foreign** (another topic, another partition count, another format version): refused;
- **stale** (the log was truncated or the topic re-created since): the view detects a log
  that ends before the saved offsets and re-reads the whole log.

Format (version 1): the magic ``SNAPBUS-CHECKPOINT\\n``, a 4-byte big-endian version, a 4-byte
header length, a JSON header (topic, partitions, offsets, sessions, body digest, created), then
the body: `marshal` of one tuple per session holding its nine fields (ids as canonical
strings) and its latest record timestamp. The digest is verified before the body is read, so
only the file this library wrote is ever unmarshalled. Writes are atomic: a temporary file in
the same folder, fsync, then rename.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import marshal
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from snapbus.errors import SnapbusError

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "read_checkpoint",
           "write_checkpoint"]

MAGIC = b"SNAPBUS-CHECKPOINT\n"
FORMAT_VERSION = 1
"""The checkpoint format this version writes and reads."""
_PREFIX = struct.Struct(">II")

Row = tuple[str, str, str, str, str, str, str, str, str, int]
"""One session: the nine snapshot fields in schema order, then the record timestamp (ms)."""


class CheckpointError(SnapbusError):
    """A checkpoint file is missing, corrupt, foreign or of another format version."""


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A view's state at one instant: the sessions and the offsets they reflect."""

    topic: str
    """The topic the state was read from."""
    partitions: int
    """How many partitions that topic had."""
    offsets: dict[int, int]
    """The next offset to read in each partition."""
    rows: list[Row]
    """Every session's fields and latest record timestamp."""
    created_ms: int
    """When the checkpoint was written (ms since the epoch)."""


def write_checkpoint(path: str | Path, checkpoint: Checkpoint) -> int:
    """Write `checkpoint` to `path` atomically; return the file size in bytes."""
    path = Path(path)
    body = marshal.dumps(checkpoint.rows)
    header = json.dumps({
        "topic": checkpoint.topic,
        "partitions": checkpoint.partitions,
        "offsets": {str(p): o for p, o in sorted(checkpoint.offsets.items())},
        "sessions": len(checkpoint.rows),
        "sha256": hashlib.sha256(body).hexdigest(),
        "created_ms": checkpoint.created_ms,
    }).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(MAGIC)
            out.write(_PREFIX.pack(FORMAT_VERSION, len(header)))
            out.write(header)
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(MAGIC) + _PREFIX.size + len(header) + len(body)


def read_checkpoint(path: str | Path, *, topic: str, partitions: int) -> Checkpoint:
    """Read and verify a checkpoint written for `topic` with `partitions` partitions.

    Raises:
        CheckpointError: the file is missing, corrupt, of another format version, or for
            another topic or partition count (the message says which).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _PREFIX.size:
        raise CheckpointError(f"{path} is not a snapbus checkpoint")
    version, header_len = _PREFIX.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}, this snapbus reads "
                              f"{FORMAT_VERSION}")
    start = len(MAGIC) + _PREFIX.size
    try:
        header: dict[str, Any] = json.loads(data[start:start + header_len])
        body = data[start + header_len:]
        digest_ok = hashlib.sha256(body).hexdigest() == header["sha256"]
        same_topic = header["topic"] == topic and header["partitions"] == partitions
        rows = _unmarshal(body) if digest_ok and same_topic else None
        offsets = {int(p): int(o) for p, o in header["offsets"].items()}
        sessions = int(header["sessions"])
    except (ValueError, KeyError, TypeError, EOFError, AttributeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from None
    if not digest_ok:
        raise CheckpointError(f"{path} is corrupt (its digest does not match)")
    if not same_topic:
        raise CheckpointError(
            f"{path} is for topic {header['topic']!r} with {header['partitions']} "
            f"partitions, not {topic!r} with {partitions}")
    if not isinstance(rows, list) or len(rows) != sessions:
        raise CheckpointError(f"{path} is corrupt (session count differs)")
    return Checkpoint(topic, partitions, offsets, rows, int(header.get("created_ms", 0)))


def _unmarshal(body: bytes) -> Any:
    """`marshal.loads` with the cyclic GC paused: millions of fresh tuples would otherwise
    trigger full collections that find nothing to free (a start-up cost, once)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return marshal.loads(body)
    finally:
        if enabled:
            gc.enable()


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return int(time.time() * 1000)
