"""Checkpoint files: a view's state and offsets on local disk, for a fast restart.

A view started with a checkpoint loads it, then reads only the records after the saved
offsets, instead of replaying the whole topic. Anything wrong with the file makes the view
fall back to a full replay, never to a wrong state:

- **corrupt** (truncated, bit flips): a CRC-32 of the body is checked before use;
- **foreign** (another topic, another partition count, another format version): refused;
- **stale** (the log was truncated or the topic re-created since): the view detects a log
  that ends before the saved offsets and re-reads the whole log;
- **too old** (the state was last complete longer ago than the topic keeps tombstones,
  `Checkpoint.synced_ms`): sessions deleted meanwhile may have no tombstone left to say so,
  so the view replays the whole log instead (docs/compaction.md).

Format (version 5): the magic ``SNAPBUS-CHECKPOINT\\n``, a 4-byte big-endian version, a 4-byte
header length, a JSON header (topic, partitions, offsets, sessions, body CRC-32, created,
compact prefix, synced), then the body: `marshal` of (sessions, indexes, stamps) as `Checkpoint`
describes them. Sessions keep the form the view held them in: the value as read from the
topic (compact) when it was never decoded, else the nine fields; with the indexes saved too,
loading is one `marshal` call over the mapped file plus turning the decoded ones back into
snapshots. The CRC-32 is verified before the body is read, so a damaged file is never
unmarshalled. It guards against accidents, as Kafka's own record batch CRCs do, not against
someone who can write the file (`marshal` is not meant for untrusted data: keep the file where
only the pod writes). Writes are atomic: a temporary file in the same folder, fsync, then
rename (so a file being read is never changed under its reader).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import marshal
import mmap
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from snapbus.errors import CheckpointError

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "dumps", "read_checkpoint",
           "read_offsets", "write_checkpoint", "write_file"]

MAGIC = b"SNAPBUS-CHECKPOINT\n"
FORMAT_VERSION = 6
"""The checkpoint format this version writes (3: index groups are lists or sets; 4: encoded
sessions are stored compact, `Checkpoint.compact_prefix`; 5: sessions as one dict, not a list
of keys and a list of sessions; 6: small index groups are tuples, which snapbus before 6 could
not change: they refuse the file and replay the topic)."""
_READS = (5, FORMAT_VERSION)
"""The formats this version reads (5 differs from 6 only in its list groups)."""
_PREFIX = struct.Struct(">II")

Session = bytes | tuple[str, ...]
"""One session: its encoded value as `Codec.compact` left it, or its nine snapshot fields in
schema order."""
Index = dict[str, "list[str] | tuple[str, ...] | set[str]"]
"""An index: indexed value -> the keys of the sessions having it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A view's state at one instant: the sessions and the offsets they reflect."""

    topic: str
    """The topic the state was read from."""
    partitions: int
    """How many partitions that topic had."""
    offsets: dict[int, int]
    """The next offset to read in each partition."""
    sessions: dict[str, Session]
    """Every session by key (the canonical session id string)."""
    indexes: tuple[Index, Index, Index]
    """The view's indexes by repo_id, agent_id and state, consistent with `sessions`."""
    stamps: dict[str, int]
    """Sessions' latest record timestamps (ms), where the view tracked them (a TTL)."""
    created_ms: int
    """When the checkpoint was written (ms since the epoch)."""
    compact_prefix: bytes = b""
    """The header the encoded sessions were stored without (`Codec.compact_prefix`): a
    reader must have the same to expand them."""
    synced_ms: int | None = None
    """When the state was last known complete (ms since the epoch): every record it lacks
    reached the log after this instant, in every partition. None: unknown (a file written
    before snapbus recorded it), which a view does not trust."""


def write_checkpoint(path: str | Path, checkpoint: Checkpoint) -> int:
    """Write `checkpoint` to `path` atomically; return the file size in bytes."""
    return write_file(path, dumps(checkpoint))


def dumps(checkpoint: Checkpoint) -> bytes:
    """Encode a checkpoint into the file's bytes. Reads the checkpoint's dicts and sets: call
    it where nothing changes them meanwhile (the view: on its event loop)."""
    # one call: the key strings shared by sessions, indexes and stamps stay shared on load
    body = marshal.dumps((checkpoint.sessions, checkpoint.indexes, checkpoint.stamps))
    header = json.dumps({
        "topic": checkpoint.topic,
        "partitions": checkpoint.partitions,
        "offsets": {str(p): o for p, o in sorted(checkpoint.offsets.items())},
        "sessions": len(checkpoint.sessions),
        "crc32": zlib.crc32(body),
        "created_ms": checkpoint.created_ms,
        "compact_prefix": checkpoint.compact_prefix.hex(),
        "synced_ms": checkpoint.synced_ms,
    }).encode()
    return b"".join((MAGIC, _PREFIX.pack(FORMAT_VERSION, len(header)), header, body))


def write_file(path: str | Path, data: bytes) -> int:
    """Write `data` to `path` atomically (temporary file, fsync, rename); return its size.

    Raises:
        CheckpointError: the file cannot be written (retriable when the cause may pass: a
            full disk or quota, an I/O error); any previous file is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise
    return len(data)


_PASSING = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR}
"""Write errors that may pass by themselves (trying again later can succeed)."""


def _write_error(path: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}",
                           retriable=exc.errno in _PASSING)


def read_offsets(path: str | Path, *, topic: str, partitions: int) -> dict[int, int] | None:
    """The offsets a checkpoint names, from its header alone (a few KB), or None when the
    file is missing, not of this format, or for another topic or partition count.

    For starting to fetch the log's tail while `read_checkpoint` loads and checks the rest
    (which reads the same offsets from the same header).
    """
    path = Path(path)
    try:
        with path.open("rb") as file, _mapped(file) as data:
            header, _ = _header(path, data)
        if header["topic"] != topic or header["partitions"] != partitions:
            return None
        return _offsets(header)
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_checkpoint(path: str | Path, *, topic: str, partitions: int | None = None
                    ) -> Checkpoint:
    """Read and verify a checkpoint written for `topic` with `partitions` partitions (any
    number when None: then check `Checkpoint.partitions`).

    Raises:
        CheckpointError: the file is missing, corrupt, of another format version, or for
            another topic or partition count (the message says which).
    """
    path = Path(path)
    try:
        with path.open("rb") as file, _mapped(file) as data:
            return _parse(path, data, topic, partitions)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None


@contextlib.contextmanager
def _mapped(file: BinaryIO) -> Iterator[memoryview]:
    """The file's bytes, mapped instead of copied: copying a large file into a bytes object
    was a noticeable part of a load (benchmarks/bench_checkpoint.py), and only the pages used
    are read (the header alone for `read_offsets`). Unmapped on exit (its use must not keep a
    slice of it)."""
    try:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # an empty file cannot be mapped
        yield memoryview(b"")
        return
    with mapped, memoryview(mapped) as data:
        yield data


def _header(path: Path, data: memoryview) -> tuple[dict[str, Any], int]:
    """A checkpoint's JSON header, and where its body starts.

    Raises:
        CheckpointError: not a checkpoint, another format version, or a header cut short.
    """
    if len(data) < len(MAGIC) + _PREFIX.size or data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a snapbus checkpoint")
    version, header_len = _PREFIX.unpack_from(data, len(MAGIC))
    if version not in _READS:
        raise CheckpointError(f"{path} has checkpoint format {version}, this snapbus reads "
                              f"{' and '.join(map(str, _READS))}")
    start = len(MAGIC) + _PREFIX.size
    try:
        header = json.loads(bytes(data[start:start + header_len]))
    except ValueError as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (its header is not an object)")
    return header, start + header_len


def _offsets(header: dict[str, Any]) -> dict[int, int]:
    return {int(p): int(o) for p, o in header["offsets"].items()}


def _parse(path: Path, data: memoryview, topic: str, partitions: int | None) -> Checkpoint:
    header, body_start = _header(path, data)
    try:
        with data[body_start:] as body:  # (released here: the file is unmapped next)
            digest_ok = zlib.crc32(body) == header["crc32"]
            same_topic = (header["topic"] == topic
                          and partitions in (None, header["partitions"]))
            state = _unmarshal(body) if digest_ok and same_topic else None
        offsets = _offsets(header)
        sessions = int(header["sessions"])
        compact_prefix = bytes.fromhex(header["compact_prefix"])
        synced = header.get("synced_ms")
        synced_ms = None if synced is None else int(synced)
    except (ValueError, KeyError, TypeError, EOFError, AttributeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from None
    if not digest_ok:
        raise CheckpointError(f"{path} is corrupt (its CRC-32 does not match)")
    if not same_topic:
        raise CheckpointError(
            f"{path} is for topic {header['topic']!r} with {header['partitions']} "
            f"partitions, not {topic!r} with {partitions}")
    if not (isinstance(state, tuple) and len(state) == 3 and isinstance(state[0], dict)
            and len(state[0]) == sessions and isinstance(state[1], tuple)
            and len(state[1]) == 3 and isinstance(state[2], dict)):
        raise CheckpointError(f"{path} is corrupt (unexpected contents)")
    return Checkpoint(topic, int(header["partitions"]), offsets, state[0], state[1], state[2],
                      int(header.get("created_ms", 0)), compact_prefix, synced_ms)


def _unmarshal(body: bytes | memoryview) -> Any:
    """`marshal.loads`, with the cyclic collector left as the host has it: a library does not
    switch it off for the process (docs/gc.md; the sessions are bytes and tuples of strings,
    which the collector stops tracking at its first pass, so its passes here stay cheap)."""
    return marshal.loads(body)


def now_ms() -> int:
    """Milliseconds since the epoch."""
    return int(time.time() * 1000)
