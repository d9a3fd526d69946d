"""`WorkspaceCache`: the upstream cache's verbs over a publisher and a view, for drop-in use.

The system snapbus replaces kept snapshots in a Redis/Valkey cache with ``cache_workspace``,
``get_workspace``, ``evict`` and ``touch``. This facade keeps those verbs: writes go to the
topic and return once this pod's view shows them (read your writes), reads are local.
"""

from __future__ import annotations

import uuid

from snapbus._lifecycle import AsyncLifecycle
from snapbus.config import KafkaConfig
from snapbus.errors import ValidationError
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.snapshot import WorkspaceSnapshot, parse_uuid
from snapbus.view import SnapshotView

__all__ = ["WorkspaceCache"]


class WorkspaceCache(AsyncLifecycle):
    """Cache-style access to workspace snapshots, backed by the topic (an async context manager).

    ``async with WorkspaceCache(config) as cache: await cache.cache_workspace(id, snapshot)``

    Pass your own `publisher` and `view` to tune them; they are started and stopped with the
    cache either way.
    """

    def __init__(
        self,
        config: KafkaConfig | None = None,
        *,
        publisher: SnapshotPublisher | None = None,
        view: SnapshotView | None = None,
        write_timeout_s: float = 30.0,
    ) -> None:
        config = config if config is not None else KafkaConfig.from_env()
        self.publisher = publisher if publisher is not None else SnapshotPublisher(config)
        self.view = view if view is not None else SnapshotView(config)
        self._write_timeout_s = write_timeout_s

    async def start(self) -> None:
        """Start the publisher (ensuring the topic), then the view."""
        await self.publisher.start()
        try:
            await self.view.start()
        except BaseException:
            await self.publisher.stop()
            raise

    async def stop(self) -> None:
        """Stop the view and the publisher; safe to call twice."""
        try:
            await self.view.stop()
        finally:
            await self.publisher.stop()

    async def cache_workspace(
        self, session_id: uuid.UUID | str, snapshot: WorkspaceSnapshot
    ) -> Receipt:
        """Store the snapshot of `session_id`; return once this pod's view shows it.

        Raises:
            ValidationError: `session_id` is not a UUID or differs from the snapshot's.
            PublishError: the broker did not acknowledge in time.
        """
        wanted = parse_uuid(session_id, field="session_id")
        if not isinstance(snapshot, WorkspaceSnapshot) or snapshot.session_id != wanted:
            raise ValidationError(
                f"cache_workspace({wanted}) got a snapshot for "
                f"{getattr(snapshot, 'session_id', snapshot)!r}",
                field="session_id",
            )
        receipt = await self.publisher.publish(snapshot)
        await self.view.wait_for(receipt, timeout=self._write_timeout_s)
        return receipt

    def get_workspace(self, session_id: uuid.UUID | str) -> WorkspaceSnapshot | None:
        """Return the latest snapshot of `session_id`, or None (a local, synchronous read)."""
        return self.view.get(session_id)

    async def evict(self, session_id: uuid.UUID | str) -> Receipt:
        """Delete the session everywhere; return once this pod's view no longer has it."""
        receipt = await self.publisher.evict(session_id)
        await self.view.wait_for(receipt, timeout=self._write_timeout_s)
        return receipt

    async def touch(self, session_id: uuid.UUID | str) -> Receipt | None:
        """Republish the session's current snapshot to renew its age; None if it is absent."""
        snapshot = self.view.get(session_id)
        if snapshot is None:
            return None
        receipt = await self.publisher.touch(snapshot)
        await self.view.wait_for(receipt, timeout=self._write_timeout_s)
        return receipt
