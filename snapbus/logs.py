"""Logging setup for long-running snapbus processes, with an optional JSON format.

snapbus logs through the standard `logging` module under the ``snapbus`` logger tree and never
configures logging itself; applications do. `configure_logging` is a small helper for
processes such as ``snapbus serve``: one line per record on stderr, as text or as JSON objects
that also carry the record coordinates given as ``extra`` (`EXTRA_FIELDS`)::

    log.warning("skipping bad record", extra={"topic": t, "partition": 3, "offset": 42})
    {"time": "2026-01-05T10:00:00.123+00:00", "level": "WARNING", "logger": "snapbus.view",
     "message": "skipping bad record", "topic": "t", "partition": 3, "offset": 42}
"""

from __future__ import annotations

import datetime
import json as _json
import logging
import sys
from typing import Any, TextIO

__all__ = ["EXTRA_FIELDS", "TEXT_FORMAT", "JsonFormatter", "configure_logging"]

EXTRA_FIELDS: tuple[str, ...] = ("session_id", "topic", "partition", "offset", "status")
"""Attributes a record may carry (``extra=``) that the JSON format includes when present."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The text format (the one the ``snapbus`` command line uses)."""


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object: time, level, logger, message, extras, exception.

    Values of `EXTRA_FIELDS` that are not JSON numbers, strings or booleans (a `uuid.UUID`,
    say) are written as their `str`.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a single-line JSON object."""
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return _json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    *,
    json: bool = False,
    level: int | str = logging.WARNING,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send log records of `level` and above to `stream` (default stderr), as text or JSON.

    Replaces the root logger's plain stream handlers (those `logging.basicConfig` or an
    earlier call installed) and leaves other handlers alone. aiokafka, which logs every failed
    connection attempt as an error, is limited to CRITICAL unless `level` is DEBUG: snapbus
    reports the outcome. Returns the installed handler.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    debug = root.getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    return handler
