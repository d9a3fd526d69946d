"""The Redis-protocol sidecar against the real broker, through redis-py and redis-cli.

The server runs in the test's event loop (`snapbus.resp.serving_redis`) around a view and a
publisher the test runs. The upstream's calls are made as its Rust code makes them: ``SET
ws:{id}:meta <msgpack> EX <ttl>``, ``GET``, and the evict and touch pipelines (``SMEMBERS`` of
the files set, then ``MULTI`` / ``DEL`` or ``EXPIRE`` of every key / ``EXEC``). The expected
bytes are built with the msgpack package, as ``rmp_serde::to_vec_named`` lays them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from redis.exceptions import AuthenticationError, BusyLoadingError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

import snapbus.resp
from snapbus._kafka_broker import _make_tls_files
from snapbus.cli import cli
from snapbus.config import KafkaConfig
from snapbus.errors import ConfigError
from snapbus.publisher import SnapshotPublisher
from snapbus.resp import (
    _PARSER,
    _HiredisParser,
    _Parser,
    decode_snapshot,
    encode_snapshot,
    serving_redis,
)
from snapbus.snapshot import WorkspaceSnapshot
from snapbus.view import SnapshotView
from tests.helpers import eventually, make_snapshot, serve_command

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

WAIT_S = 30.0
TTL_S = 86_400  # the upstream's default cache TTL


def rmp_named(snapshot: WorkspaceSnapshot, *, text_ids: bool = False) -> bytes:
    """What ``rmp_serde::to_vec_named`` writes for the upstream's struct: the fields in the
    struct's order, ids as 16-byte binaries (the uuid crate in a non-human-readable format)."""
    fields: dict[str, Any] = {}
    for name in ("session_id", "repo_id", "agent_id", "agent_name", "changeset_id", "intent",
                 "base_commit", "state", "mode"):
        value = getattr(snapshot, name)
        if isinstance(value, uuid.UUID):
            value = str(value) if text_ids else value.bytes
        fields[name] = value
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def meta(snapshot: WorkspaceSnapshot | uuid.UUID) -> str:
    sid = snapshot.session_id if isinstance(snapshot, WorkspaceSnapshot) else snapshot
    return f"ws:{sid}:meta"


@dataclasses.dataclass
class Sidecar:
    config: KafkaConfig
    url: str
    client: aioredis.Redis
    view: SnapshotView
    publisher: SnapshotPublisher


@contextlib.asynccontextmanager
async def redis_sidecar(config: KafkaConfig, *, writes: bool = True, ttl_s: float | None = None,
                        **options: Any) -> AsyncIterator[Sidecar]:
    async with (
        SnapshotPublisher(config) as publisher,
        SnapshotView(config, fetch_max_wait_ms=20, ttl_s=ttl_s) as view,
        serving_redis(view, publisher if writes else None, **options) as url,
    ):
        client = aioredis.Redis.from_url(url, socket_timeout=WAIT_S)
        try:
            yield Sidecar(config, url, client, view, publisher)
        finally:
            await client.aclose()


@pytest.fixture
async def sidecar(broker: BrokerAddress, topic_name: str) -> AsyncIterator[Sidecar]:
    """A writable Redis-protocol sidecar over a fresh topic, with a redis-py client."""
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with redis_sidecar(config) as sidecar:
        yield sidecar


# ---------------------------------------------------------------------------- MessagePack


def test_encoding_is_rmp_serde_named() -> None:
    for intent in ("", "x" * 31, "x" * 32, "é" * 200, "y" * 70_000):
        snapshot = make_snapshot(intent=intent)
        assert encode_snapshot(snapshot) == rmp_named(snapshot)
        assert decode_snapshot(rmp_named(snapshot)) == snapshot


def test_decoding_accepts_text_ids_and_the_array_form() -> None:
    snapshot = make_snapshot()
    assert decode_snapshot(rmp_named(snapshot, text_ids=True)) == snapshot
    values = [v.bytes if isinstance(v, uuid.UUID) else v
              for v in (getattr(snapshot, n) for n in (
                  "session_id", "repo_id", "agent_id", "agent_name", "changeset_id", "intent",
                  "base_commit", "state", "mode"))]
    assert decode_snapshot(msgpack.packb(values, use_bin_type=True)) == snapshot


@pytest.mark.parametrize(("value", "message"), [
    (b"\xc1", "not a MessagePack snapshot"),
    (b"\x89", "truncated"),
    (msgpack.packb({"session_id": b"\x01" * 15}, use_bin_type=True), "15 bytes"),
    (msgpack.packb({"intent": "x"}, use_bin_type=True), "missing field"),
    (msgpack.packb([1, 2], use_bin_type=True), "array has 9 values"),
])
def test_decoding_rejects_what_is_not_a_snapshot(value: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_snapshot(value)


# ---------------------------------------------------------------------------- parser


PARSERS = [_Parser, *([_HiredisParser] if _HiredisParser is _PARSER else [])]


@pytest.fixture(params=PARSERS, ids=lambda p: p.__name__)
def parser_class(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Each command reader in turn, the one connections use while the test runs."""
    monkeypatch.setattr(snapbus.resp, "_PARSER", request.param)
    return request.param


def test_parser_reads_commands_split_anywhere(parser_class: Any) -> None:
    # (hiredis reads arrays only: an inline command must begin a read, as real clients do)
    wire = (b"PING\r\n*3\r\n$3\r\nSET\r\n$5\r\nk\r\ney\r\n$0\r\n\r\n"
            b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n")
    expected = [[b"PING"], [b"SET", b"k\r\ney", b""], [b"GET", b"key"]]
    for cut in range(len(wire) + 1):
        parser = parser_class()
        parser.feed(wire[:cut])
        found = parser.commands()
        parser.feed(wire[cut:])
        found += parser.commands()
        assert found == expected, cut
    parser = parser_class()
    for byte in wire:
        parser.feed(bytes([byte]))
        found = parser.commands()
        if found:
            expected.pop(0)
    assert not expected


@pytest.mark.parametrize(("wire", "error"), [
    (b"*1\r\n$600000000\r\n", b"invalid bulk length"),  # refused at the header
    (b"*3000000\r\n", b"invalid multibulk length"),
    (b"*1\r\n$+5\r\nhello\r\n", b"invalid bulk length"),
    (b"*1\r\n$1_0\r\n0123456789\r\n", b"invalid bulk length"),
    (b"*+1\r\n$1\r\nx\r\n", b"invalid multibulk length"),
    (b"*1\r\n$1\r\nxYZ", b"expected CRLF after a bulk string"),
    (b"*2\r\n$1\r\nx\r\n$1\r\nyZZ*1\r\n$4\r\nPING\r\n", b"expected CRLF"),
    (b"*1\r\n$" + b"1" * 40, b"too big bulk count string"),
    (b"*3\r\n" + (b"$40\r\n" + b"x" * 40 + b"\r\n") * 2 + b"$40\r\n", b"too big request"),
])
def test_parser_limits_and_framing(parser_class: Any, wire: bytes, error: bytes,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapbus.resp, "MAX_COMMAND_BYTES", 100)
    for chunks in ([wire], [wire[:5], wire[5:]], [bytes([b]) for b in wire[:200]]):
        parser = parser_class()
        parser.feed(b"*1\r\n$4\r\nPING\r\n")
        found = parser.commands()
        for chunk in chunks:
            parser.feed(chunk)
            found += parser.commands()
            if found[-1][0] is snapbus.resp._BAD:
                break
        assert found[0] == [b"PING"]
        assert found[-1][0] is snapbus.resp._BAD, (chunks[:2], found)
        assert error in found[-1][1]


def test_parser_before_auth_reads_small_commands_one_at_a_time(parser_class: Any) -> None:
    big = b"x" * 20_000
    wire = (b"*2\r\n$4\r\nAUTH\r\n$5\r\ntoken\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%b\r\n"
            % (len(big), big))
    parser = parser_class()
    parser.restrict(True)
    parser.feed(wire)
    assert parser.commands() == [[b"AUTH", b"token"]]  # the next one waits for AUTH's answer
    assert parser.more
    parser.restrict(False)
    assert parser.commands() == [[b"SET", b"k", big]]
    for wire, error in ((b"*11\r\n", b"unauthenticated multibulk length"),
                        (b"*1\r\n$16385\r\n", b"unauthenticated bulk length"),
                        (b"A B C D E F G H I J K\r\n", b"unauthenticated multibulk length")):
        parser = parser_class()
        parser.restrict(True)
        parser.feed(wire)
        assert parser.commands() == [[snapbus.resp._BAD, error]]
    parser = parser_class()
    parser.restrict(True)
    parser.feed(b"*1\r\n$16384\r\n" + b"y" * 16384 + b"\r\n")
    assert parser.commands() == [[b"y" * 16384]]


def test_parser_reads_a_big_command_in_linear_time(parser_class: Any) -> None:
    # 64 MB in 16 KB reads: re-reading (copying) from the command's start on every read
    # copies 128 GB; reading on from where it stopped copies 64 MB.
    size, step = 64 * 1024 * 1024, 16 * 1024
    parser = parser_class()
    parser.feed(b"*2\r\n$3\r\nSET\r\n$%d\r\n" % size)
    chunk = b"z" * step
    loop = asyncio.new_event_loop()
    started = loop.time()
    for _ in range(size // step):
        parser.feed(chunk)
        assert parser.commands() == []
    parser.feed(b"\r\n")
    found = parser.commands()
    elapsed = loop.time() - started
    loop.close()
    assert len(found) == 1
    assert len(found[0][1]) == size
    assert elapsed < 5.0, elapsed


# ---------------------------------------------------------------------------- snapshots


async def test_set_then_get_reads_your_write_in_rmp_serde_bytes(sidecar: Sidecar) -> None:
    snapshot = make_snapshot(intent="ünïcode " * 10)
    assert await sidecar.client.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S) is True
    assert sidecar.view.get(snapshot.session_id) == snapshot  # visible once OK was answered
    assert await sidecar.client.get(meta(snapshot)) == rmp_named(snapshot)
    # text ids are accepted; the answer is the upstream's form
    changed = snapshot.replace(state="submitted")
    assert await sidecar.client.set(meta(changed), rmp_named(changed, text_ids=True), ex=60)
    assert await sidecar.client.get(meta(changed)) == rmp_named(changed)
    assert await sidecar.client.get(meta(uuid.uuid4())) is None
    assert await sidecar.client.exists(meta(snapshot), meta(uuid.uuid4())) == 1


async def test_another_pods_write_is_read(sidecar: Sidecar) -> None:
    snapshot = make_snapshot()
    receipt = await sidecar.publisher.publish(snapshot)
    await sidecar.view.wait_for(receipt, WAIT_S)
    assert await sidecar.client.get(meta(snapshot)) == rmp_named(snapshot)
    newer = snapshot.replace(intent="newer")  # the cached reply must not outlive its snapshot
    await sidecar.view.wait_for(await sidecar.publisher.publish(newer), WAIT_S)
    assert await sidecar.client.get(meta(snapshot)) == rmp_named(newer)


async def test_set_refuses_invalid_snapshots(sidecar: Sidecar) -> None:
    snapshot = make_snapshot()
    with pytest.raises(ResponseError, match="not a MessagePack snapshot"):
        await sidecar.client.set(meta(snapshot), b"plain text")
    with pytest.raises(ResponseError, match="its session_id is"):
        await sidecar.client.set(meta(uuid.uuid4()), rmp_named(snapshot))
    bad = msgpack.packb({**msgpack.unpackb(rmp_named(snapshot)), "repo_id": "nope"})
    with pytest.raises(ResponseError, match="repo_id is not a valid UUID"):
        await sidecar.client.set(meta(snapshot), bad)
    with pytest.raises(ResponseError, match="not ws:"):
        await sidecar.client.set("ws:not-a-uuid:meta", rmp_named(snapshot))
    assert snapshot.session_id not in sidecar.view


@pytest.mark.parametrize(("wire", "error"), [
    (b"*x\r\n", "-ERR Protocol error"),
    (b"*1\r\n:5\r\n", "-ERR Protocol error"),
])
async def test_protocol_errors_close_the_connection(parser_class: Any, sidecar: Sidecar,
                                                    wire: bytes, error: str) -> None:
    reader, writer = await asyncio.open_connection(*_address(sidecar.url))
    writer.write(b"PING\r\n" + wire)
    assert await _read_lines(reader, 1) == [b"+PONG"]
    line = (await asyncio.wait_for(reader.readline(), WAIT_S)).decode()
    assert line.startswith(error), line
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # closed
    writer.close()


class Recorded(snapbus.resp._Connection):
    """The server's connection, kept for the test to look at."""

    made: ClassVar[list[snapbus.resp._Connection]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.made.append(self)


@pytest.mark.parametrize("authed", [True, False])
async def test_a_client_that_does_not_read_is_not_answered_without_bound(
        broker: BrokerAddress, topic_name: str, monkeypatch: pytest.MonkeyPatch,
        authed: bool) -> None:
    monkeypatch.setattr(snapbus.resp, "_Connection", Recorded)
    monkeypatch.setattr(Recorded, "made", [])
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with redis_sidecar(config, token=None if authed else TOKEN) as sidecar:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client reads nothing
        sock.connect(_address(sidecar.url))
        reader, writer = await asyncio.open_connection(sock=sock)
        # 4 MB of unknown commands: 100 MB of error replies if all were answered.
        writer.write(b"x\n" * 2_000_000)
        await eventually(lambda: len(Recorded.made) == 1, what="connected")
        connection = Recorded.made[0]
        transport = connection.transport
        assert transport is not None

        def stopped_or_flooded() -> bool:
            return connection.paused or transport.get_write_buffer_size() > 8_000_000

        await eventually(stopped_or_flooded, what="the server stopped reading")
        assert transport.get_write_buffer_size() < 1_000_000
        # Reading the replies lets the server go on.
        first = await asyncio.wait_for(reader.readexactly(4096), WAIT_S)
        assert first.startswith(b"-ERR unknown command 'x'" if authed else b"-NOAUTH")
        writer.close()


async def upstream_evict(client: aioredis.Redis, sid: uuid.UUID) -> list[Any]:
    """The upstream's `evict`: SMEMBERS of the files set, then every DEL in MULTI/EXEC."""
    paths = await client.smembers(f"ws:{sid}:files")
    pipe = client.pipeline(transaction=True)
    pipe.delete(f"ws:{sid}:meta")
    pipe.delete(f"ws:{sid}:graph")
    pipe.delete(f"ws:{sid}:files")
    for path in sorted(paths):
        pipe.delete(f"ws:{sid}:file:{path.decode()}")
    result: list[Any] = await pipe.execute()
    return result


async def upstream_touch(client: aioredis.Redis, sid: uuid.UUID, ttl: int = TTL_S
                         ) -> list[Any]:
    """The upstream's `touch`: SMEMBERS of the files set, then every EXPIRE in MULTI/EXEC."""
    paths = await client.smembers(f"ws:{sid}:files")
    pipe = client.pipeline(transaction=True)
    for key in (f"ws:{sid}:meta", f"ws:{sid}:graph", f"ws:{sid}:files",
                *(f"ws:{sid}:file:{p.decode()}" for p in sorted(paths))):
        pipe.expire(key, ttl)
    result: list[Any] = await pipe.execute()
    return result


async def test_upstream_evict_pipeline(parser_class: Any, sidecar: Sidecar) -> None:
    snapshot = make_snapshot()
    await sidecar.client.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S)
    assert await upstream_evict(sidecar.client, snapshot.session_id) == [1, 0, 0]
    assert snapshot.session_id not in sidecar.view  # gone once EXEC answered
    assert await sidecar.client.get(meta(snapshot)) is None
    assert await upstream_evict(sidecar.client, snapshot.session_id) == [0, 0, 0]


async def test_upstream_touch_pipeline_renews_the_age(broker: BrokerAddress,
                                                      topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with redis_sidecar(config, ttl_s=3600) as sidecar:
        snapshot = make_snapshot()
        absent = await upstream_touch(sidecar.client, snapshot.session_id)
        assert absent == [False, False, False]
        assert await sidecar.client.ttl(meta(snapshot)) == -2
        await sidecar.client.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S)
        assert 3590 <= await sidecar.client.ttl(meta(snapshot)) <= 3600  # the view's TTL
        left = sidecar.view.ttl_left_s(snapshot.session_id)
        assert left is not None
        assert 3590 <= left <= 3600
        assert 3_590_000 <= await sidecar.client.pttl(meta(snapshot)) <= 3_600_000
        assert sidecar.view.ttl_left_s(uuid.uuid4()) is None
        before = sidecar.view._expiry.stamps[snapshot.key]
        assert await upstream_touch(sidecar.client, snapshot.session_id) == [True, False, False]
        assert sidecar.view._expiry.stamps[snapshot.key] >= before  # a new record, applied
        assert await sidecar.client.get(meta(snapshot)) == rmp_named(snapshot)
        # a time in the past deletes, as in Redis
        assert await sidecar.client.expire(meta(snapshot), 0) is True
        assert snapshot.session_id not in sidecar.view


async def test_ttl_without_a_view_ttl_is_none(sidecar: Sidecar) -> None:
    snapshot = make_snapshot()
    await sidecar.client.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S)
    assert await sidecar.client.ttl(meta(snapshot)) == -1
    assert sidecar.view.ttl_left_s(snapshot.session_id) is None


async def test_writes_refused_when_read_only(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with redis_sidecar(config, writes=False) as sidecar:
        snapshot = make_snapshot()
        with pytest.raises(ReadOnlyError, match=r"writes are disabled.*--allow-writes"):
            await sidecar.client.set(meta(snapshot), rmp_named(snapshot))
        await sidecar.view.wait_for(await sidecar.publisher.publish(snapshot), WAIT_S)
        with pytest.raises(ReadOnlyError):
            await sidecar.client.delete(meta(snapshot))
        assert await sidecar.client.get(meta(snapshot)) == rmp_named(snapshot)


# ---------------------------------------------------------------------------- other keys


async def test_other_keys_without_an_upstream(sidecar: Sidecar) -> None:
    sid = uuid.uuid4()
    with pytest.raises(ResponseError, match=r"ws:\{id\}:graph keys need an upstream Redis"):
        await sidecar.client.set(f"ws:{sid}:graph", b"graph", ex=TTL_S)
    with pytest.raises(ResponseError, match=r"ws:\{id\}:files keys"):
        await sidecar.client.sadd(f"ws:{sid}:files", "src/lib.rs")
    with pytest.raises(ResponseError, match=r"ws:\{id\}:file:\{path\} keys"):
        await sidecar.client.set(f"ws:{sid}:file:src/lib.rs", b"entry")
    assert await sidecar.client.get(f"ws:{sid}:graph") is None
    assert await sidecar.client.get(f"ws:{sid}:file:src/lib.rs") is None
    assert await sidecar.client.smembers(f"ws:{sid}:files") == set()
    assert await sidecar.client.delete(f"ws:{sid}:graph", f"ws:{sid}:files") == 0
    assert await sidecar.client.expire(f"ws:{sid}:graph", 10) is False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(*args: str) -> Iterator[str]:
    """A redis-server on a free port (no persistence); yields its URL."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (.ci/run installs it)"
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly",
                                 "no", "--dir", workdir, *args], stdout=subprocess.DEVNULL)
        try:
            yield f"redis://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(WAIT_S)


async def test_other_keys_go_to_the_upstream(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    with redis_server("--requirepass", "up pw") as upstream_url:
        upstream_url = upstream_url.replace("//", "//:up%20pw@")
        upstream = aioredis.Redis.from_url(upstream_url)
        await eventually(lambda: _pings(upstream), what="redis-server answering")
        async with redis_sidecar(config, upstream=upstream_url) as sidecar:
            snapshot = make_snapshot()
            sid, client = snapshot.session_id, sidecar.client
            await client.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S)
            assert await client.set(f"ws:{sid}:graph", b"\x00graph\r\n", ex=TTL_S) is True
            pipe = client.pipeline(transaction=True)  # the upstream's cache_file
            pipe.set(f"ws:{sid}:file:src/a.rs", b"entry", ex=TTL_S)
            pipe.sadd(f"ws:{sid}:files", "src/a.rs")
            pipe.expire(f"ws:{sid}:files", TTL_S)
            assert await pipe.execute() == [True, 1, True]
            assert await upstream.get(f"ws:{sid}:graph") == b"\x00graph\r\n"
            assert await upstream.get(meta(snapshot)) is None  # snapshots stay in the log
            assert await client.get(f"ws:{sid}:graph") == b"\x00graph\r\n"
            assert await client.smembers(f"ws:{sid}:files") == {b"src/a.rs"}
            assert await upstream_touch(client, sid) == [True, True, True, True]
            assert 0 < await client.ttl(f"ws:{sid}:graph") <= TTL_S
            assert await upstream_evict(client, sid) == [1, 1, 1, 1]
            assert await upstream.keys("*") == []
            assert snapshot.session_id not in sidecar.view
        await upstream.aclose()


async def test_a_hung_upstream_is_an_error_not_a_hang(broker: BrokerAddress,
                                                      topic_name: str) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    hung = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with redis_sidecar(config, upstream=f"redis://127.0.0.1:{port}",
                             upstream_timeout_s=0.5) as sidecar:
        sid = uuid.uuid4()
        with pytest.raises(ResponseError, match=r"did not answer within 0\.5 s"):
            await sidecar.client.get(f"ws:{sid}:graph")
        assert await sidecar.client.ping() is True  # the client's connection goes on
        assert await sidecar.client.get(meta(sid)) is None
    for writer in accepted:
        writer.close()
    hung.close()
    await hung.wait_closed()


async def _pings(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except RedisConnectionError:  # still starting
        return False


# ---------------------------------------------------------------------------- connection


async def test_unknown_commands_and_wrong_arity(sidecar: Sidecar) -> None:
    with pytest.raises(ResponseError, match=r"^unknown command 'FLUSHALL', with args "
                                            r"beginning with: 'ASYNC'$"):
        await sidecar.client.execute_command("FLUSHALL", "ASYNC")
    with pytest.raises(ResponseError, match="wrong number of arguments for 'get' command"):
        await sidecar.client.execute_command("GET")
    with pytest.raises(ResponseError, match="DB index is out of range"):
        await sidecar.client.execute_command("SELECT", "1")
    assert await sidecar.client.execute_command("SELECT", "0")
    assert await sidecar.client.ping() is True


async def test_multi_aborts_on_a_queued_error(sidecar: Sidecar) -> None:
    snapshot = make_snapshot()
    reader, writer = await asyncio.open_connection(*_address(sidecar.url))
    writer.write(b"MULTI\r\nDEL " + meta(snapshot).encode() + b"\r\nNOPE\r\nEXEC\r\n")
    replies = await _read_lines(reader, 4)
    assert replies[:2] == [b"+OK", b"+QUEUED"]
    assert replies[2].startswith(b"-ERR unknown command 'NOPE'")
    assert replies[3] == b"-EXECABORT Transaction discarded because of previous errors."
    writer.close()


async def test_redis_rs_connection_setup(sidecar: Sidecar) -> None:
    """What redis-rs sends on connect (RESP2 and RESP3 clients), answered as Redis does."""
    reader, writer = await asyncio.open_connection(*_address(sidecar.url))
    writer.write(b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$8\r\nLIB-NAME\r\n$8\r\nredis-rs\r\n"
                 b"*4\r\n$6\r\nCLIENT\r\n$7\r\nSETINFO\r\n$7\r\nLIB-VER\r\n$6\r\n0.27.6\r\n"
                 b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$2\r\ndk\r\n"
                 b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n")
    assert await _read_lines(reader, 4) == [b"+OK", b"+OK", b"+OK", b"%7"]
    writer.close()
    resp3 = aioredis.Redis.from_url(sidecar.url, protocol=3)
    sid = uuid.uuid4()
    assert await resp3.get(meta(sid)) is None
    assert await resp3.smembers(f"ws:{sid}:files") == set()
    assert await upstream_evict(resp3, sid) == [0, 0, 0]
    await resp3.aclose()


TOKEN = "redis-sidecar-token-0123"


async def test_auth_with_the_token(broker: BrokerAddress, topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with redis_sidecar(config, token=TOKEN) as sidecar:
        snapshot = make_snapshot()
        with pytest.raises(AuthenticationError):
            await sidecar.client.get(meta(snapshot))
        for wrong_token in ("wrong", TOKEN[:-1], TOKEN + "x"):
            wrong = aioredis.Redis.from_url(sidecar.url.replace("//", f"//:{wrong_token}@"))
            with pytest.raises(AuthenticationError, match=r"WRONGPASS|invalid"):
                await wrong.get(meta(snapshot))
            await wrong.aclose()
        authed = aioredis.Redis.from_url(sidecar.url.replace("//", f"//:{TOKEN}@"))
        assert await authed.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S)
        assert await authed.get(meta(snapshot)) == rmp_named(snapshot)
        await authed.aclose()
        # As Redis 6+: a failed AUTH leaves an authenticated connection authenticated.
        reader, writer = await asyncio.open_connection(*_address(sidecar.url))
        writer.write(f"AUTH {TOKEN}\r\nAUTH wrong\r\nHELLO 2 AUTH default nope\r\n"
                     f"EXISTS {meta(snapshot)}\r\n".encode())
        replies = await _read_lines(reader, 4)
        assert replies[0] == b"+OK"
        assert replies[1].startswith(b"-WRONGPASS")
        assert replies[2].startswith(b"-WRONGPASS")
        assert replies[3] == b":1"
        writer.close()


async def test_before_auth_only_small_commands(parser_class: Any, broker: BrokerAddress,
                                              topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with redis_sidecar(config, token=TOKEN) as sidecar:
        address = _address(sidecar.url)
        for wire, error in ((b"*1\r\n$20000\r\n", b"unauthenticated bulk length"),
                            (b"*11\r\n", b"unauthenticated multibulk length")):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(wire)  # answered at the header, not after 20 KB
            line = await asyncio.wait_for(reader.readline(), WAIT_S)
            assert line == b"-ERR Protocol error: " + error + b"\r\n"
            assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # closed
            writer.close()
        # AUTH then a big command in the same write: read once AUTH is answered.
        snapshot = make_snapshot(intent="i" * 20_000)
        value, key = rmp_named(snapshot), meta(snapshot).encode()
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%b\r\n" % (len(TOKEN), TOKEN.encode())
                     + b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                     % (len(key), key, len(value), value))
        assert await _read_lines(reader, 2) == [b"+OK", b"+OK"]
        writer.close()
        assert sidecar.view.get(snapshot.session_id) == snapshot


async def test_tls(broker: BrokerAddress, topic_name: str,
                   tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("tls")
    files = _make_tls_files(directory)
    bundle = str(directory / "broker.pem")  # key and certificate for 127.0.0.1, and the CA
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with redis_sidecar(config, token=TOKEN, tls_certfile=bundle) as sidecar:
        assert sidecar.url.startswith("rediss://127.0.0.1:")
        url = sidecar.url.replace("//", f"//:{TOKEN}@")
        client = aioredis.Redis.from_url(url, ssl_ca_certs=files.cafile, socket_timeout=WAIT_S)
        snapshot = make_snapshot()
        assert await client.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S)
        assert await client.get(meta(snapshot)) == rmp_named(snapshot)
        await client.aclose()
        # The token never crosses in clear: plaintext is not answered.
        reader, writer = await asyncio.open_connection(*_address(sidecar.url))
        writer.write(f"AUTH {TOKEN}\r\nPING\r\n".encode())
        assert b"+OK" not in await asyncio.wait_for(reader.read(), WAIT_S)
        writer.close()


async def test_weak_tokens_and_open_writes_are_refused(broker: BrokerAddress,
                                                       topic_name: str) -> None:
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    async with SnapshotPublisher(config) as publisher, SnapshotView(config) as view:
        for weak in ("", "short", "has a space in it 0123", "ünicode-token-0123456789"):
            with pytest.raises(ConfigError, match="sidecar token"):
                async with serving_redis(view, token=weak):
                    pass
        for host in ("0.0.0.0", ""):
            with pytest.raises(ConfigError, match="refusing to serve writes"):
                async with serving_redis(view, publisher, host=host):
                    pass
        async with serving_redis(view, publisher, host="0.0.0.0", token=TOKEN) as url:
            assert url.startswith("redis://0.0.0.0:")


async def test_redis_cli(parser_class: Any, sidecar: Sidecar) -> None:
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli is not installed (.ci/run installs it)"
    snapshot = make_snapshot()
    await sidecar.client.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S)
    host, port = _address(sidecar.url)

    async def run(*args: str) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            cli, "-h", host, "-p", str(port), *args, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT_S)
        return out

    assert await run("PING") == b"PONG\n"
    assert await run("GET", meta(snapshot)) == rmp_named(snapshot) + b"\n"
    assert await run("TTL", meta(snapshot)) == b"-1\n"
    assert (await run("NOPE")).startswith(b"ERR unknown command 'NOPE'")
    assert await run("DEL", meta(snapshot), f"ws:{snapshot.session_id}:graph") == b"1\n"
    assert await run("EXISTS", meta(snapshot)) == b"0\n"


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


async def _read_lines(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    return [(await asyncio.wait_for(reader.readline(), WAIT_S)).rstrip(b"\r\n")
            for _ in range(n)]


async def test_serve_command_with_a_redis_port(broker: BrokerAddress, topic_name: str) -> None:
    args = ["-b", broker.bootstrap_servers, "-t", topic_name, "serve", "--port", "0",
            "--redis-port", "0", "--allow-writes", "--fetch-max-wait-ms", "20"]
    token = TOKEN
    async with serve_command(*args, env={"SNAPBUS_SERVE_TOKEN": token}) as (_, proc):
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), WAIT_S)).decode()
        assert line.startswith("serving redis://127.0.0.1:"), line
        url = line.split()[1].replace("//", f"//:{token}@")
        client = aioredis.Redis.from_url(url, socket_timeout=WAIT_S)
        snapshot = make_snapshot()

        async def stored() -> bool:
            try:
                return bool(await client.set(meta(snapshot), rmp_named(snapshot), ex=TTL_S))
            except BusyLoadingError:  # as Redis answers while it loads: the view starts
                return False

        await eventually(stored, what="SET answered")
        assert await client.get(meta(snapshot)) == rmp_named(snapshot)
        await client.aclose()


def test_serve_command_redis_usage_errors() -> None:
    result = CliRunner().invoke(cli, ["serve", "--no-http"])
    assert result.exit_code == 2
    assert "--no-http and --redis-upstream need --redis-port" in result.output
