"""The `WorkspaceSnapshot` value: the latest state of one workspace session.

It mirrors the upstream server's struct field for field. Values are immutable, slotted, equal
by value and hashable. Construction validates every field, so an invalid snapshot can never be
published: the three ids must be UUIDs (a `uuid.UUID` or a string in any form `uuid.UUID`
accepts; stored as `uuid.UUID`), every other field must be a `str`. `state` and `mode` are open
labels: values unknown to this version are kept, since newer pods may add some.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from snapbus.errors import ValidationError

__all__ = ["FIELDS", "ID_FIELDS", "TEXT_FIELDS", "WorkspaceSnapshot", "parse_uuid"]

ID_FIELDS: tuple[str, ...] = ("session_id", "repo_id", "changeset_id")
"""The fields holding UUIDs."""

TEXT_FIELDS: tuple[str, ...] = (
    "agent_id",
    "agent_name",
    "intent",
    "base_commit",
    "state",
    "mode",
)
"""The fields holding free text."""

FIELDS: tuple[str, ...] = (
    "session_id",
    "repo_id",
    "agent_id",
    "agent_name",
    "changeset_id",
    "intent",
    "base_commit",
    "state",
    "mode",
)
"""Every field, in schema order."""


_new = object.__new__
_set = object.__setattr__


_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}"
)


def parse_uuid(value: object, *, field: str = "id") -> uuid.UUID:
    """Return `value` as a `uuid.UUID`, or raise `ValidationError` naming `field`.

    Accepts a `uuid.UUID` or a string of 32 hex digits, plain or hyphenated 8-4-4-4-12, in
    any case, optionally in braces or after ``urn:uuid:``. Anything else is rejected (Python's
    `uuid.UUID` alone would also take stray ``0x``, ``+`` or ``_`` characters).
    """
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValidationError(f"{field} is empty; expected a UUID", field=field)
        core = value
        if core[:9].lower() == "urn:uuid:":
            core = core[9:]
        if core[:1] == "{" and core[-1:] == "}":
            core = core[1:-1]
        if _UUID_RE.fullmatch(core):
            return uuid.UUID(core)
        raise ValidationError(f"{field} is not a valid UUID: {value[:80]!r}", field=field)
    raise ValidationError(
        f"{field} must be a UUID or a UUID string, not {type(value).__name__}", field=field
    )


@dataclasses.dataclass(frozen=True, slots=True)
class WorkspaceSnapshot:
    """The latest state of one workspace session: an agent working on a repository."""

    session_id: uuid.UUID
    """The workspace (changeset) session id; the Kafka record key."""
    repo_id: uuid.UUID
    """The repository the workspace operates on."""
    agent_id: str
    """Authenticated agent identifier (an auth-provider user id or an API key prefix)."""
    agent_name: str
    """Human-readable name assigned by the server, e.g. ``agent-3``."""
    changeset_id: uuid.UUID
    """The changeset associated with the session."""
    intent: str
    """The user-provided intent text."""
    base_commit: str
    """The git commit hash that is the read-base of the workspace."""
    state: str
    """Lifecycle label (``active``, ``submitted``, ``merged``, ...); unknown labels are kept."""
    mode: str
    """``ephemeral`` or ``persistent``; unknown labels are kept."""

    def __post_init__(self) -> None:
        for name in ID_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, uuid.UUID):
                object.__setattr__(self, name, parse_uuid(value, field=name))
        for name in TEXT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValidationError(
                    f"{name} must be a string, not {type(value).__name__}", field=name
                )

    @classmethod
    def _from_record(cls, record: Mapping[str, Any]) -> WorkspaceSnapshot:
        """Build a snapshot from a decoded record: the codec's fast path.

        Validates like the constructor (ids parsed, text fields must be `str`, same order, same
        errors) but skips the generated ``__init__``: decoding is the hot path of every view.
        Extra keys in `record` are ignored.

        Raises:
            KeyError: a field is missing from `record`.
            ValidationError: a field is invalid (the error names it).
        """
        snapshot = _new(cls)
        for name in ID_FIELDS:
            _set(snapshot, name, parse_uuid(record[name], field=name))
        for name in TEXT_FIELDS:
            value = record[name]
            if not isinstance(value, str):
                raise ValidationError(
                    f"{name} must be a string, not {type(value).__name__}", field=name
                )
            _set(snapshot, name, value)
        return snapshot

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkspaceSnapshot:
        """Build a snapshot from a mapping holding exactly the snapshot's fields.

        Raises:
            ValidationError: a field is missing, unknown, or invalid (the error names it).
        """
        if not isinstance(data, Mapping):
            raise ValidationError(f"a snapshot must be a mapping, not {type(data).__name__}")
        missing = [name for name in FIELDS if name not in data]
        if missing:
            raise ValidationError(f"missing field(s): {', '.join(missing)}", field=missing[0])
        unknown = sorted(str(name) for name in data if name not in FIELDS)
        if unknown:
            raise ValidationError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
        return cls(**{name: data[name] for name in FIELDS})

    def to_dict(self) -> dict[str, str]:
        """Return the fields as a plain dict of strings (ids in canonical lowercase form)."""
        return {name: str(getattr(self, name)) for name in FIELDS}

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkspaceSnapshot:
        """Parse a JSON object holding exactly the snapshot's fields.

        Raises:
            ValidationError: the text is not a JSON object, or a field is missing or invalid.
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        """Return the snapshot as a compact JSON object (see `to_dict`)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @property
    def key(self) -> str:
        """The Kafka key: the canonical lowercase UUID string of `session_id`."""
        return str(self.session_id)

    def replace(self, **changes: Any) -> WorkspaceSnapshot:
        """Return a copy with some fields changed (validated like a new snapshot)."""
        return dataclasses.replace(self, **changes)
