"""Stopping long-running commands on SIGINT or SIGTERM (internal)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set `stop` on SIGINT or SIGTERM while inside (where the loop can handle signals).

    Event-loop handlers, unlike Python's default for SIGINT, also apply in a process started
    with SIGINT ignored, as a non-interactive shell starts its background jobs; and SIGTERM,
    what Kubernetes and Docker stop a container with, gets the same orderly shutdown.
    """
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
    try:
        yield
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
