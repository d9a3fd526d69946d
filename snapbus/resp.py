"""A Redis-protocol sidecar: the upstream server's Valkey cache, answered from a `SnapshotView`.

The upstream server caches workspace snapshots in Valkey under ``ws:{id}:meta`` (MessagePack
written by ``rmp_serde::to_vec_named``). Pointing its Valkey URL at this server makes its reads
local and its writes go to the topic, seen by every pod. `serving_redis` runs the server around
a view (and a publisher, for writes) the caller runs; ``snapbus serve --redis-port`` runs it
beside the HTTP sidecar. RESP2, and RESP3 after ``HELLO 3``.

Per key class (docs/redis-sidecar.md has the whole table):

- ``ws:{id}:meta``: ``GET`` answers from the view in the bytes ``rmp_serde`` writes (a map of
  the nine fields in the struct's order, the three ids as 16-byte binaries). ``SET`` decodes
  the MessagePack value (ids as 16-byte binaries or as text), validates it, publishes it and
  answers ``OK`` once the broker acknowledged it and this sidecar's view shows it. ``DEL``
  publishes a tombstone (counting the key if the view held it), ``EXPIRE`` republishes the
  snapshot to renew its age (a non-positive time deletes it), ``TTL``/``PTTL`` answer the
  view's remaining time. A view's TTL is per view, not per key: ``SET``'s ``EX`` is accepted
  and ignored, the session expires after the sidecar's ``--ttl`` (counted from its latest
  record), and never without one (``TTL`` answers -1).
- every other key (``ws:{id}:graph``, ``ws:{id}:files``, ``ws:{id}:file:{path}``, ...): sent to
  an upstream Redis/Valkey when one is configured, its reply passed back byte for byte.
  Without one, writes are refused with an error naming the key class; reads, ``DEL``,
  ``EXPIRE``, ``TTL``, ``EXISTS`` and ``SMEMBERS`` answer that nothing is there.

``MULTI``/``EXEC`` queue then run the commands in order (queue-time errors abort the EXEC, as
Redis does); a snapshot's part of it is one record. Connection commands: ``PING``, ``ECHO``,
``SELECT 0``, ``AUTH``, ``HELLO``, ``CLIENT SETNAME/GETNAME/SETINFO/ID``, ``QUIT``, plus
``COMMAND``, ``INFO`` and ``CONFIG GET`` enough for redis-cli and redis-benchmark.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

from snapbus._token import check_exposure, check_token, same_token, tls_context, token_digest
from snapbus.errors import ConfigError, PublishError, ValidationError, ViewError
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.snapshot import FIELDS, ID_FIELDS, WorkspaceSnapshot
from snapbus.view import SnapshotView

try:
    import hiredis
except ImportError:  # pragma: no cover - depends on the installed extras
    hiredis = None  # type: ignore[assignment]

__all__ = ["decode_snapshot", "encode_snapshot", "serving_redis"]

log = logging.getLogger("snapbus.resp")

MAX_BULK_BYTES = 64 * 1024 * 1024
"""Largest bulk string a client may send: a protocol error (the connection closes) as soon as
its header declares more, with or without hiredis."""

MAX_ARGS = 1024 * 1024
"""Most arguments in one command (a protocol error beyond, as soon as the header says so)."""

MAX_COMMAND_BYTES = 128 * 1024 * 1024
"""Most bytes one command may declare, all its bulk strings together (a protocol error
beyond): what a connection buffers of a command not complete yet."""

UNAUTHENTICATED_MAX_ARGS = 10
"""Most arguments in one command before AUTH, when a token is set (Redis's limit)."""

UNAUTHENTICATED_MAX_BULK = 16 * 1024
"""Largest bulk string before AUTH, when a token is set (Redis's limit)."""

_INLINE_MAX = 64 * 1024
"""Longest inline command line."""

_HEADER_MAX = 32
"""Longest ``*N`` or ``$N`` header line, its CRLF included (a length has at most 10 digits)."""

_MAX_PENDING = 1024
"""Commands a connection may queue behind a slow one before the server stops reading it."""

_MAX_OUTPUT = 64 * 1024 * 1024
"""Most reply bytes a connection may have waiting to be sent: past it, the connection is closed
(as Redis's client-output-buffer-limit). Commands are not read while the transport's buffer is
above its high-water mark, so only one large reply (EXEC, an upstream's value) comes near it."""

_FLUSH_BYTES = 64 * 1024
"""Replies are sent in batches of about this size, so that a full transport stops the rest."""

# ---------------------------------------------------------------------------- MessagePack

_ID_SET = frozenset(ID_FIELDS)
_KEYS = tuple(bytes([0xA0 | len(name)]) + name.encode() for name in FIELDS)


def _str_header(n: int) -> bytes:
    """The smallest MessagePack str header for `n` bytes, as rmp writes it."""
    if n < 32:
        return bytes([0xA0 | n])
    if n < 0x100:
        return b"\xd9" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xda" + n.to_bytes(2, "big")
    return b"\xdb" + n.to_bytes(4, "big")


def encode_snapshot(snapshot: WorkspaceSnapshot) -> bytes:
    """Return the snapshot as ``rmp_serde::to_vec_named`` writes the upstream's struct.

    A map of the nine fields in the struct's order; the ids as 16-byte binaries (the ``uuid``
    crate's form in a non-human-readable format), the text fields as str of the smallest size.
    """
    parts = [b"\x89"]
    for key, name in zip(_KEYS, FIELDS, strict=True):
        parts.append(key)
        if name in _ID_SET:
            parts.append(b"\xc4\x10" + uuid.UUID(getattr(snapshot, "_" + name)).bytes)
        else:
            raw = getattr(snapshot, name).encode()
            parts.append(_str_header(len(raw)))
            parts.append(raw)
    return b"".join(parts)


class _Unpacker:
    """Just enough MessagePack to read a snapshot: maps, arrays, str, bin, small ints."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def size(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def value(self) -> Any:
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F)
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F)
        sized = {0xD9: 1, 0xDA: 2, 0xDB: 4}
        if b in sized:
            return self.text(self.size(sized[b]))
        binary = {0xC4: 1, 0xC5: 2, 0xC6: 4}
        if b in binary:
            return self.take(self.size(binary[b]))
        if b in (0xDE, 0xDF):
            return self.map(self.size(2 if b == 0xDE else 4))
        if b in (0xDC, 0xDD):
            return self.array(self.size(2 if b == 0xDC else 4))
        if b == 0xCC:
            return self.size(1)
        raise ValueError(f"unexpected MessagePack marker 0x{b:02x}")

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise ValueError("a str that is not UTF-8") from None

    def map(self, n: int) -> dict[Any, Any]:
        result = {}
        for _ in range(n):
            key = self.value()
            if not isinstance(key, str):
                raise TypeError("a map key that is not a str")
            result[key] = self.value()
        return result

    def array(self, n: int) -> list[Any]:
        return [self.value() for _ in range(n)]


def _id_value(value: Any, name: str) -> Any:
    """A 16-byte binary (or 16 small ints, serde's sequence form) as a UUID; text as is."""
    if isinstance(value, bytes):
        if len(value) != 16:
            raise ValidationError(f"{name} is {len(value)} bytes; a binary UUID has 16",
                                  field=name)
        return uuid.UUID(bytes=value)
    if isinstance(value, list) and len(value) == 16 and all(
            isinstance(b, int) and 0 <= b <= 255 for b in value):
        return uuid.UUID(bytes=bytes(value))
    return value


def decode_snapshot(data: bytes) -> WorkspaceSnapshot:
    """Read a snapshot from the MessagePack the upstream writes (a map of the nine fields, or
    the nine values as an array, ``rmp_serde::to_vec``'s form); ids as 16-byte binaries or text.

    Raises:
        ValidationError: not such MessagePack, or a field is missing or invalid.
    """
    unpacker = _Unpacker(data)
    try:
        value = unpacker.value()
    except (ValueError, TypeError, IndexError, RecursionError) as exc:
        raise ValidationError(f"not a MessagePack snapshot: {exc}") from None
    if unpacker.pos != len(data):
        raise ValidationError(f"not a MessagePack snapshot: {len(data) - unpacker.pos} bytes "
                              "after the value")
    if isinstance(value, list):
        if len(value) != len(FIELDS):
            raise ValidationError(f"a snapshot array has {len(FIELDS)} values, not "
                                  f"{len(value)}")
        value = dict(zip(FIELDS, value, strict=True))
    if not isinstance(value, dict):
        raise ValidationError("not a MessagePack snapshot: expected a map of the fields")
    for name in ID_FIELDS:
        if name in value:
            value[name] = _id_value(value[name], name)
    return WorkspaceSnapshot.from_dict(value)


# ---------------------------------------------------------------------------- RESP


class _ProtocolError(Exception):
    pass


_BAD = b"\x00protocol-error"
"""The name of the pseudo-command a parser ends with on a protocol error (its argument says
what is wrong): answered in order, then the connection closes."""


class _Parser:
    """Incremental reader of client commands: RESP arrays of bulk strings, or inline lines.

    It keeps its place: a command split across reads is not read again from its start, and a
    bulk string is copied once. Limits (`MAX_ARGS`, `MAX_BULK_BYTES`, `MAX_COMMAND_BYTES`, or
    the smaller ones of `restrict`) are checked on each header, before its bytes arrive.
    """

    def __init__(self) -> None:
        self.buf: bytes | bytearray = b""
        self.pos = 0
        self.failed = False
        self.args: list[bytes] = []
        """The bulk strings read so far of the command in progress."""
        self.left = 0
        """Bulk strings still to read of the command in progress (0: between commands)."""
        self.bulk = -1
        """The length of the bulk string whose header was read (-1: none)."""
        self.size = 0
        """The bytes the command in progress declared so far."""
        self.max_args = MAX_ARGS
        self.max_bulk = MAX_BULK_BYTES
        self.one = False
        """Read one command at a time (before AUTH: the next one is read with AUTH's limits)."""
        self.more = False
        """Whether `commands` stopped after one command with more bytes buffered."""

    def restrict(self, restricted: bool) -> None:
        """Apply the limits of an unauthenticated client (`UNAUTHENTICATED_MAX_ARGS`,
        `UNAUTHENTICATED_MAX_BULK`), one command at a time; or lift them."""
        self.one = restricted
        self.max_args = UNAUTHENTICATED_MAX_ARGS if restricted else MAX_ARGS
        self.max_bulk = UNAUTHENTICATED_MAX_BULK if restricted else MAX_BULK_BYTES

    def feed(self, data: bytes) -> None:
        buf = self.buf
        if not buf:
            self.buf = data
        elif type(buf) is bytes:
            self.buf = bytearray(buf[self.pos:]) + data  # (appends are cheap from now on)
            self.pos = 0
        else:
            grown = cast(bytearray, buf)
            if self.pos:
                del grown[:self.pos]  # (cheap: CPython moves the start of the buffer)
                self.pos = 0
            grown += data

    def commands(self) -> list[list[bytes]]:
        """The complete commands received so far (the rest stays buffered); a protocol error
        ends the list with a `_BAD` command and the parser reads nothing more."""
        found: list[list[bytes]] = []
        self.more = False
        if self.failed:
            return found
        try:
            self._read(found)
        except _ProtocolError as exc:
            self.failed = True
            self.buf = b""
            self.pos = 0
            found.append([_BAD, str(exc).encode()])
        return found

    def _read(self, found: list[list[bytes]]) -> None:
        buf, pos, end = self.buf, self.pos, len(self.buf)
        left, bulk, args = self.left, self.bulk, self.args
        copy = type(buf) is not bytes
        try:
            while pos < end:
                if left == 0:  # a command begins
                    if self.one and found:
                        self.more = True
                        break
                    if buf[pos] != 0x2A:  # '*'
                        nl = buf.find(b"\n", pos)
                        if nl < 0:
                            if end - pos > _INLINE_MAX:
                                raise _ProtocolError("too big inline request")
                            break
                        line = bytes(buf[pos:nl]).rstrip(b"\r").split()
                        if len(line) > self.max_args:
                            raise _ProtocolError(self._too_many())
                        pos = nl + 1
                        if line:
                            found.append(line)
                        continue
                    nl = buf.find(b"\r\n", pos, pos + _HEADER_MAX)
                    if nl < 0:
                        if end - pos >= _HEADER_MAX:
                            raise _ProtocolError("too big mbulk count string")
                        break
                    digits = buf[pos + 1:nl]
                    if not digits.isdigit():
                        raise _ProtocolError("invalid multibulk length")
                    count = int(digits)
                    if count > self.max_args:
                        raise _ProtocolError(self._too_many())
                    self.size = nl + 2 - pos
                    pos = nl + 2
                    if count == 0:
                        continue
                    left, args = count, []
                if bulk < 0:  # a bulk string's header
                    nl = buf.find(b"\r\n", pos, pos + _HEADER_MAX)
                    if nl < 0:
                        if end - pos >= _HEADER_MAX:
                            raise _ProtocolError("too big bulk count string")
                        break
                    if buf[pos] != 0x24:  # '$'
                        raise _ProtocolError(f"expected '$', got '{chr(buf[pos])}'")
                    digits = buf[pos + 1:nl]
                    if not digits.isdigit():
                        raise _ProtocolError("invalid bulk length")
                    bulk = int(digits)
                    if bulk > self.max_bulk:
                        raise _ProtocolError("unauthenticated bulk length" if self.one else
                                             "invalid bulk length")
                    self.size += nl + 4 - pos + bulk
                    if self.size > MAX_COMMAND_BYTES:
                        raise _ProtocolError("too big request")
                    pos = nl + 2
                stop = pos + bulk
                if stop + 2 > end:
                    break  # the bulk string's bytes are still coming
                if buf[stop] != 0x0D or buf[stop + 1] != 0x0A:
                    raise _ProtocolError("expected CRLF after a bulk string")
                args.append(bytes(buf[pos:stop]) if copy else buf[pos:stop])  # type: ignore[arg-type]
                pos = stop + 2
                bulk = -1
                left -= 1
                if left == 0:
                    found.append(args)
                    args = []
        finally:
            self.left, self.bulk, self.args = left, bulk, args
            if pos >= end:
                self.buf, self.pos = b"", 0
            else:
                self.pos = pos

    def _too_many(self) -> str:
        return "unauthenticated multibulk length" if self.one else "invalid multibulk length"


def _wire(command: list[bytes]) -> bytes:
    """A command as a client sends it, in RESP (the only form hiredis accepts as valid)."""
    if len(command) == 2:
        first, second = command
        return b"*2\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(first), first, len(second), second)
    return b"*%d\r\n" % len(command) + b"".join([b"$%d\r\n%b\r\n" % (len(a), a)
                                                    for a in command])


class _HiredisParser:
    """The same reader on hiredis's C parser, `_Parser` the authority on what is valid.

    hiredis builds the commands; it does not check what ends a bulk string, nor any limit.
    A read that ends on a command's end (the usual case) is checked by comparing it with the
    commands read, written back (hiredis accepts lengths only as plain digits, so there is one
    way to write them); a mismatch is read again by `_Parser` for its error. A command split
    across reads is also fed to a `_Parser`, which checks each header (and limit) as it
    arrives. Inline commands, and every command before AUTH (one at a time, with AUTH's
    limits), go through a `_Parser` alone.
    """

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.inline: _Parser | None = None
        self.shadow: _Parser | None = None
        """Checks the bytes since hiredis last ended a read on a command's end."""
        self.chunk = b""
        """The bytes fed since the last read that ended on a command's end."""
        self.partial = False
        """Whether hiredis holds part of a command (its `has_data` only tells of bytes it
        has not looked at yet)."""
        self.restricted = False
        self.more = False

    def restrict(self, restricted: bool) -> None:
        """As `_Parser.restrict`: while restricted, every command goes through a `_Parser`."""
        self.restricted = restricted
        if self.inline is not None:
            self.inline.restrict(restricted)

    def feed(self, data: bytes) -> None:
        if self.inline is None and not self.partial and (self.restricted or data[:1] != b"*"):
            self.inline = _Parser()
            self.inline.restrict(self.restricted)
        if self.inline is not None:
            self.inline.feed(data)
            return
        self.reader.feed(data)
        if not self.partial:
            self.chunk = data
            self.partial = True
        elif self.shadow is not None:
            self.shadow.feed(data)
        else:  # (fed twice before `commands`)
            self.chunk += data

    def commands(self) -> list[list[bytes]]:
        """The complete commands received so far (the rest stays buffered)."""
        inline = self.inline
        if inline is not None:
            found = inline.commands()
            self.more = inline.more
            if not inline.buf and not inline.failed and not self.restricted and not inline.left:
                self.inline = None
            return found
        found = []
        gets = self.reader.gets
        read: list[list[bytes]] = []
        while True:
            try:
                command = gets()
                if command is False:
                    break
                b"".join(command)  # TypeError unless a list (or tuple) of bytes
            except hiredis.ProtocolError as exc:
                return self._checked(found, str(exc))
            except TypeError:
                return self._checked(found, "expected an array of bulk strings")
            read.append(command)
            self.partial = self.reader.has_data()
            if command:
                if len(command) > MAX_ARGS:
                    return self._failed(found, "invalid multibulk length")
                found.append(command)
        if self.shadow is None:
            if not self.partial:  # the usual case: the read ended on a command's end
                chunk, self.chunk = self.chunk, b""
                if (len(read) == 1 and _wire(read[0]) == chunk) or (
                        b"".join(map(_wire, read)) == chunk):
                    return found
                self.chunk = chunk
                return self._checked(found, None)
            self.shadow = _Parser()
            self.shadow.feed(self.chunk)
            self.chunk = b""
        checked = self.shadow.commands()
        if checked and checked[-1][0] is _BAD:
            return self._failed(checked[:-1], checked[-1][1].decode())
        if not self.partial:
            self.shadow = None
        return found

    def _checked(self, found: list[list[bytes]], error: str | None) -> list[list[bytes]]:
        """What `_Parser` reads of the bytes since the last command's end: the valid commands
        then its error. `error`: hiredis's, if `_Parser` sees none; None: no error, `found`
        stands, if `_Parser` sees none either."""
        shadow = self.shadow
        if shadow is None:
            shadow = _Parser()
            shadow.feed(self.chunk)
        self.chunk = b""
        checked = shadow.commands()
        if checked and checked[-1][0] is _BAD:
            return self._failed(checked[:-1], checked[-1][1].decode())
        if error is not None:
            return self._failed(found, error)
        self.shadow = None
        return found

    def _failed(self, found: list[list[bytes]], message: str) -> list[list[bytes]]:
        self.inline = _Parser()  # (which reads nothing more)
        self.inline.failed = True
        self.reader = hiredis.Reader()
        self.shadow = None
        self.partial = False
        found.append([_BAD, message.encode()])
        return found


_PARSER: type[_Parser] | type[_HiredisParser] = _Parser if hiredis is None else _HiredisParser
"""The command reader connections use: hiredis's when installed (``snapbus[resp]``)."""


def _reply_end(buf: bytes, pos: int) -> int:
    """The end of the complete reply starting at `pos` in `buf`, or -1 if incomplete."""
    if pos >= len(buf):
        return -1
    kind = buf[pos]
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return -1
    if kind in b"+-:_,#(":
        return nl + 2
    n = int(buf[pos + 1:nl])
    if kind in b"$!=":
        if n < 0:
            return nl + 2
        stop = nl + 2 + n + 2
        return stop if stop <= len(buf) else -1
    if kind in b"*~>%|":
        p = nl + 2
        for _ in range(max(n, 0) * (2 if kind in b"%|" else 1)):
            p = _reply_end(buf, p)
            if p < 0:
                return -1
        return _reply_end(buf, p) if kind == 0x7C else p  # an attribute precedes a reply
    raise _ProtocolError(f"unexpected reply type {chr(kind)!r} from the upstream")


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _int(n: int) -> bytes:
    return b":%d\r\n" % n


def _err(message: str) -> bytes:
    return ("-" + message.replace("\r", " ").replace("\n", " ") + "\r\n").encode()


def _array(items: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


OK = b"+OK\r\n"
QUEUED = b"+QUEUED\r\n"
PONG = b"+PONG\r\n"
_NIL2, _NIL3 = b"$-1\r\n", b"_\r\n"
_NOAUTH = b"-NOAUTH Authentication required.\r\n"
_WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
_SYNTAX = b"-ERR syntax error\r\n"
_NOT_INT = b"-ERR value is not an integer or out of range\r\n"

# command -> (arity as Redis counts it: the name included; negative: at least), writes?
_ARITY: dict[bytes, int] = {
    b"GET": 2, b"SET": -3, b"DEL": -2, b"UNLINK": -2, b"EXISTS": -2, b"EXPIRE": -3,
    b"PEXPIRE": -3, b"TTL": 2, b"PTTL": 2, b"SMEMBERS": 2, b"SADD": -3, b"SREM": -3,
    b"SCARD": 2, b"SISMEMBER": 3, b"PERSIST": 2, b"SETEX": 4, b"PSETEX": 4, b"TYPE": 2,
    b"PING": -1, b"ECHO": 2, b"SELECT": 2, b"AUTH": -2, b"HELLO": -1, b"CLIENT": -2,
    b"QUIT": -1, b"COMMAND": -1, b"INFO": -1, b"CONFIG": -2, b"MULTI": 1, b"EXEC": 1,
    b"DISCARD": 1, b"WATCH": -2, b"UNWATCH": 1, b"RESET": 1, b"DBSIZE": 1,
}
_NO_AUTH_NEEDED = frozenset({b"AUTH", b"HELLO", b"QUIT", b"RESET"})
# for a key that is not a snapshot and no upstream: the empty answer of each read
_EMPTY_READS: dict[bytes, bytes] = {
    b"DEL": b":0\r\n", b"UNLINK": b":0\r\n", b"EXISTS": b":0\r\n", b"EXPIRE": b":0\r\n",
    b"PEXPIRE": b":0\r\n", b"TTL": b":-2\r\n", b"PTTL": b":-2\r\n", b"SCARD": b":0\r\n",
    b"SISMEMBER": b":0\r\n", b"PERSIST": b":0\r\n", b"SREM": b":0\r\n", b"TYPE": b"+none\r\n",
}


def _key_class(key: bytes) -> str:
    """The upstream's name for the kind of `key`: meta, graph, files, file, or other."""
    if key.startswith(b"ws:"):
        rest = key[3:]
        colon = rest.find(b":")
        if colon > 0:
            tail = rest[colon + 1:]
            if tail in (b"meta", b"graph", b"files"):
                return tail.decode()
            if tail.startswith(b"file:"):
                return "file"
    return "other"


def _session_of(key: bytes) -> str | None:
    """The canonical session id of a ``ws:{id}:meta`` key, or None if it is not one."""
    if not (key.startswith(b"ws:") and key.endswith(b":meta")):
        return None
    try:
        return str(uuid.UUID(key[3:-5].decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return None


class _Upstream:
    """One connection to the upstream Redis, opened on first use (per client connection)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = b""

    async def _open(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        self.reader, self.writer = await asyncio.open_connection(
            parts.hostname or "127.0.0.1", parts.port or 6379)
        self.buf = b""
        if parts.password is not None:
            user = urllib.parse.unquote(parts.username or "default")
            await self._call([b"AUTH", user.encode(),
                              urllib.parse.unquote(parts.password).encode()], check=True)
        db = parts.path.strip("/")
        if db and db != "0":
            await self._call([b"SELECT", db.encode()], check=True)

    async def _call(self, args: list[bytes], *, check: bool = False) -> bytes:
        assert self.reader is not None
        assert self.writer is not None
        self.writer.write(_array([_bulk(a) for a in args]))
        while True:
            end = _reply_end(self.buf, 0)
            if end >= 0:
                reply, self.buf = self.buf[:end], self.buf[end:]
                if check and reply[:1] == b"-":
                    raise ConnectionError(reply[1:].strip().decode(errors="replace"))
                return reply
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("the upstream closed the connection")
            self.buf += chunk

    async def call(self, args: list[bytes]) -> bytes:
        """Send one command and return its raw reply (an error reply if unreachable)."""
        try:
            return await asyncio.wait_for(self._open_and_call(args), self.timeout_s)
        except asyncio.TimeoutError:  # (first: an OSError since 3.11; a reply may still
            self.close()              # come, so this connection to the upstream is done)
            return _err(f"UPSTREAM the upstream Redis {self._where()} did not answer within "
                        f"{self.timeout_s:g} s")
        except (OSError, ConnectionError, ValueError, _ProtocolError) as exc:
            self.close()
            return _err(f"UPSTREAM the upstream Redis {self._where()} failed: {exc}")

    async def _open_and_call(self, args: list[bytes]) -> bytes:
        if self.writer is None:
            await self._open()
        return await self._call(args)

    def _where(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 6379}"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


Reply: TypeAlias = "bytes | Awaitable[bytes]"


class _Server:
    """What every connection shares: the view, the publisher, settings, the GET cache."""

    def __init__(self, view: SnapshotView, publisher: SnapshotPublisher | None, *,
                 token: str | None, upstream: str | None, write_timeout_s: float,
                 upstream_timeout_s: float) -> None:
        self.view = view
        self.publisher = publisher
        self.token = None if token is None else token_digest(check_token(token, "token="))
        """The SHA-256 of the token (compared digest to digest: not even its length leaks)."""
        self.upstream = upstream
        self.write_timeout_s = write_timeout_s
        self.upstream_timeout_s = upstream_timeout_s
        self.connections: set[_Connection] = set()
        # key -> (session id, the snapshot it was encoded from, the GET reply)
        self.gets: dict[bytes, tuple[str, WorkspaceSnapshot, bytes]] = {}
        self.next_id = 0

    def get_reply(self, key: bytes) -> bytes | None:
        """The RESP reply to ``GET key`` of a snapshot key, or None when absent."""
        cached = self.gets.get(key)
        if cached is not None:
            snapshot = self.view.get(cached[0])
            if snapshot is cached[1]:
                return cached[2]
            if snapshot is None:
                del self.gets[key]
                return None
            sid = cached[0]
        else:
            found = _session_of(key)
            if found is None:
                return None
            sid = found
            snapshot = self.view.get(sid)
            if snapshot is None:
                return None
        reply = _bulk(encode_snapshot(snapshot))
        gets = self.gets
        if len(gets) > 2 * len(self.view) + 1024:
            gets.clear()
        gets[key] = (sid, snapshot, reply)
        return reply

    async def written(self, receipt: Receipt) -> bytes | None:
        """None once the view applied the record (read your writes), else an error reply."""
        try:
            await self.view.wait_for(receipt, timeout=self.write_timeout_s)
        except asyncio.TimeoutError:
            return _err(f"TRYAGAIN stored at {receipt.topic}[{receipt.partition}]@"
                        f"{receipt.offset}, but the view did not apply it within "
                        f"{self.write_timeout_s:g} s")
        except ViewError as exc:
            return _err(f"ERR stored at {receipt.topic}[{receipt.partition}]@"
                        f"{receipt.offset}, but {exc}")
        return None


class _Connection(asyncio.Protocol):
    """One client connection: commands answered in order, slow ones (writes) awaited."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.view = server.view
        self.view_get = server.view.get
        self.gets = server.gets
        self.parser = _PARSER()
        self.transport: asyncio.Transport | None = None
        self.queue: collections.deque[list[bytes]] = collections.deque()
        self.busy = False
        self.paused = False
        """Whether reading is paused (too many queued commands, or the client not reading)."""
        self.write_paused = False
        """Whether the transport's buffer is full: replies wait, the client is not read."""
        self.closing = False
        self.authed = server.token is None
        if not self.authed:
            self.parser.restrict(True)
        self.resp3 = False
        self.nil = _NIL2
        self.multi: list[list[bytes]] | None = None
        self.multi_failed = False
        self.name = b""
        self.upstream = (_Upstream(server.upstream, server.upstream_timeout_s)
                         if server.upstream else None)
        server.next_id += 1
        self.id = server.next_id
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        if self.upstream is not None:
            self.upstream.close()
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        commands = parser.commands()
        if (len(commands) == 1 and self.authed and self.multi is None and not self.busy
                and not self.queue):
            args = commands[0]  # the hot path: GET of a snapshot whose reply is cached
            if len(args) == 2 and (args[0] == b"GET" or args[0] == b"get"):
                cached = self.gets.get(args[1])
                if cached is not None and self.view_get(cached[0]) is cached[1]:
                    self.transport.write(cached[2])  # type: ignore[union-attr]
                    return
        if self.busy or self.queue:
            self.queue.extend(commands)
            self._throttle()
            if not self.busy:
                self._drain()
            return
        if len(commands) == 1:  # the common case: one command, answered at once
            reply = self.handle(commands[0])
            if type(reply) is bytes:
                self.transport.write(reply)  # type: ignore[union-attr]
                if self.closing:
                    self._close()
                elif parser.more:  # (before AUTH: one command at a time)
                    self._drain()
                return
            self._await(reply)  # type: ignore[arg-type]
            return
        self.queue.extend(commands)
        self._drain()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            if self.write_paused and transport.get_write_buffer_size() > _MAX_OUTPUT:
                log.warning("closing redis connection %d: more than %d reply bytes unread",
                            self.id, _MAX_OUTPUT)
                self.closing = True
                transport.abort()

    def pause_writing(self) -> None:
        """The transport's buffer passed its high-water mark: stop reading and answering."""
        self.write_paused = True
        self._throttle()

    def resume_writing(self) -> None:
        """The transport's buffer drained: answer what is queued, read again."""
        self.write_paused = False
        if not self.busy:
            self._drain()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _throttle(self) -> None:
        """Pause or resume reading: paused while the client does not read its replies or too
        many commands wait."""
        pause = self.write_paused or len(self.queue) > _MAX_PENDING
        if pause != self.paused and self.transport is not None and not self.closing:
            self.paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _drain(self) -> None:
        """Answer queued commands until one must be awaited."""
        out: list[bytes] = []
        size = 0
        queue = self.queue
        while not self.closing and not self.write_paused:
            if not queue:
                if not self.parser.more:
                    break
                queue.extend(self.parser.commands())  # (before AUTH: one at a time)
                continue
            reply = self.handle(queue.popleft())
            if type(reply) is bytes:
                out.append(reply)
                size += len(reply)
                if size >= _FLUSH_BYTES:  # (may pause writing: the loop then stops)
                    self._write(b"".join(out))
                    out.clear()
                    size = 0
            else:
                if out:
                    self._write(b"".join(out))
                self._await(reply)  # type: ignore[arg-type]
                return
        if out:
            self._write(b"".join(out))
        if self.closing:
            self._close()
        else:
            self._throttle()

    def _await(self, reply: Awaitable[bytes]) -> None:
        self.busy = True
        self.task = asyncio.ensure_future(self._finish(reply))

    async def _finish(self, reply: Awaitable[bytes]) -> None:
        try:
            data = await reply
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a reply, never a dead connection
            log.exception("redis command failed")
            data = _err(f"ERR {type(exc).__name__}: {exc}")
        self._write(data)
        self.busy = False
        self.task = None
        self._drain()

    # ------------------------------------------------------------------ commands

    def handle(self, args: list[bytes]) -> Reply:
        """The reply to one command (bytes, or an awaitable for what must wait)."""
        name = args[0].upper()
        if name == b"GET" and len(args) == 2 and self.authed and self.multi is None:
            key = args[1]  # the hot path
            reply = self.server.get_reply(key)
            if reply is not None:
                return reply
            if _key_class(key) == "meta":
                return self.nil
            return self._other(args, key)
        if args[0] is _BAD:
            self.closing = True
            return _err(f"ERR Protocol error: {args[1].decode()}")
        if not self.authed and name not in _NO_AUTH_NEEDED:
            return _NOAUTH
        if self.multi is not None and name not in (b"EXEC", b"DISCARD", b"MULTI", b"WATCH",
                                                    b"RESET", b"QUIT"):
            error = self._arity_error(name, args)
            if error is not None:
                self.multi_failed = True
                return error
            self.multi.append(args)
            return QUEUED
        error = self._arity_error(name, args)
        if error is not None:
            return error
        method: Callable[[list[bytes]], Reply] = getattr(self, "cmd_" + name.decode().lower())
        return method(args)

    def _arity_error(self, name: bytes, args: list[bytes]) -> bytes | None:
        arity = _ARITY.get(name)
        if arity is None:
            shown = " ".join("'" + a.decode(errors="replace")[:128] + "'" for a in args[1:])
            return _err(f"ERR unknown command '{args[0].decode(errors='replace')[:128]}', "
                        f"with args beginning with: {shown}".rstrip())
        if (arity > 0 and len(args) != arity) or (arity < 0 and len(args) < -arity):
            return _err(f"ERR wrong number of arguments for '{name.decode().lower()}' "
                        "command")
        return None

    def _other(self, args: list[bytes], key: bytes) -> Reply:
        """A command on a key that is not a snapshot: upstream, or the empty answer."""
        if self.upstream is not None:
            return self.upstream.call(args)
        name = args[0].upper()
        if name == b"GET":
            return self.nil
        if name == b"SMEMBERS":
            return b"~0\r\n" if self.resp3 else b"*0\r\n"
        empty = _EMPTY_READS.get(name)
        if empty is not None:
            return empty
        kind = _key_class(key)
        shown = "ws:{id}:" + kind + (":{path}" if kind == "file" else "")
        what = f"{shown} keys" if kind != "other" else "keys other than ws:{id}:meta"
        return _err(f"ERR snapbus keeps only ws:{{id}}:meta snapshots; {what} need an "
                    f"upstream Redis (snapbus serve --redis-upstream redis://...), none is "
                    f"configured")

    def _need_writes(self) -> bytes | None:
        if self.server.publisher is None:
            return (b"-READONLY writes are disabled on this sidecar; start it with "
                    b"`snapbus serve --allow-writes` to SET or DEL snapshots\r\n")
        if self.view.status == "starting":  # (a write could not be waited for yet)
            return _err(f"LOADING the view of {self.view.config.topic} is starting; "
                        "try again in a moment")
        return None

    # --- snapshots

    def cmd_get(self, args: list[bytes]) -> Reply:
        key = args[1]
        reply = self.server.get_reply(key)
        if reply is not None:
            return reply
        return self.nil if _key_class(key) == "meta" else self._other(args, key)

    def cmd_set(self, args: list[bytes]) -> Reply:
        key = args[1]
        if _key_class(key) != "meta":
            return self._other(args, key)
        nx = xx = get = False
        i = 3
        while i < len(args):
            option = args[i].upper()
            if option in (b"EX", b"PX", b"EXAT", b"PXAT") and i + 1 < len(args):
                try:
                    if int(args[i + 1]) <= 0:
                        return _err("ERR invalid expire time in 'set' command")
                except ValueError:
                    return _NOT_INT
                i += 2
                continue
            if option == b"NX":
                nx = True
            elif option == b"XX":
                xx = True
            elif option == b"GET":
                get = True
            elif option != b"KEEPTTL":
                return _SYNTAX
            i += 1
        if nx and xx:
            return _SYNTAX
        return self._set(key, args[2], nx=nx, xx=xx, get=get)

    def cmd_setex(self, args: list[bytes]) -> Reply:
        return self.cmd_set([b"SET", args[1], args[3], b"EX", args[2]])

    def cmd_psetex(self, args: list[bytes]) -> Reply:
        return self.cmd_set([b"SET", args[1], args[3], b"PX", args[2]])

    def _set(self, key: bytes, value: bytes, *, nx: bool, xx: bool, get: bool) -> Reply:
        sid = _session_of(key)
        if sid is None:
            return _err(f"ERR {key.decode(errors='replace')[:200]} is not ws:{{id}}:meta "
                        "with a UUID id")
        refused = self._need_writes()
        if refused is not None:
            return refused
        try:
            snapshot = decode_snapshot(value)
        except ValidationError as exc:
            return _err(f"ERR invalid snapshot for {key.decode()}: {exc}")
        if snapshot.key != sid:
            return _err(f"ERR invalid snapshot for {key.decode()}: its session_id is "
                        f"{snapshot.key}, not the key's")
        old = self.server.get_reply(key)
        if (nx and old is not None) or (xx and old is None):
            return (old or self.nil) if get else self.nil
        return self._publish(snapshot, (old or self.nil) if get else OK)

    async def _publish(self, snapshot: WorkspaceSnapshot, answer: bytes) -> bytes:
        assert self.server.publisher is not None
        try:
            receipt = await self.server.publisher.publish(snapshot)
        except ValidationError as exc:
            return _err(f"ERR invalid snapshot: {exc}")
        except PublishError as exc:
            return _err(f"TRYAGAIN {exc}")
        return await self.server.written(receipt) or answer

    async def _evict(self, sids: list[str]) -> bytes | None:
        """Publish tombstones for `sids`; None once the view applied them, else an error."""
        publisher = self.server.publisher
        assert publisher is not None
        for sid in sids:
            try:
                receipt = await publisher.evict(sid)
            except PublishError as exc:
                return _err(f"TRYAGAIN {exc}")
            error = await self.server.written(receipt)
            if error is not None:
                return error
        return None

    def cmd_del(self, args: list[bytes]) -> Reply:
        keys = args[1:]
        metas = [k for k in keys if _key_class(k) == "meta"]
        others = [k for k in keys if _key_class(k) != "meta"]
        sids = [sid for sid in map(_session_of, metas) if sid is not None]
        if sids:
            refused = self._need_writes()
            if refused is not None:
                return refused
        if not sids and not others:
            return b":0\r\n"
        return self._delete(args[0], sids, others)

    cmd_unlink = cmd_del

    async def _delete(self, name: bytes, sids: list[str], others: list[bytes]) -> bytes:
        count = sum(1 for sid in sids if sid in self.view)
        if sids:
            error = await self._evict(sids)
            if error is not None:
                return error
        if others:
            reply = await self._ask_other([name, *others], others[0])
            if reply[:1] != b":":
                return reply
            count += int(reply[1:])
        return _int(count)

    async def _ask_other(self, args: list[bytes], key: bytes) -> bytes:
        reply = self._other(args, key)
        return reply if isinstance(reply, bytes) else await reply

    def cmd_exists(self, args: list[bytes]) -> Reply:
        count = 0
        others = []
        for key in args[1:]:
            if _key_class(key) == "meta":
                count += self.server.get_reply(key) is not None
            else:
                others.append(key)
        if not others:
            return _int(count)
        return self._exists(count, others)

    async def _exists(self, count: int, others: list[bytes]) -> bytes:
        reply = await self._ask_other([b"EXISTS", *others], others[0])
        if reply[:1] != b":":
            return reply
        return _int(count + int(reply[1:]))

    def cmd_expire(self, args: list[bytes]) -> Reply:
        key = args[1]
        if _key_class(key) != "meta":
            return self._other(args, key)
        try:
            seconds = int(args[2])
        except ValueError:
            return _NOT_INT
        for option in args[3:]:
            if option.upper() not in (b"NX", b"XX", b"GT", b"LT"):
                return _err(f"ERR Unsupported option {option.decode(errors='replace')}")
        sid = _session_of(key)
        snapshot = None if sid is None else self.view.get(sid)
        if snapshot is None or sid is None:
            return b":0\r\n"
        refused = self._need_writes()
        if refused is not None:
            return refused
        if seconds <= 0:  # as Redis: a time in the past deletes the key
            return self._expire_now(sid)
        return self._touch(snapshot)

    cmd_pexpire = cmd_expire

    async def _expire_now(self, sid: str) -> bytes:
        return await self._evict([sid]) or b":1\r\n"

    async def _touch(self, snapshot: WorkspaceSnapshot) -> bytes:
        assert self.server.publisher is not None
        try:
            receipt = await self.server.publisher.touch(snapshot)
        except PublishError as exc:
            return _err(f"TRYAGAIN {exc}")
        return await self.server.written(receipt) or b":1\r\n"

    def cmd_persist(self, args: list[bytes]) -> Reply:
        key = args[1]
        if _key_class(key) != "meta":
            return self._other(args, key)
        return b":0\r\n"  # a snapshot's expiry is the view's, not the key's

    def cmd_ttl(self, args: list[bytes]) -> Reply:
        key = args[1]
        if _key_class(key) != "meta":
            return self._other(args, key)
        sid = _session_of(key)
        if sid is None or self.view.get(sid) is None:
            return b":-2\r\n"
        left_s = self.view.ttl_left_s(sid)
        if left_s is None:
            return b":-1\r\n"
        if args[0].upper() == b"PTTL":
            return _int(int(left_s * 1000 + 1e-6))
        return _int(math.floor(left_s + 0.5))

    cmd_pttl = cmd_ttl

    def cmd_type(self, args: list[bytes]) -> Reply:
        key = args[1]
        if _key_class(key) != "meta":
            return self._other(args, key)
        return b"+string\r\n" if self.server.get_reply(key) is not None else b"+none\r\n"

    def _not_a_set(self, args: list[bytes]) -> Reply:
        key = args[1]
        if _key_class(key) != "meta":
            return self._other(args, key)
        if self.server.get_reply(key) is None:
            name = args[0].upper()
            if name == b"SMEMBERS":
                return b"~0\r\n" if self.resp3 else b"*0\r\n"
            if name == b"SADD":
                return _err("ERR ws:{id}:meta holds snapshots, not sets")
            return b":0\r\n"
        return (b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")

    cmd_smembers = cmd_sadd = cmd_srem = cmd_scard = cmd_sismember = _not_a_set

    def cmd_dbsize(self, args: list[bytes]) -> Reply:
        return _int(len(self.view))

    # --- transactions

    def cmd_multi(self, args: list[bytes]) -> Reply:
        if self.multi is not None:
            return _err("ERR MULTI calls can not be nested")
        self.multi = []
        self.multi_failed = False
        return OK

    def cmd_discard(self, args: list[bytes]) -> Reply:
        if self.multi is None:
            return _err("ERR DISCARD without MULTI")
        self.multi = None
        return OK

    def cmd_exec(self, args: list[bytes]) -> Reply:
        if self.multi is None:
            return _err("ERR EXEC without MULTI")
        queued, self.multi = self.multi, None
        if self.multi_failed:
            return _err("EXECABORT Transaction discarded because of previous errors.")
        replies = [self.handle(command) for command in queued[:1]]
        if all(type(r) is bytes for r in replies) and len(queued) <= 1:
            return _array(replies)  # type: ignore[arg-type]
        return self._exec(replies, queued[1:])

    async def _exec(self, first: list[Reply], rest: list[list[bytes]]) -> bytes:
        replies: list[bytes] = []
        for reply in first:
            replies.append(reply if isinstance(reply, bytes) else await reply)
        for command in rest:
            reply = self.handle(command)
            replies.append(reply if isinstance(reply, bytes) else await reply)
        return _array(replies)

    def cmd_watch(self, args: list[bytes]) -> Reply:
        if self.multi is not None:
            return _err("ERR WATCH inside MULTI is not allowed")
        return OK  # nothing is watched: an EXEC is never aborted by another client

    def cmd_unwatch(self, args: list[bytes]) -> Reply:
        return OK

    # --- connection

    def cmd_ping(self, args: list[bytes]) -> Reply:
        if len(args) > 2:
            return _err("ERR wrong number of arguments for 'ping' command")
        return _bulk(args[1]) if len(args) == 2 else PONG

    def cmd_echo(self, args: list[bytes]) -> Reply:
        return _bulk(args[1])

    def cmd_quit(self, args: list[bytes]) -> Reply:
        self.closing = True
        return OK

    def cmd_select(self, args: list[bytes]) -> Reply:
        if args[1] == b"0":
            return OK
        return _err("ERR DB index is out of range (the snapbus sidecar has database 0 only)")

    def _auth(self, user: bytes, password: bytes) -> bool:
        """Whether `password` is the token; a wrong one leaves the connection as it was
        (Redis 6+: a failed AUTH does not change the current user)."""
        token = self.server.token
        if token is None:
            return True
        if same_token(password, token):
            if not self.authed:
                self.authed = True
                self.parser.restrict(False)
            return True
        return False

    def cmd_auth(self, args: list[bytes]) -> Reply:
        if len(args) > 3:
            return _SYNTAX
        if self.server.token is None:
            return _err("ERR AUTH <password> called without any password configured for "
                        "the default user. Are you sure your configuration is correct?")
        user = args[1] if len(args) == 3 else b"default"
        return OK if self._auth(user, args[-1]) else _WRONGPASS

    def cmd_hello(self, args: list[bytes]) -> Reply:
        version = 2 if not self.resp3 else 3
        i = 1
        if len(args) > 1:
            try:
                version = int(args[1])
            except ValueError:
                return _err("ERR Protocol version is not an integer or out of range")
            if version not in (2, 3):
                return _err("NOPROTO unsupported protocol version")
            i = 2
        name = None
        while i < len(args):
            option = args[i].upper()
            if option == b"AUTH" and i + 2 < len(args):
                if not self._auth(args[i + 1], args[i + 2]):
                    return _WRONGPASS
                i += 3
            elif option == b"SETNAME" and i + 1 < len(args):
                name = args[i + 1]
                i += 2
            else:
                return _err(f"ERR Syntax error in HELLO option '{option.decode(errors='replace')}'")
        if not self.authed:
            return _NOAUTH
        if name is not None:
            self.name = name
        self.resp3 = version == 3
        self.nil = _NIL3 if self.resp3 else _NIL2
        fields = [(b"server", _bulk(b"snapbus")), (b"version", _bulk(b"7.0.0")),
                  (b"proto", _int(version)), (b"id", _int(self.id)),
                  (b"mode", _bulk(b"standalone")), (b"role", _bulk(b"master")),
                  (b"modules", b"*0\r\n")]
        body = b"".join(_bulk(k) + v for k, v in fields)
        return (b"%%%d\r\n" % len(fields) if self.resp3 else b"*%d\r\n" % (2 * len(fields))) + body

    def cmd_reset(self, args: list[bytes]) -> Reply:
        self.multi = None
        self.resp3 = False
        self.nil = _NIL2
        self.name = b""
        if self.server.token is not None and self.authed:
            self.authed = False
            self.parser.restrict(True)
        return b"+RESET\r\n"

    def cmd_client(self, args: list[bytes]) -> Reply:
        sub = args[1].upper()
        if sub == b"SETNAME" and len(args) == 3:
            if b" " in args[2]:
                return _err("ERR Client names cannot contain spaces, newlines or special "
                            "characters.")
            self.name = args[2]
            return OK
        if sub == b"GETNAME" and len(args) == 2:
            return _bulk(self.name) if self.name else self.nil
        if sub == b"SETINFO" and len(args) == 4:
            return OK
        if sub == b"ID" and len(args) == 2:
            return _int(self.id)
        return _err(f"ERR unknown subcommand or wrong number of arguments for "
                    f"'{sub.decode(errors='replace')}'. Try CLIENT HELP.")

    def cmd_command(self, args: list[bytes]) -> Reply:
        if len(args) > 1 and args[1].upper() == b"COUNT":
            return _int(len(_ARITY))
        return b"%0\r\n" if self.resp3 and len(args) > 1 else b"*0\r\n"

    def cmd_info(self, args: list[bytes]) -> Reply:
        text = (f"# Server\r\nredis_version:7.0.0\r\nsnapbus_topic:{self.view.config.topic}"
                f"\r\n# Keyspace\r\ndb0:keys={len(self.view)},expires=0\r\n")
        return _bulk(text.encode())

    def cmd_config(self, args: list[bytes]) -> Reply:
        if args[1].upper() == b"GET":
            return b"%0\r\n" if self.resp3 else b"*0\r\n"
        return _err("ERR the snapbus sidecar has no configuration to change")


@contextlib.asynccontextmanager
async def serving_redis(
    view: SnapshotView,
    publisher: SnapshotPublisher | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    upstream: str | None = None,
    write_timeout_s: float = 10.0,
    tls_certfile: str | os.PathLike[str] | None = None,
    tls_keyfile: str | os.PathLike[str] | None = None,
    upstream_timeout_s: float = 5.0,
) -> AsyncIterator[str]:
    """Serve `view` over the Redis protocol in the running event loop; yield its URL.

    The caller starts and stops the view and publisher. Port 0 picks a free port. On exit the
    server stops listening and closes its connections.

    Args:
        publisher: enables ``SET``, ``DEL`` and ``EXPIRE`` of snapshots (it should write the
            view's topic); without one they answer a ``READONLY`` error.
        token: when given, clients must ``AUTH`` with it first (``redis://:TOKEN@host:port``);
            the same rules as the HTTP sidecar's (at least 16 visible ASCII characters).
        upstream: a ``redis://[user:password@]host:port[/db]`` URL that keys other than
            ``ws:{id}:meta`` are sent to; without one they are refused or answered as absent.
        write_timeout_s: how long a write waits for the view to show it (``TRYAGAIN`` after).
        upstream_timeout_s: how long a command waits for the upstream (connecting included);
            then it answers an ``UPSTREAM`` error and that connection to the upstream closes.
        tls_certfile, tls_keyfile: speak TLS only (a ``rediss://`` URL), with this PEM
            certificate chain (and key, unless `tls_keyfile`).

    Raises:
        ConfigError: the address cannot be listened on, `upstream` is not a redis:// URL, the
            TLS files cannot be loaded, the token is weak (empty, short, not visible ASCII),
            or a publisher without a token would listen beyond loopback
            (`snapbus.serve.check_exposure`; reads there without a token log a warning).
    """
    if upstream is not None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "redis" or not parts.hostname:
            raise ConfigError(f"the upstream must be a redis://host:port URL, not {upstream!r}")
    server = _Server(view, publisher, token=token, upstream=upstream,
                     write_timeout_s=write_timeout_s, upstream_timeout_s=upstream_timeout_s)
    context = tls_context(tls_certfile, tls_keyfile)
    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(lambda: _Connection(server), host, port,
                                            reuse_address=True, backlog=1024, ssl=context)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        warnings = {check_exposure(sock.getsockname()[0], has_token=token is not None,
                                   allow_writes=publisher is not None)
                    for sock in listener.sockets}
    except ConfigError:
        listener.close()
        raise
    for warning in warnings - {None}:
        log.warning("%s", warning)
    bound_host, bound_port = listener.sockets[0].getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    try:
        yield f"{'redis' if context is None else 'rediss'}://{url_host}:{bound_port}"
    finally:
        listener.close()
        for connection in list(server.connections):
            connection._close()
        await listener.wait_closed()

