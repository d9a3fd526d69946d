"""Expiry: which sessions' latest record grew older than the TTL (internal).

Times are milliseconds since the epoch, from the clock given (the view's, injectable): a
session's stamp is its latest record's timestamp; it expires at stamp + TTL. `renew` records a
new stamp (or says it is already past), `due` pops what expired by now from a heap (entries of
renewed sessions are skipped when popped, and the heap is rebuilt when they pile up). Expired
sessions stay in `hidden` until a tombstone comes (the janitor publishes them).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

__all__ = ["Expiry"]


class Expiry:
    """Session stamps and expiry times for one TTL."""

    __slots__ = ("_heap", "hidden", "now_ms", "stamps", "ttl_ms")

    def __init__(self, ttl_ms: int, now_ms: Callable[[], float]) -> None:
        self.ttl_ms = ttl_ms
        self.now_ms = now_ms
        self.stamps: dict[str, int] = {}
        """Each live session's latest record time."""
        self.hidden: set[str] = set()
        """Sessions expired, or already past the TTL when read, not deleted since."""
        self._heap: list[tuple[int, str]] = []

    def renew(self, key: str, timestamp_ms: int) -> bool:
        """Record a session's latest record time (now when unknown: negative); False if that
        is already past the TTL (the session is then hidden)."""
        now_ms = int(self.now_ms())
        stamp = timestamp_ms if timestamp_ms >= 0 else now_ms
        if stamp + self.ttl_ms <= now_ms:
            self.stamps.pop(key, None)
            self.hidden.add(key)
            return False
        self.hidden.discard(key)
        self.stamps[key] = stamp
        heapq.heappush(self._heap, (stamp + self.ttl_ms, key))
        if len(self._heap) > 2 * len(self.stamps) + 1024:
            self._heap = [(s + self.ttl_ms, k) for k, s in self.stamps.items()]
            heapq.heapify(self._heap)
        return True

    def forget(self, key: str) -> None:
        """The session is gone (deleted or bad): no longer track it."""
        self.stamps.pop(key, None)

    def deleted(self, key: str) -> None:
        """A tombstone came for the session: it is no longer hidden either."""
        self.hidden.discard(key)

    def due(self) -> list[str]:
        """Pop the sessions that expired by now (they become hidden)."""
        now_ms = int(self.now_ms())
        heap, stamps, ttl = self._heap, self.stamps, self.ttl_ms
        expired = []
        while heap and heap[0][0] <= now_ms:
            due, key = heapq.heappop(heap)
            stamp = stamps.get(key)
            if stamp is not None and stamp + ttl == due:
                del stamps[key]
                self.hidden.add(key)
                expired.append(key)
        return expired

    def left_ms(self, key: str) -> float | None:
        """Milliseconds before the session expires (0 when due); None when not tracked."""
        stamp = self.stamps.get(key)
        if stamp is None:
            return None
        return max(0.0, stamp + self.ttl_ms - self.now_ms())
