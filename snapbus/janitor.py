"""`Janitor`: publish tombstones for sessions a TTL view has expired.

A view with ``ttl_s`` hides sessions whose latest record is older than the TTL, but the
records stay on the topic, and every view started later replays them only to hide them again.
A janitor deletes them for good: it periodically waits until its view is up to date, then
publishes a tombstone for each session the view has expired, so the topic and every pod's view
expire together.

Several pods may run a janitor at once: each tombstone only deletes what is already expired,
so duplicates are harmless. A session renewed (``touch``) before the janitor acts is not
expired in the view any more and is left alone; a renewal racing a tombstone resolves like any
two writes, by offset order (the later one wins in every view).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from snapbus._lifecycle import AsyncLifecycle
from snapbus.errors import SnapbusError
from snapbus.publisher import SnapshotPublisher
from snapbus.view import SnapshotView

__all__ = ["Janitor"]

log = logging.getLogger("snapbus.janitor")


class Janitor(AsyncLifecycle):
    """Evicts the sessions a TTL view has expired, every `interval_s` (an async context manager).

    The view and the publisher must already be started; the janitor does not stop them.
    """

    def __init__(
        self, view: SnapshotView, publisher: SnapshotPublisher, *, interval_s: float = 30.0
    ) -> None:
        self.view = view
        self.publisher = publisher
        self.interval_s = interval_s
        self.evicted = 0
        """Tombstones this janitor published."""
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """Evict every session the view has expired now; return how many were evicted."""
        await self.view.barrier(timeout=max(30.0, self.interval_s))
        count = 0
        for session_id in self.view.expired_sessions():
            await self.publisher.evict(session_id)
            count += 1
        self.evicted += count
        if count:
            log.info("janitor evicted %d expired session(s) from %s", count,
                     self.publisher.topic, extra={"topic": self.publisher.topic})
        return count

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except (SnapbusError, asyncio.TimeoutError) as exc:
                log.warning("janitor sweep failed, retrying in %.0f s: %s", self.interval_s, exc)
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        """Start sweeping in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="snapbus-janitor")

    async def stop(self) -> None:
        """Stop sweeping; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


