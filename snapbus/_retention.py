"""How long the view's state is trusted: the topic's tombstone retention (internal).

A compacted topic keeps a tombstone only ``delete.retention.ms`` after it reached the log.
Per partition, `Retention.synced` holds (offset, time): every record from that offset on
reached the log after that time, so a tombstone among them stays at least until time +
retention. Each fetch tells the log end (the last stable offset) at its time; once the view's
position reaches it, that pair becomes the partition's `synced`. A view whose state was last
complete longer ago than the retention, less a margin (a tenth, at most an hour), may have
missed a tombstone: `check` says so (the view then re-reads the whole log), and `too_old`
says so of a checkpoint (docs/compaction.md). Times are milliseconds since the epoch on the
view's clock.
"""

from __future__ import annotations

import collections
import time

from snapbus.reader import PartitionReader
from snapbus.topic import DEFAULT_DELETE_RETENTION_MS

__all__ = ["Retention", "margin_ms", "too_slow", "trust_ms"]

_SYNC_OBSERVATIONS = 64  # (high watermark, time) pairs kept per partition while behind


def margin_ms(retention_ms: int) -> int:
    """The safety margin taken off the tombstone retention: a tenth of it, at most an hour
    (clock skew between this host and the broker, and the time from a fetch to its check)."""
    return min(retention_ms // 10, 3_600_000)


def trust_ms(retention_ms: int) -> int:
    """How long after a record was read its tombstone, if any, surely is still in the log.

    The cleaner removes a record only in a pass that also first sees the record superseding
    it; a tombstone stays ``retention_ms`` after that pass, which came after any read of the
    record it deletes. So a read that returns a value, and reaches every later record of its
    partition within this time, has seen the value's tombstone if there is one.
    """
    return retention_ms - margin_ms(retention_ms)


def too_slow(topic: str, retention_ms: int, elapsed_ms: float) -> str:
    """Why a read of the log that took `elapsed_ms` may lack tombstones (empty: it may not)."""
    if elapsed_ms <= trust_ms(retention_ms):
        return ""
    return (f"reading topic {topic!r} took {elapsed_ms / 1000:.1f} s, and the topic keeps "
            f"tombstones only {retention_ms / 1000:g} s (delete.retention.ms, less a "
            f"{margin_ms(retention_ms) / 1000:g} s margin): sessions deleted meanwhile may "
            "have no tombstone left")


class Retention:
    """When each partition of the view's state was last complete, against the retention."""

    def __init__(self) -> None:
        self.retention_ms = DEFAULT_DELETE_RETENTION_MS
        """The topic's ``delete.retention.ms`` (followed while the view runs)."""
        self.synced: dict[int, tuple[int, float]] = {}
        self._seen: dict[int, collections.deque[tuple[int, float]]] = {}
        self._checked: dict[int, int] = {}
        self._stamps_seen: dict[int, int] = {}

    def trust_ms(self) -> int:
        """How long after its last complete instant the view's state is trusted."""
        return trust_ms(self.retention_ms)

    def reset(self, partitions: list[int], now_ms: float) -> None:
        """Start over from offset 0 of every partition, complete as of now."""
        self.synced = dict.fromkeys(partitions, (0, now_ms))
        self._seen.clear()
        self._checked.clear()
        self._stamps_seen.clear()

    def oldest_ms(self) -> int:
        """When the state was last complete in every partition (0: never)."""
        return int(min((t for _, t in self.synced.values()), default=0))

    def too_old(self, synced_ms: float, now_ms: float, topic: str) -> str:
        """Why a state last complete at `synced_ms` is too old to trust (empty: it is not),
        as the end of a sentence whose subject holds that state."""
        age_ms = now_ms - synced_ms
        if age_ms <= self.trust_ms():
            return ""
        return (f"holds the state of {age_ms / 1000:.1f} s ago, and topic {topic!r} keeps "
                f"tombstones only {self.retention_ms / 1000:g} s (delete.retention.ms, less a "
                f"{margin_ms(self.retention_ms) / 1000:g} s margin): sessions deleted since "
                "may have no tombstone left")

    def check(self, reader: PartitionReader, now: float) -> str | None:
        """Follow the reader's fetches; return why the whole log must be re-read, if it must:
        the view read, or still has records to read, later than the topic surely keeps
        tombstones after its state was last complete (for a read of the whole log: after it
        began)."""
        lateness = time.time() * 1000 - now  # fetch stamps are this host's time.time()
        trust = self.trust_ms()
        positions = reader.positions
        for p in reader.partitions:
            position = positions.get(p, 0)
            hw = reader.stable_end(p)  # (read_committed: the cleaner keeps what is beyond)
            advanced = position > self._checked.get(p, position)
            self._checked[p] = position
            synced_at, synced_ms = self.synced.get(p, (0, now))
            if now > synced_ms + trust and (
                    advanced or (hw is not None and hw > position)):
                return (f"partition {p} was last complete {(now - synced_ms) / 1000:.1f} s "
                        f"ago, longer than the topic surely keeps tombstones "
                        f"({self.retention_ms / 1000:g} s less a margin): sessions deleted "
                        "meanwhile may have no tombstone left")
            pending = self._seen.get(p)
            if pending is None:
                pending = self._seen[p] = collections.deque()
            stamp = reader.fetch_stamp(p)
            # (only a fetch answered since the last check tells something new)
            if hw is not None and stamp is not None and stamp != self._stamps_seen.get(p):
                self._stamps_seen[p] = stamp
                seen_ms = stamp - lateness
                if pending and pending[-1][0] == hw:  # (the same log end, seen later)
                    pending[-1] = (hw, max(pending[-1][1], seen_ms))
                elif len(pending) < _SYNC_OBSERVATIONS:
                    pending.append((hw, seen_ms))
                else:  # (dropping the one before: a later sync, never a wrong one)
                    pending[-1] = (hw, seen_ms)
            while pending and pending[0][0] <= position:
                end, seen_ms = pending.popleft()
                if seen_ms > synced_ms:
                    synced_at, synced_ms = end, seen_ms
            self.synced[p] = (synced_at, synced_ms)
        return None
