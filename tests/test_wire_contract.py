"""The README's wire contract: its figures are pinned, and its UUID rule holds on the wire."""

from __future__ import annotations

import io
import re
from pathlib import Path

import fastavro
from aiokafka import AIOKafkaProducer

from snapbus import DecodeError, KafkaConfig, SnapshotPublisher, SnapshotView
from snapbus.codec import MARKER, encode_key
from snapbus.snapshot import WorkspaceSnapshot
from tests.conftest import BrokerAddress
from tests.helpers import WAIT_S, eventually, make_snapshot
from tests.test_codec import (
    CANONICAL_FORM_V1,
    apache_schema,
    crc64_avro,
    current_schema,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def wire_contract_section() -> str:
    match = re.search(r"\n## The wire contract.*?\n(.*?)\n## ", README.read_text(), re.S)
    assert match is not None, "the README lost its wire contract section"
    return match.group(1)


def _figures(fingerprint: bytes) -> tuple[str, str, str]:
    """A fingerprint as the README writes it: wire bytes, Java's number in hex, and unspaced."""
    number = int.from_bytes(fingerprint, "little")
    return fingerprint.hex(" "), f"0x{number:016x}", fingerprint.hex()


def test_the_readme_states_the_current_fingerprint_as_bytes_and_as_javas_number() -> None:
    section = wire_contract_section()
    fingerprint = current_schema().fingerprint
    # Java's SchemaNormalization.parsingFingerprint64 is the CRC-64-AVRO of the canonical
    # form, a long; the single-object header holds it little-endian
    number = crc64_avro(CANONICAL_FORM_V1.encode())
    assert number.to_bytes(8, "little") == fingerprint
    wire, java, plain = _figures(fingerprint)
    assert (wire, java, plain) == ("c2 c5 5d 77 c6 12 03 93", "0x930312c6775dc5c2",
                                   "c2c55d77c6120393")
    for figure in (wire, java, plain, str(int.from_bytes(fingerprint, "little", signed=True))):
        assert figure in section, figure


def test_the_readme_explains_the_avro_packages_other_fingerprint() -> None:
    section = wire_contract_section()
    raw = current_schema().raw
    theirs = apache_schema(raw)
    # it drops logicalType, yet leaves {"type":"string"} where the spec wants "string"
    assert "logicalType" not in theirs.canonical_form
    assert theirs.canonical_form == CANONICAL_FORM_V1.replace(
        '"session_id","type":"string"', '"session_id","type":{"type":"string"}'
    ).replace('"repo_id","type":"string"', '"repo_id","type":{"type":"string"}').replace(
        '"changeset_id","type":"string"', '"changeset_id","type":{"type":"string"}')
    fingerprint = bytes(theirs.fingerprint())
    assert fingerprint == crc64_avro(theirs.canonical_form.encode()).to_bytes(8, "little")
    _, java, plain = _figures(fingerprint)
    assert (plain, java) == ("c7155310b7520a36", "0x360a52b7105315c7")
    assert plain in section
    assert java in section


def test_every_fingerprint_in_the_readme_is_one_of_these() -> None:
    known = {current_schema().fingerprint, bytes(apache_schema(current_schema().raw).fingerprint())}
    allowed = {figure for fingerprint in known for figure in _figures(fingerprint)}
    section = wire_contract_section()
    found = set(re.findall(r"\b(?:0x)?[0-9a-f]{16}\b", section))
    found |= set(re.findall(r"\b(?:[0-9a-f]{2} ){7}[0-9a-f]{2}\b", section))
    assert found
    assert found <= allowed, found - allowed


def test_the_readme_names_every_partitioner_setting_and_the_uuid_rule() -> None:
    section = wire_contract_section()
    for text in ("partitioner=murmur2_random", "-X topic.partitioner=murmur2_random",
                 "LegacyPartitioner", "librdkafka 2.0.2", "UUIDs in a value",
                 "UUID.toString", "invalid_field"):
        assert text in section, text


# ---------------------------------------------------------------------------- the UUID rule


def _raw_value(snapshot: WorkspaceSnapshot, **ids: str) -> bytes:
    """`snapshot` encoded as another producer would, with some ids spelled as given."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, current_schema().parsed, {**snapshot.to_dict(), **ids})
    return MARKER + current_schema().fingerprint + body.getvalue()


async def test_a_value_with_an_id_not_in_canonical_form_is_not_shown_rewritten(
    broker: BrokerAddress, topic_name: str
) -> None:
    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    good, upper, braced = (make_snapshot() for _ in range(3))
    raw = {  # (canonical keys: only the values spell an id otherwise)
        upper: _raw_value(upper, repo_id=upper.repo_key.upper()),
        braced: _raw_value(braced, changeset_id="{" + str(braced.changeset_id) + "}"),
    }
    async with SnapshotPublisher(config) as publisher, \
            SnapshotView(config, fetch_max_wait_ms=20) as live:
        await publisher.publish(good)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        await producer.start()
        try:
            for snapshot, value in raw.items():
                await producer.send_and_wait(topic_name, value, key=encode_key(snapshot.key))
        finally:
            await producer.stop()
        await live.barrier(timeout=WAIT_S)
        views = [live]
        async with SnapshotView(config, decode="eager") as eager, SnapshotView(config) as lazy:
            views += [eager, lazy]
            for view in views:
                assert view.get(good.session_id) == good
                for snapshot in raw:
                    assert _shown(view, snapshot) is None, "the value was rewritten, not refused"
                assert view.by_repo(upper.repo_id) == []
                assert all(s.session_id == good.session_id for s in view.snapshots())
                # (a lazy view counts a value found bad on first read once its repair task
                # has found the record in the log: docs/bad-values.md)
                await eventually(lambda v=view: v.stats.decode_errors == len(raw),
                                 what="each bad value counted once")


def _shown(view: SnapshotView, snapshot: WorkspaceSnapshot) -> WorkspaceSnapshot | str | None:
    """What `view` shows of `snapshot`'s session: a snapshot, None, or the error's text
    when it is not the canonical-form one (a bad value may raise on read)."""
    try:
        return view.get(snapshot.session_id)
    except DecodeError as exc:
        return None if "canonical form" in str(exc) else str(exc)
