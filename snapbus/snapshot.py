"""The `WorkspaceSnapshot` value: the latest state of one workspace session.

It mirrors the upstream server's struct field for field. Values are immutable, slotted, equal
by value and hashable. Construction validates every field, so an invalid snapshot can never be
published: the three ids must be UUIDs (a `uuid.UUID`, or a string `parse_uuid` accepts),
every other field must be a `str`. `state` and `mode` are open labels: values unknown to this
version are kept, since newer pods may add some.

Inside, the ids are kept as canonical lowercase strings (the form the wire carries and the
Kafka key uses) and turned into `uuid.UUID` on access: decoding a record then needs no UUID
parsing, and a view holding millions of snapshots shares the key string with its index.
Repeated labels (repository, agent, state, mode) are interned so sessions share them.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Mapping
from typing import Any, NoReturn

from snapbus.errors import ValidationError

__all__ = ["FIELDS", "ID_FIELDS", "INPUT_DEFAULTS", "TEXT_FIELDS", "WorkspaceSnapshot",
           "parse_uuid"]

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

INPUT_DEFAULTS: dict[str, str] = {
    "agent_name": "",
    "intent": "",
    "base_commit": "",
    "state": "active",
    "mode": "ephemeral",
}
"""What `WorkspaceSnapshot.from_input` fills in for an omitted field (the ids get new UUIDs)."""

_NON_EMPTY_INPUT = ("agent_id", "state", "mode")

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}"
)
_CANONICAL_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_canonical_match = _CANONICAL_RE.fullmatch
_intern = sys.intern
_set = object.__setattr__
_new = object.__new__


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


def _is_canonical(text: str) -> bool:
    """Whether `text` is a UUID in canonical lowercase hyphenated form (no parsing)."""
    return _canonical_match(text) is not None


def _canonical_id(value: object, field: str) -> str:
    """Return the canonical lowercase string of a UUID given as text or `uuid.UUID`."""
    if type(value) is str and _canonical_match(value):
        return value
    return str(parse_uuid(value, field=field))


def _wire_id(value: object, field: str) -> NoReturn:
    """Raise the `ValidationError` for an id field of a record that is not a UUID in
    canonical form (the wire contract's only form; see `WorkspaceSnapshot._from_record`)."""
    _canonical_id(value, field)  # (raises when it is no UUID at all)
    raise ValidationError(
        f"{field} is not a UUID in canonical form (lowercase, hyphenated): {str(value)[:80]!r}",
        field=field)


def _check_wire_ids(record: Mapping[str, Any]) -> None:
    """Check that the id fields present in a record about to be encoded are UUIDs in
    canonical form, the only form the wire contract allows (the bytes on the wire are then
    what other languages' UUID types write).

    Raises:
        ValidationError: an id field holds anything else (the error names it).
    """
    for field in ID_FIELDS:
        if field in record:
            value = record[field]
            if not (type(value) is str and _canonical_match(value)):
                _wire_id(value, field)


def _text(value: object, field: str) -> str:
    if type(value) is not str and not isinstance(value, str):
        raise ValidationError(f"{field} must be a string, not {type(value).__name__}",
                              field=field)
    return str(value)


def _fill(snapshot: WorkspaceSnapshot, sid: str, rid: str, agent_id: str, agent_name: str,
          cid: str, intent: str, base_commit: str, state: str, mode: str) -> WorkspaceSnapshot:
    """Set a snapshot's fields from validated values, interning the repeated labels."""
    _set(snapshot, "_session_id", sid)
    _set(snapshot, "_repo_id", _intern(rid))
    _set(snapshot, "agent_id", _intern(agent_id))
    _set(snapshot, "agent_name", _intern(agent_name))
    _set(snapshot, "_changeset_id", cid)
    _set(snapshot, "intent", intent)
    _set(snapshot, "base_commit", base_commit)
    _set(snapshot, "state", _intern(state))
    _set(snapshot, "mode", _intern(mode))
    return snapshot


class WorkspaceSnapshot:
    """The latest state of one workspace session: an agent working on a repository.

    Attributes:
        session_id: the workspace (changeset) session id; the Kafka record key.
        repo_id: the repository the workspace operates on.
        agent_id: authenticated agent identifier (an auth-provider user id or API key prefix).
        agent_name: human-readable name assigned by the server, e.g. ``agent-3``.
        changeset_id: the changeset associated with the session.
        intent: the user-provided intent text.
        base_commit: the git commit hash that is the read-base of the workspace.
        state: lifecycle label (``active``, ``submitted``, ``merged``, ...); unknown labels
            are kept.
        mode: ``ephemeral`` or ``persistent``; unknown labels are kept.

    Raises:
        ValidationError: on construction, when a field is invalid (the error names it).
    """

    __slots__ = ("_changeset_id", "_repo_id", "_session_id", "agent_id", "agent_name",
                 "base_commit", "intent", "mode", "state")

    _session_id: str
    _repo_id: str
    _changeset_id: str
    agent_id: str
    agent_name: str
    intent: str
    base_commit: str
    state: str
    mode: str

    def __init__(
        self,
        session_id: uuid.UUID | str,
        repo_id: uuid.UUID | str,
        agent_id: str,
        agent_name: str,
        changeset_id: uuid.UUID | str,
        intent: str,
        base_commit: str,
        state: str,
        mode: str,
    ) -> None:
        _fill(
            self,
            _canonical_id(session_id, "session_id"),
            _canonical_id(repo_id, "repo_id"),
            _text(agent_id, "agent_id"),
            _text(agent_name, "agent_name"),
            _canonical_id(changeset_id, "changeset_id"),
            _text(intent, "intent"),
            _text(base_commit, "base_commit"),
            _text(state, "state"),
            _text(mode, "mode"),
        )

    @classmethod
    def _from_record(cls, record: Mapping[str, Any]) -> WorkspaceSnapshot:
        """Build a snapshot from a decoded record (ids as strings): the codec's fast path.

        Validates like the constructor, except that the ids must already be in canonical
        form (lowercase, hyphenated, 36 characters), the only form the wire contract allows:
        a value holding another spelling is bad, never rewritten (other readers would see the
        raw text). Extra keys in `record` are ignored.

        Raises:
            KeyError: a field is missing from `record`.
            ValidationError: a field is invalid (the error names it).
        """
        sid, rid, cid = record["session_id"], record["repo_id"], record["changeset_id"]
        agent_id, agent_name = record["agent_id"], record["agent_name"]
        intent, base_commit = record["intent"], record["base_commit"]
        state, mode = record["state"], record["mode"]
        # the common case costs one regex per id and one type check per text; anything else
        # goes through the constructor's checks, in the constructor's order
        if not (type(sid) is str and _canonical_match(sid)):
            _wire_id(sid, "session_id")
        if not (type(rid) is str and _canonical_match(rid)):
            _wire_id(rid, "repo_id")
        if type(agent_id) is not str or type(agent_name) is not str:
            _text(agent_id, "agent_id")
            _text(agent_name, "agent_name")
        if not (type(cid) is str and _canonical_match(cid)):
            _wire_id(cid, "changeset_id")
        if (type(intent) is not str or type(base_commit) is not str
                or type(state) is not str or type(mode) is not str):
            for name in ("intent", "base_commit", "state", "mode"):
                _text(record[name], name)
        return _fill(_new(cls), sid, rid, agent_id, agent_name, cid, intent, base_commit,
                     state, mode)

    @classmethod
    def _from_trusted(cls, values: tuple[Any, ...]) -> WorkspaceSnapshot:
        """Rebuild a snapshot from `_values()` output that snapbus itself wrote and verified
        (a checkpoint): no validation, labels interned."""
        return _fill(_new(cls), *values[:9])

    # ids: canonical strings inside, UUIDs outside

    @property
    def session_id(self) -> uuid.UUID:
        """The workspace (changeset) session id; the Kafka record key."""
        return uuid.UUID(self._session_id)

    @property
    def repo_id(self) -> uuid.UUID:
        """The repository the workspace operates on."""
        return uuid.UUID(self._repo_id)

    @property
    def changeset_id(self) -> uuid.UUID:
        """The changeset associated with the session."""
        return uuid.UUID(self._changeset_id)

    @property
    def key(self) -> str:
        """The Kafka key: the canonical lowercase UUID string of `session_id`."""
        return self._session_id

    @property
    def repo_key(self) -> str:
        """The canonical lowercase UUID string of `repo_id`."""
        return self._repo_id

    # value semantics

    def _values(self) -> tuple[str, ...]:
        return (self._session_id, self._repo_id, self.agent_id, self.agent_name,
                self._changeset_id, self.intent, self.base_commit, self.state, self.mode)

    def __eq__(self, other: object) -> bool:
        if type(other) is not WorkspaceSnapshot:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}={getattr(self, name)!r}" for name in FIELDS)
        return f"WorkspaceSnapshot({parts})"

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"WorkspaceSnapshot is immutable; use replace({name}=...)")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("WorkspaceSnapshot is immutable")

    def __reduce__(self) -> tuple[Any, tuple[str, ...]]:
        return (WorkspaceSnapshot, self._values())

    def __copy__(self) -> WorkspaceSnapshot:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> WorkspaceSnapshot:
        return self

    # conversions

    @classmethod
    def from_input(cls, data: Mapping[str, Any]) -> WorkspaceSnapshot:
        """Build a snapshot from what a user typed: the one rule of every entry point.

        The command line's flags, its JSON input and the sidecar's PUT all come here.
        ``repo_id`` and ``agent_id`` are required; an omitted ``session_id`` or
        ``changeset_id`` gets a new UUID, any other omitted field its `INPUT_DEFAULTS` value.
        ``agent_id``, ``state`` and ``mode`` must not be blank. (Records read from the topic
        are not held to this: a reader keeps whatever other writers published.)

        Raises:
            ValidationError: a field is missing, unknown, blank or invalid (the error names it).
        """
        if not isinstance(data, Mapping):
            raise ValidationError(f"a snapshot must be a mapping, not {type(data).__name__}")
        missing = [name for name in ("repo_id", "agent_id") if data.get(name) is None]
        if missing:
            raise ValidationError(f"missing field(s): {', '.join(missing)}", field=missing[0])
        values = {"session_id": uuid.uuid4(), "changeset_id": uuid.uuid4(), **INPUT_DEFAULTS,
                  **data}
        for name in _NON_EMPTY_INPUT:
            if isinstance(values[name], str) and not values[name].strip():
                raise ValidationError(f"{name} is empty", field=name)
        return cls.from_dict(values)

    def updated(self, changes: Mapping[str, Any]) -> WorkspaceSnapshot:
        """This snapshot with some fields changed, checked by the input rule (`from_input`):
        what ``snapbus update`` and the sidecar's PATCH publish.

        Raises:
            ValidationError: a changed field is unknown, blank or invalid, or the result
                breaks the input rule.
        """
        return type(self).from_input({**self.to_dict(), **changes})

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
        return {
            "session_id": self._session_id,
            "repo_id": self._repo_id,
            "agent_id": self.agent_id,
            "agent_name": self.agent_name,
            "changeset_id": self._changeset_id,
            "intent": self.intent,
            "base_commit": self.base_commit,
            "state": self.state,
            "mode": self.mode,
        }

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

    def replace(self, **changes: Any) -> WorkspaceSnapshot:
        """Return a copy with some fields changed (validated like a new snapshot).

        Raises:
            ValidationError: a changed field is invalid, or not a snapshot field.
        """
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ValidationError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
        return WorkspaceSnapshot(**{**self.to_dict(), **changes})
