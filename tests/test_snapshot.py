"""WorkspaceSnapshot: construction, validation, immutability, conversions."""

from __future__ import annotations

import copy
import inspect
import json
import pickle
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import snapbus
from snapbus.snapshot import FIELDS, ID_FIELDS, TEXT_FIELDS, WorkspaceSnapshot, parse_uuid
from tests.strategies import snapshots

SESSION = "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b"
REPO = "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3"
CHANGESET = "deadbeef-0000-4000-8000-00000000cafe"


def fields(**changes: Any) -> dict[str, Any]:
    """A valid set of constructor arguments, with `changes` applied."""
    base: dict[str, Any] = {
        "session_id": SESSION,
        "repo_id": REPO,
        "agent_id": "auth0|5f2b9c",
        "agent_name": "agent-3",
        "changeset_id": CHANGESET,
        "intent": "Refactor the parser 🚀",
        "base_commit": "3b18e512dba79e4c8300dd08aeb37f8e728b8dad",
        "state": "active",
        "mode": "ephemeral",
    }
    base.update(changes)
    return base


def make(**changes: Any) -> WorkspaceSnapshot:
    return WorkspaceSnapshot(**fields(**changes))


# --- construction ----------------------------------------------------------------------------


def test_field_order_matches_the_schema_order() -> None:
    assert tuple(make().to_dict()) == FIELDS
    assert tuple(inspect.signature(WorkspaceSnapshot).parameters) == FIELDS
    assert set(ID_FIELDS) | set(TEXT_FIELDS) == set(FIELDS)
    assert not set(ID_FIELDS) & set(TEXT_FIELDS)


def test_ids_given_as_strings_are_stored_as_uuid_objects() -> None:
    snap = make()
    for name in ID_FIELDS:
        assert type(getattr(snap, name)) is uuid.UUID
    assert snap.session_id == uuid.UUID(SESSION)
    assert snap.repo_id == uuid.UUID(REPO)
    assert snap.changeset_id == uuid.UUID(CHANGESET)


def test_uuid_objects_are_kept_as_equal_values() -> None:
    session = uuid.uuid4()
    snap = make(session_id=session)
    assert snap.session_id == session
    assert snap.key == str(session)


@pytest.mark.parametrize(
    "form",
    [
        SESSION.upper(),
        "{" + SESSION + "}",
        "{" + SESSION.upper() + "}",
        SESSION.replace("-", ""),
        "urn:uuid:" + SESSION,
    ],
    ids=["upper", "braces", "upper-braces", "hex", "urn"],
)
def test_non_canonical_uuid_forms_are_accepted_and_canonicalised(form: str) -> None:
    snap = make(session_id=form, repo_id=form, changeset_id=form)
    assert snap == make(session_id=SESSION, repo_id=SESSION, changeset_id=SESSION)
    assert snap.key == SESSION
    assert snap.to_dict()["repo_id"] == SESSION


def test_text_fields_are_kept_verbatim() -> None:
    text = "  spaces kept \n\t 🏳️‍🌈 𠜎 \x00 "
    snap = make(intent=text, agent_name="", base_commit="")
    assert snap.intent == text
    assert snap.agent_name == ""
    assert snap.base_commit == ""


@pytest.mark.parametrize(
    ("state", "mode"),
    [("hibernating", "shared"), ("", ""), ("ACTIVE", "Persistent"), ("état", "模式")],
)
def test_unknown_state_and_mode_labels_are_accepted(state: str, mode: str) -> None:
    snap = make(state=state, mode=mode)
    assert (snap.state, snap.mode) == (state, mode)
    assert WorkspaceSnapshot.from_json(snap.to_json()) == snap


# --- rejections ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ID_FIELDS)
@pytest.mark.parametrize("empty", ["", "   ", "\t\n"])
def test_empty_id_is_rejected_naming_the_field(name: str, empty: str) -> None:
    with pytest.raises(snapbus.ValidationError, match="empty") as info:
        make(**{name: empty})
    assert info.value.field == name


@pytest.mark.parametrize("name", ID_FIELDS)
@pytest.mark.parametrize(
    "bad",
    [
        "not-a-uuid",
        "1234",
        SESSION[:-1],  # 31 hex digits
        SESSION + "0",  # 33 hex digits
        SESSION[:-1] + "g",  # not hex
        SESSION.replace("-", "_"),
        "urn:isbn:" + SESSION,
    ],
)
def test_malformed_uuid_is_rejected_naming_the_field(name: str, bad: str) -> None:
    with pytest.raises(snapbus.ValidationError, match="not a valid UUID") as info:
        make(**{name: bad})
    assert info.value.field == name
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


@pytest.mark.parametrize("name", ID_FIELDS)
@pytest.mark.parametrize("bad", [12345, None, SESSION.encode(), 1.5, [SESSION]])
def test_id_of_wrong_type_is_rejected_naming_the_field(name: str, bad: object) -> None:
    with pytest.raises(snapbus.ValidationError, match="must be a UUID") as info:
        make(**{name: bad})
    assert info.value.field == name


@pytest.mark.parametrize("name", TEXT_FIELDS)
@pytest.mark.parametrize("bad", [42, None, b"bytes", 3.0, ["x"], uuid.UUID(SESSION)])
def test_non_string_text_field_is_rejected_naming_the_field(name: str, bad: object) -> None:
    with pytest.raises(snapbus.ValidationError, match="must be a string") as info:
        make(**{name: bad})
    assert info.value.field == name
    assert type(bad).__name__ in str(info.value)


def test_the_first_invalid_id_is_reported_before_text_fields() -> None:
    with pytest.raises(snapbus.ValidationError) as info:
        make(repo_id="nope", intent=7)
    assert info.value.field == "repo_id"


def test_parse_uuid_names_the_given_field() -> None:
    assert parse_uuid(SESSION.upper(), field="x") == uuid.UUID(SESSION)
    with pytest.raises(snapbus.ValidationError) as info:
        parse_uuid("zz", field="custom")
    assert info.value.field == "custom"


def test_replace_validates_like_construction() -> None:
    snap = make()
    changed = snap.replace(state="merged", repo_id=SESSION.upper())
    assert changed.state == "merged"
    assert changed.repo_id == uuid.UUID(SESSION)
    assert snap.state == "active"  # the original is untouched
    with pytest.raises(snapbus.ValidationError) as info:
        snap.replace(mode=None)
    assert info.value.field == "mode"
    with pytest.raises(snapbus.ValidationError) as info:
        snap.replace(changeset_id="")
    assert info.value.field == "changeset_id"


# --- immutability, slots, equality -----------------------------------------------------------


def test_snapshot_is_frozen() -> None:
    snap = make()
    with pytest.raises(AttributeError, match="immutable"):
        snap.state = "merged"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del snap.intent
    with pytest.raises(AttributeError, match="immutable"):
        snap.session_id = uuid.uuid4()  # type: ignore[misc]
    assert snap.state == "active"


def test_snapshot_is_slotted() -> None:
    snap = make()
    assert not hasattr(snap, "__dict__")
    assert {name.lstrip("_") for name in WorkspaceSnapshot.__slots__} == set(FIELDS)
    with pytest.raises(AttributeError):
        snap.extra = 1  # type: ignore[attr-defined]
    assert not hasattr(snap, "extra")


def test_equality_and_hash_are_by_value() -> None:
    a = make()
    b = make(
        session_id=uuid.UUID(SESSION), repo_id=REPO.upper(), changeset_id="{" + CHANGESET + "}"
    )
    assert a == b
    assert a is not b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != make(state="merged")
    assert a != make(intent=a.intent + " ")
    assert a != make(session_id=uuid.uuid4())
    as_object: object = a
    assert as_object != a.to_dict()


def test_snapshot_survives_copy_and_pickle() -> None:
    snap = make()
    assert copy.copy(snap) == snap
    assert copy.deepcopy(snap) == snap
    assert pickle.loads(pickle.dumps(snap)) == snap


# --- conversions -----------------------------------------------------------------------------


def test_to_dict_holds_canonical_strings() -> None:
    snap = make(session_id=SESSION.upper())
    data = snap.to_dict()
    assert list(data) == list(FIELDS)
    assert data == {**fields(), "session_id": SESSION}
    assert all(type(v) is str for v in data.values())


def test_key_is_the_canonical_lowercase_session_id() -> None:
    snap = make(session_id="{" + SESSION.upper() + "}")
    assert snap.key == SESSION
    assert snap.key == str(snap.session_id)


def test_to_json_is_compact_and_keeps_unicode() -> None:
    snap = make(intent="ship 🚀 naïvely")
    text = snap.to_json()
    assert "🚀" in text
    assert ", " not in text
    assert ": " not in text
    assert json.loads(text) == snap.to_dict()


def test_from_json_accepts_bytes() -> None:
    snap = make()
    assert WorkspaceSnapshot.from_json(snap.to_json().encode("utf-8")) == snap


@given(snapshots())
def test_dict_and_json_round_trips(snap: WorkspaceSnapshot) -> None:
    assert WorkspaceSnapshot.from_dict(snap.to_dict()) == snap
    assert WorkspaceSnapshot.from_json(snap.to_json()) == snap
    assert WorkspaceSnapshot(**snap.to_dict()) == snap  # type: ignore[arg-type]
    assert snap.key == str(snap.session_id)


def test_from_dict_accepts_any_mapping_and_uuid_objects() -> None:
    from types import MappingProxyType

    data = {**fields(), "session_id": uuid.UUID(SESSION)}
    assert WorkspaceSnapshot.from_dict(MappingProxyType(data)) == make()


@pytest.mark.parametrize("name", FIELDS)
def test_from_dict_missing_field_is_named(name: str) -> None:
    data = fields()
    del data[name]
    with pytest.raises(snapbus.ValidationError, match="missing") as info:
        WorkspaceSnapshot.from_dict(data)
    assert info.value.field == name


def test_from_dict_unknown_field_is_named() -> None:
    with pytest.raises(snapbus.ValidationError, match="unknown") as info:
        WorkspaceSnapshot.from_dict({**fields(), "priority": 3})
    assert info.value.field == "priority"


def test_from_dict_invalid_value_is_named() -> None:
    with pytest.raises(snapbus.ValidationError) as info:
        WorkspaceSnapshot.from_dict(fields(agent_id=None))
    assert info.value.field == "agent_id"


@pytest.mark.parametrize("data", [None, [], "text", 42, [("session_id", SESSION)]])
def test_from_dict_rejects_non_mappings(data: Any) -> None:
    with pytest.raises(snapbus.ValidationError, match="mapping") as info:
        WorkspaceSnapshot.from_dict(data)
    assert info.value.field is None


@pytest.mark.parametrize("text", ["", "{", "not json", '{"session_id": }', b"\xff\xfe\x00"])
def test_from_json_rejects_invalid_json(text: str | bytes) -> None:
    with pytest.raises(snapbus.ValidationError, match="not valid JSON") as info:
        WorkspaceSnapshot.from_json(text)
    assert info.value.field is None


@pytest.mark.parametrize("text", ["[]", "null", "3", '"x"'])
def test_from_json_rejects_json_that_is_not_an_object(text: str) -> None:
    with pytest.raises(snapbus.ValidationError, match="mapping"):
        WorkspaceSnapshot.from_json(text)


def test_from_json_names_the_invalid_field() -> None:
    bad = json.dumps(fields(changeset_id="xyz"))
    with pytest.raises(snapbus.ValidationError) as info:
        WorkspaceSnapshot.from_json(bad)
    assert info.value.field == "changeset_id"
    missing = {k: v for k, v in fields().items() if k != "mode"}
    with pytest.raises(snapbus.ValidationError) as info:
        WorkspaceSnapshot.from_json(json.dumps(missing))
    assert info.value.field == "mode"


def test_validation_error_is_a_snapbus_error() -> None:
    with pytest.raises(snapbus.SnapbusError):
        make(session_id="")


# --- the codec's fast constructor ------------------------------------------------------------

_VALID_IDS = st.one_of(
    st.uuids(),
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: "{" + u.hex + "}"),
)
_INVALID_IDS = st.one_of(
    st.sampled_from(["", "  ", "not-a-uuid", SESSION[:-1]]),
    st.text(max_size=40),
    st.none() | st.integers() | st.binary(max_size=16),
)
_INVALID_TEXTS = st.none() | st.integers() | st.binary(max_size=16) | st.uuids()
# Mostly valid values, so that both outcomes (a snapshot, an error) are common.
_ID_VALUES = st.integers(0, 9).flatmap(lambda n: _VALID_IDS if n else _INVALID_IDS)
_TEXT_VALUES = st.integers(0, 19).flatmap(lambda n: st.text(max_size=40) if n else _INVALID_TEXTS)
_RECORDS = st.fixed_dictionaries(
    {name: _ID_VALUES if name in ID_FIELDS else _TEXT_VALUES for name in FIELDS}
)


def _outcome(build: Any, record: dict[str, Any]) -> Any:
    try:
        return build(record)
    except snapbus.ValidationError as exc:
        return ("ValidationError", exc.field, str(exc))


@given(snapshots())
def test_from_record_builds_the_same_value_as_the_constructor(snap: WorkspaceSnapshot) -> None:
    built = WorkspaceSnapshot._from_record(snap.to_dict())
    assert built == snap
    assert hash(built) == hash(snap)
    assert all(type(getattr(built, name)) is uuid.UUID for name in ID_FIELDS)
    assert pickle.loads(pickle.dumps(built)) == snap
    with pytest.raises(AttributeError):
        built.state = "merged"  # type: ignore[misc]


@given(_RECORDS)
def test_from_record_validates_like_the_constructor_but_takes_only_canonical_ids(
    record: dict[str, Any],
) -> None:
    # The same snapshot, or an error naming the same field, for any input, except that an id
    # spelled otherwise than in canonical form (uppercase, braces, a uuid.UUID), which the
    # constructor accepts, is an error in a record read from the wire: it is not rewritten.
    def canonical(value: Any) -> bool:
        return type(value) is str and _parses(value) and str(parse_uuid(value)) == value

    wire = {name: value if name not in ID_FIELDS or canonical(value) else None
            for name, value in record.items()}
    ours = _outcome(WorkspaceSnapshot._from_record, record)
    theirs = _outcome(lambda r: WorkspaceSnapshot(**r), wire)
    assert ours[:2] == theirs[:2] if isinstance(ours, tuple) else ours == theirs
    if isinstance(ours, tuple) and ours[1] in ID_FIELDS and _parses(record[ours[1]]):
        assert "canonical form" in ours[2]


def _parses(value: Any) -> bool:
    try:
        parse_uuid(value)
    except snapbus.ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    "spelling",
    [SESSION.upper(), "{" + SESSION + "}", SESSION.replace("-", ""), "urn:uuid:" + SESSION],
)
@pytest.mark.parametrize("field", ID_FIELDS)
def test_a_record_with_an_id_not_in_canonical_form_is_not_rewritten(
    field: str, spelling: str
) -> None:
    record = {**fields(), field: spelling}
    assert str(WorkspaceSnapshot(**record).to_dict()[field]) == SESSION  # the API accepts it
    with pytest.raises(snapbus.ValidationError, match="canonical form") as info:
        WorkspaceSnapshot._from_record(record)  # the wire does not
    assert info.value.field == field


def test_from_record_ignores_extra_keys_and_needs_every_field() -> None:
    assert WorkspaceSnapshot._from_record({**fields(), "priority": 3}) == make()
    incomplete = fields()
    del incomplete["mode"]
    with pytest.raises(KeyError):
        WorkspaceSnapshot._from_record(incomplete)


@pytest.mark.parametrize(
    "text",
    [
        "0x" + "1" * 30,
        "+" + "0" * 31,
        "1" * 16 + "_" + "1" * 15,
        "{12345678-1234-1234-1234-123456789012",
        "12345678-1234-1234-1234-1234567890123",
        "1234567-81234-1234-1234-123456789012",
        " 12345678-1234-1234-1234-123456789012",
    ],
)
def test_parse_uuid_rejects_forms_python_would_stretch_to_accept(text: str) -> None:
    with pytest.raises(snapbus.ValidationError, match="not a valid UUID"):
        parse_uuid(text, field="session_id")
