"""Who waits on the view: read-your-writes waiters, barriers and change subscribers
(internal).

The read loop calls `Waiters.release` after each read with the positions whose records are
all applied; `notify` hands each applied change to every subscriber; `end` fails or ends them
all when the view stops or fails. Nothing here reads Kafka: barriers are judged by the
reader they are given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from snapbus.reader import BarrierProbe, PartitionReader

__all__ = ["Subscriber", "Waiters"]


class Subscriber(Protocol):
    """A change stream, as `Waiters` sees it."""

    def _push(self, change: Any) -> None: ...

    def _end(self, error: BaseException | None) -> None: ...


class Waiters:
    """Offset waiters (`wait_for`), barriers (`barrier`) and change subscribers."""

    __slots__ = ("barriers", "offsets", "subscribers")

    def __init__(self) -> None:
        self.offsets: list[tuple[int, int, asyncio.Future[None]]] = []
        self.barriers: list[tuple[BarrierProbe, asyncio.Future[None]]] = []
        self.subscribers: set[Subscriber] = set()
        """Never rebound: the view binds it."""

    def pending(self) -> bool:
        """Whether a `wait_for` or a barrier waits."""
        return bool(self.offsets or self.barriers)

    def wait_offset(self, partition: int, offset: int) -> asyncio.Future[None]:
        """A future done once `release` is given a position past `offset` in `partition`."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.offsets.append((partition, offset, future))
        return future

    def wait_barrier(self, probe: BarrierProbe) -> asyncio.Future[None]:
        """A future done once the reader reached every target of `probe`."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.barriers.append((probe, future))
        return future

    def release(self, applied: Mapping[int, int], reader: PartitionReader) -> None:
        """Wake the waiters that `applied` (positions whose records are all applied) and
        the barriers that `reader` satisfies."""
        if self.offsets:
            pending = []
            for partition, offset, future in self.offsets:
                if applied.get(partition, 0) > offset:
                    if not future.done():
                        future.set_result(None)
                elif not future.done():
                    pending.append((partition, offset, future))
            self.offsets = pending
        if self.barriers:
            pending_barriers = []
            for probe, future in self.barriers:
                if future.done():
                    continue
                reader.observe(probe)
                if probe.complete(len(reader.partitions)) and reader.reached(probe.targets):
                    future.set_result(None)
                else:
                    pending_barriers.append((probe, future))
            self.barriers = pending_barriers

    def notify(self, change: Any) -> None:
        """Hand `change` to every subscriber."""
        for stream in list(self.subscribers):
            stream._push(change)

    def end(self, error: BaseException, stream_error: BaseException | None) -> None:
        """Fail every waiter and barrier with `error`; end every subscriber with
        `stream_error` (None: a plain end)."""
        for _, _, future in self.offsets:
            if not future.done():
                future.set_exception(error)
        for _, future in self.barriers:
            if not future.done():
                future.set_exception(error)
        self.offsets.clear()
        self.barriers.clear()
        for stream in list(self.subscribers):
            stream._end(stream_error)
        self.subscribers.clear()
