"""`snapbus.logs`: the JSON format carries the record's coordinates; setup replaces handlers."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator

import pytest

from snapbus.logs import JsonFormatter, configure_logging


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    kafka_level = logging.getLogger("aiokafka").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(kafka_level)


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("snapbus.view", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_json_lines_carry_extra_fields() -> None:
    session = uuid.uuid4()
    line = JsonFormatter().format(record("skipping bad record at %s", "t[3]@42", topic="t",
                                         partition=3, offset=42, session_id=session,
                                         unrelated="not included"))
    entry = json.loads(line)
    assert entry["message"] == "skipping bad record at t[3]@42"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "snapbus.view"
    assert (entry["topic"], entry["partition"], entry["offset"]) == ("t", 3, 42)
    assert entry["session_id"] == str(session)
    assert "unrelated" not in entry
    assert entry["time"].endswith("+00:00")
    assert "\n" not in line


def test_json_lines_carry_exceptions() -> None:
    made = record("failed")
    error = ValueError("boom")
    made.exc_info = (ValueError, error, None)
    entry = json.loads(JsonFormatter().format(made))
    assert "ValueError: boom" in entry["exception"]
    assert "topic" not in entry


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_logging_replaces_plain_handlers_and_is_quiet_by_default() -> None:
    logging.basicConfig(force=True)  # what the command line sets up first
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    plain = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    assert len(plain) == 1  # basicConfig's handler was replaced, not doubled
    log = logging.getLogger("snapbus.test")
    log.info("not shown at the default level")
    log.warning("shown", extra={"topic": "t", "partition": 0, "offset": 7})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["offset"] == 7
    assert logging.getLogger("aiokafka").level == logging.CRITICAL

    out = io.StringIO()
    configure_logging(level="DEBUG", stream=out)
    log.debug("now shown as text")
    assert out.getvalue().rstrip().endswith("DEBUG snapbus.test: now shown as text")
    assert logging.getLogger("aiokafka").level == logging.DEBUG
