"""Key and value encoding on the wire.

- **Key**: the canonical lowercase UUID string of ``session_id``, UTF-8 (36 bytes).
- **UUIDs inside a value**: the same canonical form (what Java's ``UUID.toString`` and Rust's
  ``uuid`` write), and no other: the writer writes it, the reader calls any other spelling a
  bad value (``invalid_field``) rather than rewriting it, as other readers would show it raw.
- **Value**: Avro single-object encoding (Avro specification): the marker ``C3 01``, the 8-byte
  little-endian CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form, then the
  Avro binary body. The reader finds the writer schema by fingerprint and resolves it to its
  own schema, so old and new pods read each other's records.
- **Tombstone**: a null value deletes the session. An empty value is not a tombstone: it is an
  undecodable record.

Every malformed input raises `snapbus.DecodeError` with a ``reason``, and nothing else.
"""

from __future__ import annotations

import io
import re
import uuid
from typing import Any

import fastavro

from snapbus.errors import DecodeError, ValidationError
from snapbus.schema import Schema, SchemaStore
from snapbus.snapshot import FIELDS, WorkspaceSnapshot, _check_wire_ids

__all__ = [
    "HEADER_SIZE",
    "MARKER",
    "Codec",
    "decode",
    "decode_key",
    "decode_key_text",
    "default_codec",
    "encode",
    "encode_key",
]

MARKER = b"\xc3\x01"
"""The two bytes that open every single-object encoded value."""

HEADER_SIZE = 10
"""Marker plus fingerprint."""


def encode_key(session_id: uuid.UUID | str) -> bytes:
    """Return the Kafka key for a session: its canonical lowercase UUID string, UTF-8.

    Raises:
        ValidationError: `session_id` is not a UUID.
    """
    from snapbus.snapshot import parse_uuid

    return str(parse_uuid(session_id, field="session_id")).encode("ascii")


_CANONICAL_KEY = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def decode_key_text(key: bytes | bytearray | memoryview | None) -> str:
    """Return the canonical session id string a Kafka key holds (see `decode_key`).

    Raises:
        DecodeError: (reason ``bad_key``) the key is missing or not a canonical UUID.
    """
    if isinstance(key, bytes) and _CANONICAL_KEY.fullmatch(key):
        return key.decode("ascii")
    if key is None:
        raise DecodeError("record has no key; expected a session UUID", reason="bad_key")
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise DecodeError(
            f"record key must be bytes, not {type(key).__name__}", reason="bad_key"
        )
    raw = bytes(key)
    if _CANONICAL_KEY.fullmatch(raw):
        return raw.decode("ascii")
    try:
        expected = str(uuid.UUID(raw.decode("ascii")))
    except ValueError:  # UnicodeDecodeError is a ValueError
        raise DecodeError(f"record key is not a UUID: {raw[:64]!r}", reason="bad_key") from None
    raise DecodeError(
        f"record key is not a canonical lowercase UUID: {raw[:64]!r} (expected {expected!r})",
        reason="bad_key",
    )


def decode_key(key: bytes | bytearray | memoryview | None) -> uuid.UUID:
    """Return the session id a Kafka key names.

    Only the canonical form `encode_key` writes is accepted: compaction keeps one record per
    distinct key *bytes*, so a session written under two spellings of its id (``{...}``,
    uppercase) would keep a stale record that a tombstone under the canonical key never removes.

    Raises:
        DecodeError: (reason ``bad_key``) the key is missing, not a UUID, or not in canonical
            lowercase hyphenated form.
    """
    return uuid.UUID(decode_key_text(key))


class Codec:
    """Encodes snapshots with one writer schema and decodes any schema in its store.

    Most code uses the module functions `encode` and `decode`, which use the shipped schemas;
    build a `Codec` to write with another schema version or to learn extra schemas.
    """

    __slots__ = ("_header", "_peek_plan", "_reader", "_strings_only", "store", "writer")

    def __init__(self, store: SchemaStore | None = None, *, writer: Schema | None = None) -> None:
        self.store = store if store is not None else SchemaStore.from_dir()
        self.writer = writer if writer is not None else self.store.current
        self.store.add(self.writer)
        self._reader = self.store.current
        self._header = MARKER + self.writer.fingerprint
        self._peek_plan = _peek_plan(self._reader)
        writer_fields = self.writer.parsed["fields"]
        self._strings_only = [f["name"] for f in writer_fields] == list(FIELDS) and all(
            _type_name(f) == "string" for f in writer_fields)

    def encode_record(self, record: dict[str, Any]) -> bytes:
        """Encode a plain record (ids as strings) with the writer schema, framed.

        Raises:
            ValidationError: the record does not match the writer schema, or an id is not a
                UUID in canonical form (lowercase, hyphenated: the only form on the wire; a
                `WorkspaceSnapshot` holds its ids in that form whatever it was given).
        """
        _check_wire_ids(record)
        return self._write(record)

    def _write(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        try:
            fastavro.schemaless_writer(buf, self.writer.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            name = self.writer.name
            raise ValidationError(f"record does not match schema {name}: {exc}") from exc
        return buf.getvalue()

    def encode(self, snapshot: WorkspaceSnapshot) -> bytes:
        """Encode a snapshot as a single-object Avro value."""
        return self._write(snapshot.to_dict())  # (its ids are canonical)

    def size_bound(self, snapshot: WorkspaceSnapshot) -> int | None:
        """An upper bound of `encode(snapshot)`'s size without encoding it (exact for ASCII
        text), or None when the writer schema is not the snapshot's fields as plain strings."""
        if not self._strings_only:
            return None
        size = HEADER_SIZE
        for text in snapshot._values():
            # an Avro string: its length as a zig-zag varint (at most 5 bytes here), then
            # UTF-8, at most 4 bytes per code point (1 when ASCII: `isascii` is O(1))
            size += 5 + (len(text) if text.isascii() else 4 * len(text))
        return size

    def decode_record(self, data: bytes | bytearray | memoryview | None) -> dict[str, Any]:
        """Decode a value into a plain record resolved to this codec's reader schema.

        Raises:
            DecodeError: the value is not a valid single-object record of a known schema.
        """
        if data is None:
            raise DecodeError("value is null (a tombstone), not a snapshot", reason="empty")
        size = len(data)
        if size == 0:
            raise DecodeError("value is empty; a tombstone is a null value", reason="empty")
        if size < 2 or data[0:2] != MARKER:
            raise DecodeError(
                f"value does not start with the Avro single-object marker C3 01: "
                f"{bytes(data[:2]).hex(' ')}",
                reason="bad_marker",
            )
        if size < HEADER_SIZE:
            raise DecodeError(
                f"value is {size} bytes, shorter than the 10-byte single-object header",
                reason="truncated",
            )
        fingerprint = bytes(data[2:HEADER_SIZE])
        writer = self.store.get(fingerprint)
        if writer is None:
            raise DecodeError(
                f"unknown writer schema fingerprint {fingerprint.hex()}: the record was written "
                "with a schema this process does not have (deploy the newer schemas/)",
                reason="unknown_fingerprint",
            )
        buf = io.BytesIO(data)
        buf.seek(HEADER_SIZE)
        reader = None if writer is self._reader else self._reader.parsed
        try:
            record = fastavro.schemaless_reader(buf, writer.parsed, reader)
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise DecodeError(
                f"corrupt Avro body ({type(exc).__name__}: {exc})", reason="corrupt_body"
            ) from None
        if buf.tell() != size:
            raise DecodeError(
                f"corrupt Avro body: {size - buf.tell()} trailing bytes", reason="corrupt_body"
            )
        if not isinstance(record, dict):
            raise DecodeError("Avro body is not a record", reason="corrupt_body")
        return record

    def peek(self, data: bytes | None) -> tuple[str, str, str, str] | None:
        """Read (session_id, repo_id, agent_id, state) from a value without decoding the rest.

        A view's initial replay indexes sessions with this and decodes the rest on first use.
        Works for values written with the current schema, when it starts with session_id and
        repo_id and has only strings up to agent_id and state, and when the ids are canonical;
        returns None for anything else, a tombstone (None) included (then `decode` says what
        is wrong, if anything). The values are what `decode` would give, though `decode` may
        still find the rest of the value bad.
        """
        plan = self._peek_plan
        if (data is None or plan is None or not data.startswith(plan[0])
                or data[HEADER_SIZE:_IDS_END].translate(_ID_CLASSES) != _ID_PAIR_SHAPE):
            return None  # (both ids checked canonical by two C calls, not a regex: 3x faster)
        pos = _IDS_END
        agent = state = ""
        try:
            for slot in plan[1]:
                size = data[pos]  # an Avro long, zig-zag varint: almost always one byte
                pos += 1
                if size >= 0x80:
                    size &= 0x7F
                    shift = 7
                    while True:
                        byte = data[pos]
                        pos += 1
                        size |= (byte & 0x7F) << shift
                        if byte < 0x80:
                            break
                        shift += 7
                        if shift > 63:
                            return None
                if size & 1:
                    return None  # a negative length
                end = pos + (size >> 1)
                if slot == _AGENT:
                    agent = data[pos:end].decode()
                elif slot == _STATE:
                    state = data[pos:end].decode()
                pos = end
        except (IndexError, UnicodeDecodeError):
            return None
        if pos > len(data):
            return None  # (a field cut short: its slice above was too)
        return (data[HEADER_SIZE + 1:_SID_END].decode(), data[_SID_END + 1:_IDS_END].decode(),
                agent, state)

    @property
    def compact_prefix(self) -> bytes:
        """The header `compact` drops from values (`peek` only accepts values that start with
        it); empty when `peek` accepts nothing."""
        return b"" if self._peek_plan is None else self._peek_plan[0]

    def compact(self, data: bytes) -> bytes:
        """A value `peek` accepted, without what its reader knows anyway: the header (see
        `compact_prefix`) and the session id (the record's key). 47 bytes less, for a view
        that keeps values of sessions not read yet; `expand` restores it."""
        return data[_SID_END:]

    def expand(self, key: str, compact: bytes) -> bytes:
        """The value `compact` was made of, given the session's key."""
        assert self._peek_plan is not None
        return b"".join((self.compact_prefix, b"\x48", key.encode(), compact))

    def decode(self, data: bytes | bytearray | memoryview | None, *,
               key: str | None = None) -> WorkspaceSnapshot:
        """Decode a value into a `WorkspaceSnapshot`.

        Args:
            data: the value.
            key: the record's key text, when known: the value must be for that session, and
                the snapshot then holds that string object (one per session in a view).

        Raises:
            DecodeError: the value is not a valid snapshot record (``reason`` says why), or
                not for session `key`.
        """
        record = self.decode_record(data)
        if key is not None and record.get("session_id") == key:
            record["session_id"] = key  # the same text: share the key's string
        try:
            snapshot = WorkspaceSnapshot._from_record(record)
        except KeyError as exc:
            raise DecodeError(f"record lacks field {exc}", reason="invalid_field") from None
        except ValidationError as exc:
            raise DecodeError(f"invalid field: {exc}", reason="invalid_field") from None
        if key is not None and snapshot.key != key:
            raise DecodeError(f"value is for session {snapshot.key} but the record key is {key}",
                              reason="invalid_field")
        return snapshot


_PEEKED = ("session_id", "repo_id", "agent_id", "state")


def _type_name(field: dict[str, Any]) -> Any:
    """A parsed field's type name (``"string"`` also for a string with a logical type)."""
    kind = field["type"]
    return kind.get("type") if isinstance(kind, dict) else kind


_AGENT, _STATE = _PEEKED.index("agent_id"), _PEEKED.index("state")
_ID_CLASSES = bytes(ord("0") if chr(c) in "0123456789abcdef" else c if c in b"-\x48" else 0xFF
                    for c in range(256))
"""A `bytes.translate` table: lowercase hex digits to ``0``; ``-`` and 0x48 kept; else 0xFF."""
_ID_PAIR_SHAPE = (b"\x48" + b"00000000-0000-0000-0000-000000000000") * 2
"""session_id and repo_id as Avro strings in canonical form (length 36: zig-zag 0x48), as
`_ID_CLASSES` maps them."""
_SID_END = HEADER_SIZE + len(_ID_PAIR_SHAPE) // 2
_IDS_END = HEADER_SIZE + len(_ID_PAIR_SHAPE)


def _peek_plan(schema: Schema) -> tuple[bytes, tuple[int, ...]] | None:
    """For `Codec.peek`: the schema's header and, for each field after the two ids up to the
    last one peeked, its slot in the result (-1: skipped); None when the schema does not start
    with session_id and repo_id, or one of those fields is not a plain string (or a peeked
    field is missing)."""
    fields = schema.parsed["fields"]
    if [f["name"] for f in fields[:2]] != ["session_id", "repo_id"]:
        return None
    slots: list[int] = [0, 1]
    for field in fields[2:]:
        if _type_name(field) != "string":
            return None
        name = field["name"]
        slots.append(_PEEKED.index(name) if name in _PEEKED else -1)
        if sum(slot >= 0 for slot in slots) == len(_PEEKED):
            return MARKER + schema.fingerprint, tuple(slots[2:])
    return None


_default: Codec | None = None


def default_codec() -> Codec:
    """Return the process-wide codec over the shipped schemas."""
    global _default
    if _default is None:
        _default = Codec()
    return _default


def encode(snapshot: WorkspaceSnapshot) -> bytes:
    """Encode a snapshot as a single-object Avro value with the current schema."""
    return default_codec().encode(snapshot)


def decode(data: bytes | bytearray | memoryview | None) -> WorkspaceSnapshot:
    """Decode a single-object Avro value written with any shipped schema.

    Raises:
        DecodeError: the value is not a valid snapshot record (``reason`` says why).
    """
    return default_codec().decode(data)
