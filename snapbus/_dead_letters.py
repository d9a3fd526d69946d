"""Records the view skips (internal): bad ones (undecodable) and misplaced ones (on another
partition than their key's). Each is counted, the first few logged with their coordinates, and,
with a dead-letter topic, copied there with headers saying where it came from and why (a
compacted topic keyed by source coordinates, so copies from many pods collapse).

The read loop collects them while it applies a read and `send`s them after it: the copies are
written by a task of their own, so a dead-letter topic that cannot be written never holds up
the live tail (letters beyond `MAX_PENDING` are then counted and dropped).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from snapbus._aiokafka import abandon_sends
from snapbus._kafka import start_client
from snapbus.config import KafkaConfig
from snapbus.errors import DecodeError
from snapbus.reader import Record
from snapbus.topic import ensure_topic

__all__ = ["BadRecords"]

log = logging.getLogger("snapbus.view")

_LOGGED = 20  # bad (and misplaced) records logged one by one; the rest are counted
MAX_PENDING = 10_000
"""Letters kept waiting for the dead-letter topic; more are dropped (counted in `dropped`)."""
_CLOSE_WAIT_S = 10.0  # how long `close` waits for copies in flight before dropping them


def _coordinates(topic: str, partition: int, offset: int) -> dict[str, Any]:
    """Structured-log fields naming where a record is."""
    return {"topic": topic, "partition": partition, "offset": offset}


class BadRecords:
    """Counts, logs and dead-letters the records a view of `config.topic` skips."""

    def __init__(self, config: KafkaConfig, dead_letter_topic: str | None) -> None:
        self.config = config
        self.topic = dead_letter_topic
        self.decode_errors = 0
        """Records skipped as undecodable."""
        self.misplaced = 0
        """Records ignored as misplaced."""
        self.dead_lettered = 0
        """Records the dead-letter topic acknowledged."""
        self.dropped = 0
        """Letters dropped because too many waited for the dead-letter topic."""
        self._letters: list[tuple[int, Record, str, str]] = []  # (.., reason, message)
        self._producer: AIOKafkaProducer | None = None
        self._sending: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Ensure the dead-letter topic and start its producer (nothing without a topic)."""
        if self.topic is None:
            return
        await ensure_topic(self.config.replace(topic=self.topic, history_topic=None))
        producer = AIOKafkaProducer(acks="all", linger_ms=20, **self.config.client_kwargs())
        await start_client(producer, self.config, "dead-letter producer")
        self._producer = producer

    async def close(self) -> None:
        """Stop copying: letters in flight get `_CLOSE_WAIT_S`, then are dropped (a cluster
        that refuses writes must not hold up a view's stop)."""
        producer, self._producer = self._producer, None
        sending, self._sending = self._sending, None
        if sending is not None:
            sending.cancel()
        if producer is None:
            return
        closing = asyncio.ensure_future(producer.stop())
        done, _ = await asyncio.wait({closing}, timeout=_CLOSE_WAIT_S)
        if not done:
            log.warning("view of %s: dead letters still unacknowledged after %g s: dropped",
                        self.config.topic, _CLOSE_WAIT_S, extra={"topic": self.config.topic})
            abandon_sends(producer)
        await closing

    def _letter(self, partition: int, record: Record, reason: str, message: str) -> None:
        if self.topic is None:
            return
        if len(self._letters) >= MAX_PENDING:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("view of %s: more than %d records wait for the dead-letter topic; "
                            "further ones are counted, not copied", self.config.topic,
                            MAX_PENDING, extra={"topic": self.config.topic})
            return
        self._letters.append((partition, record, reason, message))

    def bad(self, partition: int, record: Record, error: DecodeError) -> None:
        """Skip an undecodable record."""
        self.decode_errors += 1
        self._letter(partition, record, error.reason, str(error))
        if self.decode_errors <= _LOGGED:
            topic = self.config.topic
            log.warning("skipping bad record at %s[%d]@%d (%s): %s", topic, partition,
                        record.offset, error.reason, error,
                        extra=_coordinates(topic, partition, record.offset))
            if self.decode_errors == _LOGGED:
                log.warning("further bad records are counted in stats but not logged")

    def misplaced_record(self, partition: int, record: Record, home: int,
                         partitions: int) -> None:
        """Ignore a record on another partition than its key's (`home`, of `partitions`)."""
        self.misplaced += 1
        topic, key = self.config.topic, (record.key or b"").decode("utf-8", "replace")
        message = (f"key {key!r} belongs on partition {home} of {partitions}, not "
                   f"{partition} (Kafka's default partitioner, murmur2)")
        self._letter(partition, record, "misplaced", message)
        if self.misplaced <= _LOGGED:
            log.warning("ignoring misplaced record at %s[%d]@%d: %s; written by a producer "
                        "with another partitioner (docs/misplaced-records.md)", topic,
                        partition, record.offset, message,
                        extra={**_coordinates(topic, partition, record.offset), "key": key})
            if self.misplaced == _LOGGED:
                log.warning("further misplaced records are counted in stats but not logged")

    def pending(self) -> bool:
        """Whether records wait to be copied."""
        return bool(self._letters)

    def send(self) -> None:
        """Copy the records collected to the dead-letter topic, in a task of its own."""
        if self._producer is None:
            self._letters.clear()
            return
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(
                self._send(), name=f"snapbus-dead-letters:{self.config.topic}")

    async def _send(self) -> None:
        try:
            while self._letters and self._producer is not None:
                letters, self._letters = self._letters, []
                await self._send_letters(self._producer, letters)
        except Exception as exc:  # (never silently: the letters are lost, say so)
            log.warning("view of %s: copying to the dead-letter topic failed: %r",
                        self.config.topic, exc, extra={"topic": self.config.topic})

    async def _send_letters(self, producer: AIOKafkaProducer,
                            letters: list[tuple[int, Record, str, str]]) -> None:
        topic = self.config.topic
        for partition, record, reason, message in letters:
            headers = [
                ("snapbus.source.topic", topic.encode()),
                ("snapbus.source.partition", str(partition).encode()),
                ("snapbus.source.offset", str(record.offset).encode()),
                ("snapbus.source.timestamp", str(record.timestamp).encode()),
                ("snapbus.error.reason", reason.encode()),
                ("snapbus.error.message", message[:1000].encode()),
                ("snapbus.source.key", record.key or b""),
            ]
            key = f"{topic}:{partition}:{record.offset}".encode()
            try:
                future = await producer.send(self.topic or "", record.value,
                                             key=key, headers=headers)
            except KafkaError as exc:
                log.warning("cannot copy bad record %s to the dead-letter topic: %r",
                            key.decode(), exc,
                            extra=_coordinates(topic, partition, record.offset))
                continue
            future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            log.warning("a bad record was not copied to the dead-letter topic: %r",
                        None if future.cancelled() else future.exception())
        else:
            self.dead_lettered += 1
