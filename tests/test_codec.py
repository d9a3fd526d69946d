"""The wire format: keys, single-object Avro values, decode errors, schema evolution.

No broker: everything here is pure encoding. The golden bytes below lock the wire format; a
change that breaks them breaks every pod and every consumer in another language that reads the
topic, so update them only with a new schema version.
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, get_args

import avro.io
import avro.schema
import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snapbus
from snapbus.codec import (
    HEADER_SIZE,
    MARKER,
    Codec,
    decode,
    decode_key,
    default_codec,
    encode,
    encode_key,
)
from snapbus.errors import DecodeError, DecodeReason, SchemaError
from snapbus.schema import (
    CURRENT_SCHEMA_FILE,
    Schema,
    SchemaStore,
    check_compatibility,
    load_schema,
    schema_dir,
)
from snapbus.snapshot import FIELDS, ID_FIELDS, WorkspaceSnapshot
from tests.strategies import snapshots

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_SCHEMAS = Path(__file__).resolve().parent / "schemas"
V2_FILE = TEST_SCHEMAS / "workspace_snapshot_v2.avsc"
NO_DEFAULT_FILE = TEST_SCHEMAS / "workspace_snapshot_v2_no_default.avsc"
TYPE_CHANGE_FILE = TEST_SCHEMAS / "workspace_snapshot_v2_type_change.avsc"

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- an independent CRC-64-AVRO, written from the Avro specification --------------------------

CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return table


CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint of the spec's "Schema Fingerprints" section."""
    fp = CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


# The Parsing Canonical Form of schemas/workspace_snapshot.avsc, written by hand from the spec's
# rules: doc and logicalType stripped ([STRIP]), {"type": "string"} -> "string" ([PRIMITIVES]),
# the namespace folded into the full name ([FULLNAMES]), attributes in name/type/fields order.
CANONICAL_FORM_V1 = (
    '{"name":"dev.snapbus.v1.WorkspaceSnapshot","type":"record","fields":['
    '{"name":"session_id","type":"string"},'
    '{"name":"repo_id","type":"string"},'
    '{"name":"agent_id","type":"string"},'
    '{"name":"agent_name","type":"string"},'
    '{"name":"changeset_id","type":"string"},'
    '{"name":"intent","type":"string"},'
    '{"name":"base_commit","type":"string"},'
    '{"name":"state","type":"string"},'
    '{"name":"mode","type":"string"}]}'
)

GOLDEN_SNAPSHOT = WorkspaceSnapshot(
    session_id=uuid.UUID("6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b"),
    repo_id=uuid.UUID("0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3"),
    agent_id="auth0|5f2b9c",
    agent_name="agent-3",
    changeset_id=uuid.UUID("deadbeef-0000-4000-8000-00000000cafe"),
    intent="Refactor the parser 🚀",
    base_commit="3b18e512dba79e4c8300dd08aeb37f8e728b8dad",
    state="active",
    mode="ephemeral",
)
GOLDEN_HEX = (
    "c301c2c55d77c61203934836663163326233612d346435652d346636302d3861"
    "37622d3963306431653266336134624830613162326333642d346535662d3461"
    "36622d386337642d3865396661306231633264331861757468307c3566326239"
    "630e6167656e742d334864656164626565662d303030302d343030302d383030"
    "302d303030303030303063616665305265666163746f72207468652070617273"
    "657220f09f9a8050336231386535313264626137396534633833303064643038"
    "616562333766386537323862386461640c61637469766512657068656d657261"
    "6c"
)
GOLDEN = bytes.fromhex(GOLDEN_HEX)
V1_FINGERPRINT_HEX = "c2c55d77c6120393"


def strip_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [strip_logical_types(v) for v in node]
    return node


def current_schema() -> Schema:
    return load_schema(schema_dir() / CURRENT_SCHEMA_FILE)


def apache_schema(raw: Any) -> Any:
    return avro.schema.parse(json.dumps(raw))


def plain_body(record: dict[str, Any], schema: Schema | None = None) -> bytes:
    """An Avro body written by fastavro directly, ids as plain strings (no validation)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, (schema or current_schema()).parsed, record)
    return buf.getvalue()


def frame(body: bytes, fingerprint: bytes | None = None) -> bytes:
    return MARKER + (fingerprint or current_schema().fingerprint) + body


def decode_or_error(data: Any, codec: Codec | None = None) -> WorkspaceSnapshot | DecodeError:
    """Decode, returning the DecodeError instead of raising it; any other exception escapes."""
    try:
        return (codec or default_codec()).decode(data)
    except DecodeError as exc:
        return exc


def assert_decodes_or_decode_error(data: Any, codec: Codec | None = None) -> None:
    result = decode_or_error(data, codec)
    if isinstance(result, DecodeError):
        assert result.reason in get_args(DecodeReason)
        assert str(result)
    else:
        assert isinstance(result, WorkspaceSnapshot)
        assert decode(encode(result)) == result


# --- fingerprint and golden bytes -------------------------------------------------------------


def test_independent_crc64_matches_the_spec_example() -> None:
    # The spec's example: the fingerprint of the schema "int".
    assert crc64_avro(b'"int"') == 8247732601305521295
    assert apache_schema("int").fingerprint() == (8247732601305521295).to_bytes(8, "little")


def test_canonical_form_follows_the_spec() -> None:
    assert current_schema().canonical_form == CANONICAL_FORM_V1


def test_fingerprint_is_crc64_avro_of_the_canonical_form() -> None:
    expected = crc64_avro(CANONICAL_FORM_V1.encode("utf-8")).to_bytes(8, "little")
    assert current_schema().fingerprint == expected
    assert expected.hex() == V1_FINGERPRINT_HEX


def test_golden_bytes_lock_the_wire_format() -> None:
    data = encode(GOLDEN_SNAPSHOT)
    assert data == GOLDEN
    assert data[0:2] == b"\xc3\x01"
    assert data[2:10] == crc64_avro(CANONICAL_FORM_V1.encode()).to_bytes(8, "little")
    assert data[2:10] == bytes.fromhex(V1_FINGERPRINT_HEX)
    assert decode(GOLDEN) == GOLDEN_SNAPSHOT


def test_golden_body_is_plain_avro_binary() -> None:
    # Each string is a zigzag varint length then UTF-8 bytes: 36-byte ids have length 0x48 (72).
    body = GOLDEN[HEADER_SIZE:]
    assert body[0] == 0x48
    assert body[1:37] == b"6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b"
    assert body.endswith(b"\x12ephemeral")  # 0x12 = zigzag(9)
    assert "🚀".encode() in body


# --- round trips ------------------------------------------------------------------------------


@given(snapshots())
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(snap: WorkspaceSnapshot) -> None:
    data = encode(snap)
    assert isinstance(data, bytes)
    assert data[:HEADER_SIZE] == MARKER + bytes.fromhex(V1_FINGERPRINT_HEX)
    decoded = decode(data)
    assert decoded == snap
    assert all(type(getattr(decoded, name)) is uuid.UUID for name in ID_FIELDS)
    assert encode(decoded) == data  # deterministic
    assert decode(bytearray(data)) == snap
    assert decode(memoryview(data)) == snap


def test_round_trip_of_corner_values() -> None:
    snap = GOLDEN_SNAPSHOT.replace(
        agent_id="",
        agent_name="👩\u200d💻" * 3,
        intent="\U0010ffff\x00𠜎" + "x" * 10_000,
        base_commit="",
        state="",
        mode="\u0301",
    )
    assert decode(encode(snap)) == snap


def test_codec_instances_agree_with_module_functions() -> None:
    codec = Codec()
    assert codec.encode(GOLDEN_SNAPSHOT) == GOLDEN
    assert codec.decode(GOLDEN) == GOLDEN_SNAPSHOT
    assert codec.decode_record(GOLDEN) == GOLDEN_SNAPSHOT.to_dict()
    assert default_codec() is default_codec()


def test_unencodable_text_is_a_validation_error_not_a_crash() -> None:
    snap = GOLDEN_SNAPSHOT.replace(intent="lone surrogate \ud800")
    with pytest.raises(snapbus.ValidationError):
        encode(snap)


def test_encode_record_rejects_records_not_matching_the_schema() -> None:
    with pytest.raises(snapbus.ValidationError, match="session_id"):
        default_codec().encode_record({})
    with pytest.raises(snapbus.ValidationError):
        default_codec().encode_record({**GOLDEN_SNAPSHOT.to_dict(), "intent": 42})


# --- interoperability with the Apache Avro library ------------------------------------------


def test_apache_avro_computes_the_same_canonical_form_and_fingerprint() -> None:
    # Apache Avro's Python library (1.11/1.12) writes {"type":"string"} for a string with a
    # logicalType in the canonical form, against the spec's [PRIMITIVES] rule and unlike Java's
    # SchemaNormalization; fed the schema without logical-type annotations it follows the spec.
    # snapbus uses the spec's form, which Java and fastavro also produce.
    current = current_schema()
    theirs = apache_schema(strip_logical_types(current.raw))
    assert theirs.canonical_form == CANONICAL_FORM_V1
    assert theirs.fingerprint() == current.fingerprint


@given(snapshots())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_apache_avro_reads_the_body_snapbus_wrote(snap: WorkspaceSnapshot) -> None:
    schema = apache_schema(current_schema().raw)
    body = io.BytesIO(encode(snap)[HEADER_SIZE:])
    record = avro.io.DatumReader(schema, schema).read(avro.io.BinaryDecoder(body))
    assert isinstance(record, dict)
    assert body.tell() == len(body.getvalue())  # the whole body, nothing left over
    assert {k: str(v) for k, v in record.items()} == snap.to_dict()


@given(snapshots())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_snapbus_reads_what_apache_avro_wrote(snap: WorkspaceSnapshot) -> None:
    schema = apache_schema(current_schema().raw)
    out = io.BytesIO()
    avro.io.DatumWriter(schema).write(snap.to_dict(), avro.io.BinaryEncoder(out))
    data = frame(out.getvalue())
    assert decode(data) == snap
    assert data == encode(snap)  # byte-identical encodings


# --- keys -------------------------------------------------------------------------------------


def test_encode_key_is_the_canonical_lowercase_uuid_in_utf8() -> None:
    session = uuid.UUID("6F1C2B3A-4D5E-4F60-8A7B-9C0D1E2F3A4B")
    expected = b"6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b"
    assert encode_key(session) == expected
    assert encode_key(str(session).upper()) == expected
    assert encode_key("{" + str(session) + "}") == expected
    assert encode_key(session.hex) == expected
    assert type(encode_key(session)) is bytes
    assert encode_key(GOLDEN_SNAPSHOT.session_id) == GOLDEN_SNAPSHOT.key.encode("utf-8")


@pytest.mark.parametrize("bad", ["", "nope", 42, None])
def test_encode_key_rejects_non_uuids(bad: Any) -> None:
    with pytest.raises(snapbus.ValidationError) as info:
        encode_key(bad)
    assert info.value.field == "session_id"


@given(st.uuids())
def test_key_round_trip(session: uuid.UUID) -> None:
    key = encode_key(session)
    assert len(key) == 36
    assert key == str(session).encode("ascii")
    assert decode_key(key) == session
    assert decode_key(bytearray(key)) == session
    assert decode_key(memoryview(key)) == session


SESSION_TEXT = "6f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b"


@pytest.mark.parametrize(
    "key",
    [
        None,
        b"",
        b"not-a-uuid",
        b"\xff\xfe\xfd",
        b"\xff" * 36,
        SESSION_TEXT.encode("utf-16"),
        SESSION_TEXT[:-1].encode() + b"\xe9",
        # other spellings of a UUID: a key is canonical or it is not a key (compaction is by bytes)
        SESSION_TEXT.upper().encode(),
        b"{" + SESSION_TEXT.encode() + b"}",
        SESSION_TEXT.replace("-", "").encode(),
        b"urn:uuid:" + SESSION_TEXT.encode(),
        SESSION_TEXT.encode() + b"\n",
        SESSION_TEXT,  # a str, not bytes
        123,
    ],
    ids=lambda v: repr(v)[:24],
)
def test_decode_key_rejects_bad_keys(key: Any) -> None:
    with pytest.raises(DecodeError) as info:
        decode_key(key)
    assert info.value.reason == "bad_key"


@given(st.binary(max_size=64))
def test_decode_key_fuzz(key: bytes) -> None:
    try:
        result: uuid.UUID | DecodeError = decode_key(key)
    except DecodeError as exc:
        result = exc
    if isinstance(result, DecodeError):
        assert result.reason == "bad_key"
    else:
        assert encode_key(result) == key


# --- malformed values -------------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, b"", bytearray(), memoryview(b"")])
def test_null_or_empty_value_is_empty(data: Any) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason == "empty"


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",
        b"\xc3\x02" + GOLDEN[2:],
        b"\x01\xc3" + GOLDEN[2:],
        b"\xc3\x00" + GOLDEN[2:],
        b"\x00\x00\x00\x00\x07" + GOLDEN[HEADER_SIZE:],  # Confluent framing, schema id 7
        GOLDEN_SNAPSHOT.to_json().encode(),
        GOLDEN[HEADER_SIZE:],  # a bare body
    ],
    ids=["one-byte", "c302", "01c3", "c300", "confluent", "json", "bare-body"],
)
def test_wrong_marker_is_bad_marker(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason == "bad_marker"


@pytest.mark.parametrize("size", range(2, HEADER_SIZE))
def test_short_header_is_truncated(size: int) -> None:
    with pytest.raises(DecodeError) as info:
        decode(GOLDEN[:size])
    assert info.value.reason == "truncated"


@pytest.mark.parametrize(
    "fingerprint",
    [
        bytes(8),
        b"\xff" * 8,
        bytes.fromhex(V1_FINGERPRINT_HEX)[::-1],  # big-endian by mistake
        bytes([GOLDEN[2] ^ 0x01]) + GOLDEN[3:10],
    ],
    ids=["zeros", "ones", "big-endian", "one-bit"],
)
def test_unknown_fingerprint(fingerprint: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(MARKER + fingerprint + GOLDEN[HEADER_SIZE:])
    assert info.value.reason == "unknown_fingerprint"
    assert fingerprint.hex() in str(info.value)


@pytest.mark.parametrize("size", range(HEADER_SIZE, len(GOLDEN)))
def test_every_truncation_of_the_body_is_corrupt_body(size: int) -> None:
    with pytest.raises(DecodeError) as info:
        decode(GOLDEN[:size])
    assert info.value.reason == "corrupt_body"


@pytest.mark.parametrize("extra", [b"\x00", b"junk", GOLDEN[HEADER_SIZE:]])
def test_trailing_bytes_are_corrupt_body(extra: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(GOLDEN + extra)
    assert info.value.reason == "corrupt_body"
    assert "trailing" in str(info.value)


def _corruptions() -> dict[str, bytes]:
    body = GOLDEN[HEADER_SIZE:]
    rocket = "🚀".encode()
    mode_at = body.rindex(b"\x12ephemeral")
    return {
        "invalid-utf8": body.replace(rocket, b"\xff\xfe\xfd\xfc"),
        "negative-length": body[:mode_at] + b"\x01" + body[mode_at + 1 :],
        "huge-length": body[:mode_at] + b"\xfe" + b"\xff" * 7 + b"\x7f" + body[mode_at + 1 :],
        "endless-varint": body[:mode_at] + b"\xff" * 12,
        "length-too-long": body[:mode_at] + b"\x14" + body[mode_at + 1 :],
        "zeros": bytes(len(body)),
    }


@pytest.mark.parametrize(("name", "body"), sorted(_corruptions().items()))
def test_corrupted_body_is_corrupt_body(name: str, body: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(frame(body))
    assert info.value.reason == "corrupt_body", name


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("value", ["not-a-uuid", "", "1234"])
def test_parsable_body_with_invalid_uuid_is_invalid_field(field: str, value: str) -> None:
    data = frame(plain_body({**GOLDEN_SNAPSHOT.to_dict(), field: value}))
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.reason == "invalid_field"
    assert field in str(info.value)
    # decode_record does not validate fields: the raw record is there for diagnostics
    assert default_codec().decode_record(data)[field] == value


def _other_spellings(text: str) -> list[str]:
    """UUID text a `WorkspaceSnapshot` accepts but the wire contract does not."""
    return [text.upper(), "{" + text + "}", text.replace("-", ""), "urn:uuid:" + text]


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("spelling", range(4))
def test_a_value_with_an_id_not_in_canonical_form_is_bad_not_rewritten(
    field: str, spelling: int
) -> None:
    # Java's UUID.fromString rejects the braced form, and any other reader shows the raw
    # text: a value spelling an id otherwise is bad for every reader, snapbus included.
    raw = _other_spellings(GOLDEN_SNAPSHOT.to_dict()[field])[spelling]
    data = frame(plain_body({**GOLDEN_SNAPSHOT.to_dict(), field: raw}))
    with pytest.raises(DecodeError, match="canonical form") as info:
        decode(data)
    assert info.value.reason == "invalid_field"
    assert field in str(info.value)
    assert default_codec().decode_record(data)[field] == raw  # (the raw text, for diagnostics)
    if field != "changeset_id":  # (not peeked: a lazy view finds it bad on first read)
        assert default_codec().peek(data) is None


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("spelling", range(4))
def test_the_writer_writes_ids_only_in_canonical_form(field: str, spelling: int) -> None:
    canonical = GOLDEN_SNAPSHOT.to_dict()[field]
    raw = _other_spellings(canonical)[spelling]
    # a snapshot accepts any spelling, and holds and writes the canonical one
    assert encode(GOLDEN_SNAPSHOT.replace(**{field: raw})) == GOLDEN
    assert encode(GOLDEN_SNAPSHOT.replace(**{field: uuid.UUID(canonical)})) == GOLDEN
    # a plain record is written as given: another spelling is refused, not written
    with pytest.raises(snapbus.ValidationError, match="canonical form") as info:
        default_codec().encode_record({**GOLDEN_SNAPSHOT.to_dict(), field: raw})
    assert info.value.field == field
    assert default_codec().encode_record(GOLDEN_SNAPSHOT.to_dict()) == GOLDEN


def test_decode_errors_are_snapbus_errors_and_value_errors() -> None:
    with pytest.raises(DecodeError) as info:
        decode(b"")
    assert isinstance(info.value, snapbus.SnapbusError)
    assert isinstance(info.value, ValueError)
    assert info.value.retriable is False


# --- fuzzing: DecodeError or a valid snapshot, never anything else ----------------------------


@given(st.binary(max_size=300))
@FUZZ
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    assert_decodes_or_decode_error(data)


@given(st.binary(max_size=400))
@FUZZ
def test_fuzz_arbitrary_body_behind_a_valid_header(body: bytes) -> None:
    assert_decodes_or_decode_error(frame(body))


@given(st.data())
@FUZZ
def test_fuzz_mutated_valid_encodings(data: st.DataObject) -> None:
    snap = data.draw(snapshots(text=st.text(max_size=40)), label="snapshot")
    buf = bytearray(encode(snap))
    ops = data.draw(
        st.lists(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), min_size=1,
                 max_size=4),
        label="ops",
    )
    for op in ops:
        if not buf:
            break
        at = data.draw(st.integers(0, len(buf) - 1), label=f"{op} at")
        if op == "flip":
            buf[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set":
            buf[at] = data.draw(st.integers(0, 255), label="byte")
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
        elif op == "delete":
            del buf[at : at + data.draw(st.integers(1, 8), label="deleted")]
        else:
            del buf[at:]
    assert_decodes_or_decode_error(bytes(buf))
    assert_decodes_or_decode_error(memoryview(bytes(buf)))


@given(st.data())
@settings(max_examples=50, deadline=None)
def test_fuzz_body_mutations_of_a_newer_schema(data: st.DataObject) -> None:
    # v2 has an array field: block counts are another varint fastavro must not trust blindly.
    v1, v2 = current_schema(), load_schema(V2_FILE)
    writer = Codec(SchemaStore(v2, [v1]))
    record = {**GOLDEN_SNAPSHOT.to_dict(), "labels": ["a", "🚀"], "priority": -3}
    buf = bytearray(writer.encode_record(record))
    at = data.draw(st.integers(HEADER_SIZE, len(buf) - 1))
    buf[at] = data.draw(st.integers(0, 255))
    assert_decodes_or_decode_error(bytes(buf), writer)
    assert_decodes_or_decode_error(bytes(buf), Codec(SchemaStore(v1, [v2])))


# --- schema evolution -------------------------------------------------------------------------


@pytest.fixture
def v1() -> Schema:
    return current_schema()


@pytest.fixture
def v2() -> Schema:
    return load_schema(V2_FILE)


def test_test_schemas_are_what_the_tests_assume(v1: Schema, v2: Schema) -> None:
    assert v2.field_names() == [*FIELDS, "labels", "priority"]
    assert v2.name == v1.name == "WorkspaceSnapshot"
    assert v2.fingerprint != v1.fingerprint


def test_new_reader_reads_old_records_with_defaults(v1: Schema, v2: Schema) -> None:
    old_writer = Codec(SchemaStore(v1))
    new_reader = Codec(SchemaStore(v2, [v1]))
    data = old_writer.encode(GOLDEN_SNAPSHOT)
    assert data == GOLDEN
    record = new_reader.decode_record(data)
    assert record == {**GOLDEN_SNAPSHOT.to_dict(), "labels": [], "priority": 0}
    assert new_reader.decode(data) == GOLDEN_SNAPSHOT


def test_old_reader_that_knows_the_new_schema_drops_the_new_fields(v1: Schema, v2: Schema) -> None:
    new_writer = Codec(SchemaStore(v2, [v1]))
    data = new_writer.encode_record(
        {**GOLDEN_SNAPSHOT.to_dict(), "labels": ["hot", "🔥"], "priority": 7}
    )
    assert data[2:HEADER_SIZE] == v2.fingerprint
    assert new_writer.decode_record(data)["labels"] == ["hot", "🔥"]
    old_reader = Codec(SchemaStore(v1, [v2]))
    assert old_reader.decode_record(data) == GOLDEN_SNAPSHOT.to_dict()
    assert old_reader.decode(data) == GOLDEN_SNAPSHOT
    assert new_writer.decode(data) == GOLDEN_SNAPSHOT


def test_reader_that_does_not_know_the_new_schema_reports_unknown_fingerprint(
    v1: Schema, v2: Schema
) -> None:
    data = Codec(SchemaStore(v2)).encode(GOLDEN_SNAPSHOT)
    for reader in (Codec(SchemaStore(v1)), default_codec()):
        with pytest.raises(DecodeError) as info:
            reader.decode(data)
        assert info.value.reason == "unknown_fingerprint"
        assert v2.fingerprint.hex() in str(info.value)


def test_codec_writes_with_a_chosen_writer_schema(v1: Schema, v2: Schema) -> None:
    store = SchemaStore(v1)
    codec = Codec(store, writer=v2)
    data = codec.encode(GOLDEN_SNAPSHOT)  # the new fields take their defaults
    assert data[:HEADER_SIZE] == MARKER + v2.fingerprint
    assert codec.writer is v2
    assert store.get(v2.fingerprint) is v2  # the writer is learnt so the codec reads its output
    assert codec.decode(data) == GOLDEN_SNAPSHOT
    assert codec.decode_record(data) == GOLDEN_SNAPSHOT.to_dict()  # read into v1, the current


def test_compatible_schema_has_no_problems(v1: Schema, v2: Schema) -> None:
    assert check_compatibility(v2, [v1]) == []
    assert check_compatibility(v1, [v2]) == []


def test_new_field_without_default_is_incompatible_and_named(v1: Schema) -> None:
    problems = check_compatibility(load_schema(NO_DEFAULT_FILE), [v1])
    assert problems
    assert all("owner_team" in p for p in problems)
    assert any("missing_default" in p for p in problems)
    assert NO_DEFAULT_FILE.name in problems[0]


def test_type_change_is_incompatible_both_ways_and_named(v1: Schema) -> None:
    problems = check_compatibility(load_schema(TYPE_CHANGE_FILE), [v1])
    assert len(problems) == 2  # neither side reads the other
    assert all("'state'" in p and "type_mismatch" in p for p in problems)


def test_shipped_schemas_are_mutually_compatible() -> None:
    store = SchemaStore.from_dir()
    for schema in store:
        others = [other for other in store if other is not schema]
        assert check_compatibility(schema, others) == [], schema.source


# --- loading schemas --------------------------------------------------------------------------


def test_schema_dir_finds_the_shipped_schemas() -> None:
    folder = schema_dir()
    assert folder.is_dir()
    assert (folder / CURRENT_SCHEMA_FILE).is_file()
    shipped = load_schema(folder / CURRENT_SCHEMA_FILE)
    checkout = load_schema(REPO_ROOT / "schemas" / CURRENT_SCHEMA_FILE)
    assert shipped.fingerprint == checkout.fingerprint
    assert SchemaStore.from_dir().current.fingerprint == shipped.fingerprint


def test_shipped_current_schema_declares_uuid_ids(v1: Schema) -> None:
    assert v1.field_names() == list(FIELDS)
    types = {f["name"]: f["type"] for f in v1.raw["fields"]}
    for name in ID_FIELDS:
        assert types[name] == {"type": "string", "logicalType": "uuid"}


def test_from_dir_loads_every_version(tmp_path: Path, v1: Schema, v2: Schema) -> None:
    shutil.copy(V2_FILE, tmp_path / CURRENT_SCHEMA_FILE)
    shutil.copy(schema_dir() / CURRENT_SCHEMA_FILE, tmp_path / "workspace_snapshot_v1.avsc")
    shutil.copy(schema_dir() / CURRENT_SCHEMA_FILE, tmp_path / "workspace_snapshot_v1_copy.avsc")
    (tmp_path / "README.txt").write_text("not a schema")
    store = SchemaStore.from_dir(tmp_path)
    assert store.current.fingerprint == v2.fingerprint
    assert len(store) == 2  # identical schemas share a fingerprint
    assert {s.fingerprint for s in store} == {v1.fingerprint, v2.fingerprint}
    old = store.get(v1.fingerprint)
    assert old is not None
    assert old.source.endswith("workspace_snapshot_v1.avsc")
    assert store.get(bytes(8)) is None
    assert Codec(store).decode_record(GOLDEN)["priority"] == 0


def test_from_dir_without_the_current_schema_fails(tmp_path: Path) -> None:
    shutil.copy(V2_FILE, tmp_path / "workspace_snapshot_v2.avsc")
    with pytest.raises(SchemaError, match=CURRENT_SCHEMA_FILE):
        SchemaStore.from_dir(tmp_path)


def test_from_dir_on_a_missing_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(SchemaError):
        SchemaStore.from_dir(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"type": "record", "name": ', "not valid JSON"),
        ("\xff not json", "not valid JSON"),
        ('["string", "int"]', "JSON object"),
        ('{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}', "Avro"),
        ('{"type": "record", "name": "X", "fields": [{"name": "a"}]}', "Avro"),
    ],
    ids=["truncated-json", "garbage", "json-array", "unknown-type", "no-field-type"],
)
def test_invalid_schema_file_is_a_schema_error_naming_the_file(
    tmp_path: Path, text: str, match: str
) -> None:
    shutil.copy(schema_dir() / CURRENT_SCHEMA_FILE, tmp_path / CURRENT_SCHEMA_FILE)
    broken = tmp_path / "workspace_snapshot_v0_broken.avsc"
    broken.write_text(text, encoding="utf-8")
    with pytest.raises(SchemaError, match=match) as info:
        SchemaStore.from_dir(tmp_path)
    assert broken.name in str(info.value)
    with pytest.raises(SchemaError) as info:
        load_schema(broken)
    assert broken.name in str(info.value)


def test_invalid_current_schema_is_a_schema_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / CURRENT_SCHEMA_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(SchemaError, match=CURRENT_SCHEMA_FILE):
        SchemaStore.from_dir(tmp_path)


def test_load_schema_of_a_missing_file_fails(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="cannot read"):
        load_schema(tmp_path / "missing.avsc")


def test_schema_from_memory_names_its_source() -> None:
    with pytest.raises(SchemaError, match="<inline>"):
        Schema({"type": "record", "name": "X", "fields": 3}, source="<inline>")


# --- peek: the indexed fields without a full decode ------------------------------------------


def peek_of(snap: WorkspaceSnapshot) -> tuple[str, str, str, str]:
    return snap.key, snap.repo_key, snap.agent_id, snap.state


@given(snapshots())
def test_peek_reads_the_indexed_fields_as_decode_does(snap: WorkspaceSnapshot) -> None:
    assert default_codec().peek(encode(snap)) == peek_of(snap)


@given(st.data())
@FUZZ
def test_peek_of_mutated_encodings_is_none_or_what_decode_reads(data: st.DataObject) -> None:
    snap = data.draw(snapshots(text=st.text(max_size=40)), label="snapshot")
    buf = bytearray(encode(snap))
    at = data.draw(st.integers(0, len(buf) - 1), label="at")
    buf[at] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        del buf[data.draw(st.integers(0, len(buf)), label="cut"):]
    peeked = default_codec().peek(bytes(buf))  # never raises
    try:
        decoded = decode(bytes(buf))
    except DecodeError:
        return  # peek may still read the fields before the damage: the view decodes later
    assert peeked is None or peeked == peek_of(decoded)


@given(snapshots())
def test_compact_values_expand_to_what_they_were(snap: WorkspaceSnapshot) -> None:
    codec, value = default_codec(), encode(snap)
    compact = codec.compact(value)
    assert len(compact) == len(value) - 47  # the 10-byte header and the session id
    assert codec.compact_prefix
    assert value.startswith(codec.compact_prefix)
    assert compact.startswith(b"\x48" + snap.repo_key.encode())  # what follows the session id
    assert codec.expand(snap.key, compact) == value


def test_peek_declines_other_schemas_and_garbage(v1: Schema, v2: Schema) -> None:
    old_writer = Codec(SchemaStore(v1))
    new_reader = Codec(SchemaStore(v2, [v1]))
    assert new_reader.peek(old_writer.encode(GOLDEN_SNAPSHOT)) is None  # not the current schema
    assert old_writer.peek(old_writer.encode(GOLDEN_SNAPSHOT)) == peek_of(GOLDEN_SNAPSHOT)
    for junk in (b"", MARKER, GOLDEN[:HEADER_SIZE], GOLDEN[:HEADER_SIZE] + b"\x01",
                 GOLDEN[:HEADER_SIZE] + b"\xff" * 12):
        assert default_codec().peek(junk) is None


@given(snapshots())
def test_size_bound_is_an_upper_bound_exact_for_ascii(snap: WorkspaceSnapshot) -> None:
    bound = default_codec().size_bound(snap)
    assert bound is not None
    assert bound >= len(encode(snap))
    ascii_snap = snap.replace(**{name: getattr(snap, name).encode("ascii", "replace").decode()
                                 for name in ("agent_id", "agent_name", "intent", "base_commit",
                                              "state", "mode")})
    # exact but for the length varints, counted as 5 bytes each
    ascii_bound = default_codec().size_bound(ascii_snap)
    assert ascii_bound is not None
    assert 0 <= ascii_bound - len(encode(ascii_snap)) <= 9 * 4


def test_size_bound_needs_the_plain_schema(v2: Schema) -> None:
    assert Codec(SchemaStore(v2)).size_bound(GOLDEN_SNAPSHOT) is None
