"""Child processes of the embedded brokers, free ports and the readiness probe (internal).

Nothing outlives the Python process: each child runs in its own process group, the kernel
sends it SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``, so even if Python itself is
SIGKILLed), and a finalizer kills the group at interpreter exit. The death signal is tied to the
thread that started the child, so start children from a thread that lives as long as they do
(the event loop's thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
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

HOST = "127.0.0.1"
POLL_INTERVAL = 0.05
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_CHARS = 3000
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


class Child:
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

    async def terminate(self, grace: float = _STOP_GRACE) -> None:
        """Ask the process group to exit (SIGTERM), then kill it if it has not after `grace`
        seconds."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._proc.wait, grace)
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


def check_progress(child: Child, what: str, deadline: float) -> None:
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    # SO_REUSEADDR as the broker uses it: a port held only by closed (TIME_WAIT) connections of
    # a killed broker is free, one with a listener is not.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


async def accepts_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def answers_metadata(port: int) -> bool:
    """Whether a Kafka broker on the port answers a Metadata request naming at least one broker."""
    try:
        return await asyncio.wait_for(_metadata_round_trip(port), 1.0)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, struct.error):
        return False


async def _metadata_round_trip(port: int) -> bool:
    reader, writer = await asyncio.open_connection(HOST, port)
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
