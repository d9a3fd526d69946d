"""A TCP proxy between Kafka clients and the broker that injects network faults on demand.

``FaultProxy(target_host, target_port)`` listens on a free loopback port and forwards every
connection to the target. Faults:

- `cut()`: close every current connection at once (both sides, no goodbye).
- `refuse()` / `accept()`: close new connections as soon as they are accepted (a down broker),
  then take them again; `outage(seconds)` does refuse + cut, holds, then accept.
- `latency(ms)`: deliver every chunk of data that much later (order kept, pipelining kept).
- `stall()` / `unstall()`: stop forwarding bytes in both directions while the sockets stay
  open (a black hole, like a network partition); bytes read meanwhile are held and delivered
  after `unstall()`, as TCP would once the partition heals.
- `corrupt(marker, times)`: flip one bit of `marker` in the next `times` broker responses
  that hold it (a record's bytes in a fetch response: its batch then fails its CRC check).
  Needs ``FaultProxy(..., frames=True)``: responses are then forwarded as whole Kafka frames.

``FaultProxy(..., ssl=context)`` terminates TLS on the listening side (the upstream connection
stays plain TCP), which is how the suite tests TLS clients against a broker that cannot serve
TLS itself. ``capture=True`` keeps the first bytes each client sent, to check what is on the wire.

Every client must go through the proxy, including the connections a Kafka client opens to the
broker addresses it learns from metadata: start the broker advertising the proxy's port
(`proxied_broker` does that). Counters of injected faults are in `FaultProxy.counters`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl as ssl_module
import uuid
from collections.abc import AsyncIterator

from snapbus.broker import EmbeddedBroker
from snapbus.publisher import Receipt
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import SnapshotView
from tests.helpers import eventually, make_snapshot, new_broker

__all__ = [
    "FaultCounters",
    "FaultProxy",
    "WriteModel",
    "eventually",
    "free_port",
    "make_snapshot",
    "proxied_broker",
]

_HOST = "127.0.0.1"
_CHUNK = 64 * 1024
_CAPTURE_BYTES = 64 * 1024


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class FaultCounters:
    """What the proxy saw and did."""

    connections: int = 0
    """Connections forwarded to the target."""
    cuts: int = 0
    """Calls of `FaultProxy.cut`."""
    refusals: int = 0
    """Calls of `FaultProxy.refuse`."""
    outages: int = 0
    """Calls of `FaultProxy.outage`."""
    stalls: int = 0
    """Calls of `FaultProxy.stall`."""
    latency_changes: int = 0
    """Calls of `FaultProxy.latency` with a non-zero delay."""
    connections_cut: int = 0
    """Connections closed by cuts and outages."""
    refused: int = 0
    """Connections closed on accept while refusing (during refusals and outages)."""
    upstream_failures: int = 0
    """Connections closed because the target could not be reached."""
    corrupted: int = 0
    """Broker responses altered by `FaultProxy.corrupt`."""

    @property
    def faults(self) -> int:
        """Faults injected: calls of cut, refuse, outage, stall and latency (non-zero)."""
        return self.cuts + self.refusals + self.outages + self.stalls + self.latency_changes


class _Connection:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.captured = bytearray()
        self.closed = False

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class FaultProxy:
    """A loopback TCP proxy to ``target_host:target_port`` with injectable faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        port: int = 0,
        ssl: ssl_module.SSLContext | None = None,
        capture: bool = False,
        frames: bool = False,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._port = port
        self._ssl = ssl
        self._capture = capture
        self._frames = frames
        self._corrupt_marker = b""
        self._corrupt_left = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._refusing = False
        self._latency_s = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.counters = FaultCounters()
        self.captured: list[bytearray] = []
        """With ``capture=True``: the first bytes each client sent, one entry per connection."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The port the proxy listens on (known before `start` if one was given)."""
        if not self._port:
            raise RuntimeError("the proxy has no port yet: start() it or pass port=")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` for clients."""
        return f"{_HOST}:{self.port}"

    @property
    def active_connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._connections)

    async def start(self) -> None:
        """Listen (on `port`, or a free port)."""
        self._server = await asyncio.start_server(
            self._handle, _HOST, self._port, ssl=self._ssl, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        server, self._server = self._server, None
        self._flowing.set()
        if server is not None:
            server.close()
        for conn in list(self._connections):
            conn.abort()
        tasks = [t for conn in self._connections for t in conn.tasks]
        self._connections.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ faults

    def cut(self) -> int:
        """Close every current connection; returns how many were closed."""
        self.counters.cuts += 1
        return self._cut()

    def _cut(self) -> int:
        connections = list(self._connections)
        for conn in connections:
            conn.abort()
        self._connections.clear()
        self.counters.connections_cut += len(connections)
        return len(connections)

    def refuse(self) -> None:
        """Close new connections as soon as they are accepted, until `accept`."""
        self.counters.refusals += 1
        self._refusing = True

    def accept(self) -> None:
        """Forward new connections again."""
        self._refusing = False

    @property
    def refusing(self) -> bool:
        """Whether new connections are refused."""
        return self._refusing

    async def outage(self, seconds: float) -> None:
        """Be down for `seconds`: cut every connection and refuse new ones, then accept."""
        self.counters.outages += 1
        self._refusing = True
        self._cut()
        try:
            await asyncio.sleep(seconds)  # holding the fault is what an outage is
        finally:
            self.accept()

    def latency(self, ms: float) -> None:
        """Deliver forwarded data `ms` milliseconds after it arrived (0: no delay)."""
        self._latency_s = max(0.0, ms) / 1000
        if ms > 0:
            self.counters.latency_changes += 1

    def stall(self) -> None:
        """Stop forwarding bytes (both directions); sockets stay open."""
        if self._flowing.is_set():
            self.counters.stalls += 1
        self._flowing.clear()

    def unstall(self) -> None:
        """Forward again, starting with the bytes held during the stall."""
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        """Whether forwarding is stalled."""
        return not self._flowing.is_set()

    def corrupt(self, marker: bytes, times: int = 1) -> None:
        """Flip the lowest bit of `marker`'s first byte in the next `times` broker responses
        holding it (0: stop)."""
        if not self._frames:
            raise RuntimeError("corrupt() needs FaultProxy(..., frames=True)")
        self._corrupt_marker, self._corrupt_left = marker, max(0, times)

    def _whole_frames(self, buffer: bytearray) -> bytes:
        """Take the complete Kafka frames (4-byte size, then the body) from `buffer`, altered
        as `corrupt` asks."""
        out = bytearray()
        while len(buffer) >= 4:
            end = 4 + int.from_bytes(buffer[:4], "big")
            if len(buffer) < end:
                break
            frame = buffer[:end]
            del buffer[:end]
            at = frame.find(self._corrupt_marker) if self._corrupt_left else -1
            if at >= 0:
                frame[at] ^= 0x01
                self._corrupt_left -= 1
                self.counters.corrupted += 1
            out += frame
        return bytes(out)

    def heal(self) -> None:
        """End every fault: accept, unstall, no latency."""
        self.accept()
        self.unstall()
        self._latency_s = 0.0

    # ------------------------------------------------------------------ forwarding

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        if self._refusing or self._server is None:
            self.counters.refused += 1
            client_writer.transport.abort()
            return
        conn = _Connection(client_writer)
        self._connections.add(conn)
        try:
            upstream_reader, conn.upstream = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            self.counters.upstream_failures += 1
            self._drop(conn)
            return
        if conn.closed:  # cut while connecting
            conn.upstream.transport.abort()
            return
        self.counters.connections += 1
        if self._capture:
            self.captured.append(conn.captured)
        up: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        down: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        conn.tasks = [
            asyncio.create_task(self._read(conn, client_reader, up, capture=self._capture)),
            asyncio.create_task(self._write(conn, up, conn.upstream)),
            asyncio.create_task(self._read(conn, upstream_reader, down, capture=False,
                                           frames=self._frames)),
            asyncio.create_task(self._write(conn, down, client_writer)),
        ]
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.abort()
        self._connections.discard(conn)

    async def _read(self, conn: _Connection, reader: asyncio.StreamReader,
                    queue: asyncio.Queue[tuple[float, bytes] | None], *, capture: bool,
                    frames: bool = False) -> None:
        loop = asyncio.get_running_loop()
        pending = bytearray()
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if frames:
                    pending += data
                    data = self._whole_frames(pending)
                    if not data:
                        continue
                if capture and len(conn.captured) < _CAPTURE_BYTES:
                    conn.captured += data[: _CAPTURE_BYTES - len(conn.captured)]
                queue.put_nowait((loop.time() + self._latency_s, data))
        except (OSError, ssl_module.SSLError):
            pass
        finally:
            queue.put_nowait(None)

    async def _write(self, conn: _Connection,
                     queue: asyncio.Queue[tuple[float, bytes] | None],
                     writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await queue.get()
                await self._flowing.wait()
                if item is None:
                    break
                due, data = item
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # the injected latency itself
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, ssl_module.SSLError):
            pass
        finally:
            self._drop(conn)  # one side ended: end the connection


@contextlib.asynccontextmanager
async def proxied_broker(
    *, durable: bool = False, ssl: ssl_module.SSLContext | None = None, capture: bool = False,
    frames: bool = False,
) -> AsyncIterator[tuple[FaultProxy, EmbeddedBroker]]:
    """Yield a started proxy and an embedded broker that advertises the proxy's address.

    Clients bootstrap from ``proxy.address``; every connection they open goes through it.
    """
    broker_port = free_port()
    proxy = FaultProxy(_HOST, broker_port, ssl=ssl, capture=capture, frames=frames)
    await proxy.start()
    broker = new_broker(port=broker_port, advertised_port=proxy.port, durable=durable)
    try:
        await broker.start()
        yield proxy, broker
    finally:
        await proxy.stop()
        await broker.stop()


# ---------------------------------------------------------------------------- shared helpers


Value = WorkspaceSnapshot | None
"""A session's value in the log: a snapshot, or None after a tombstone."""


class WriteModel:
    """What the topic must hold, from what publishers were told.

    For each session the acknowledged record with the highest offset wins (all records of a
    session share a partition, so offsets order them). A publish that raised may or may not be
    stored: its value is also acceptable for that session, but only there.
    """

    def __init__(self) -> None:
        self.acked: dict[uuid.UUID, tuple[int, Value]] = {}
        self.maybe: dict[uuid.UUID, list[Value]] = {}
        self.acked_writes = 0
        self.failed_writes = 0

    def ack(self, receipt: Receipt, value: Value) -> None:
        """Record an acknowledged write (`value` None for a tombstone)."""
        self.acked_writes += 1
        current = self.acked.get(receipt.session_id)
        if current is None or receipt.offset > current[0]:
            self.acked[receipt.session_id] = (receipt.offset, value)

    def fail(self, session_id: uuid.UUID, value: Value) -> None:
        """Record a write that raised: it may or may not be stored."""
        self.failed_writes += 1
        self.maybe.setdefault(session_id, []).append(value)

    def expected(self) -> dict[uuid.UUID, WorkspaceSnapshot]:
        """The acked winners that are snapshots (what a view holds when no failed write landed)."""
        return {sid: value for sid, (_, value) in self.acked.items() if value is not None}

    def mismatches(self, view: SnapshotView, *, strict: bool = False) -> list[str]:
        """Sessions where the view disagrees with the model; empty when it agrees.

        With `strict`, only the acked winner is accepted (for writers that re-published every
        failed write until it was acknowledged, so a failed copy holds the same value).
        """
        problems = []
        sessions = set(self.acked) | set(self.maybe)
        for sid in sessions:
            actual = view.get(sid)
            allowed: list[Value] = [self.acked[sid][1]] if sid in self.acked else [None]
            if not strict:
                allowed += self.maybe.get(sid, [])
            if actual not in allowed:
                problems.append(f"{sid}: view has {actual!r}, acceptable: {allowed!r}")
        problems += [f"{sid}: in the view but never written" for sid in view
                     if sid not in sessions]
        return problems
