"""Avro schemas: loading `schemas/`, fingerprints, the writer-schema store, compatibility.

The schema files live in the repository's ``schemas/`` folder and ship inside the wheel as
``snapbus/schemas``, so an installed snapbus works outside a checkout. ``workspace_snapshot.avsc``
is the current schema; every other ``*.avsc`` there is an older version kept so that records
written by older pods stay readable.

A record names its writer schema by the 8-byte CRC-64-AVRO fingerprint of the schema's Parsing
Canonical Form (Avro specification, "Schema Fingerprints"). `SchemaStore` maps fingerprints to
schemas; an unknown fingerprint is a decode error for that record, never a crash.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

from snapbus.errors import SchemaError

__all__ = [
    "CURRENT_SCHEMA_FILE",
    "Schema",
    "SchemaStore",
    "check_compatibility",
    "load_schema",
    "schema_dir",
]

CURRENT_SCHEMA_FILE = "workspace_snapshot.avsc"
"""The file name of the current schema in `schemas/`."""


def schema_dir() -> Path:
    """Return the folder holding the shipped schemas (inside the package when installed)."""
    packaged = resources.files("snapbus").joinpath("schemas")
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / "schemas"
    if checkout.is_dir():
        return checkout
    raise SchemaError("no schemas/ folder found beside or inside the snapbus package; reinstall")


def _strip_logical_types(node: Any) -> Any:
    """Return a copy of a schema with ``logicalType`` removed, so uuids read as plain strings."""
    if isinstance(node, dict):
        return {k: _strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


class Schema:
    """One Avro schema with its canonical form and fingerprint.

    `parsed` is the fastavro-parsed schema with logical types removed (ids read and write as
    plain strings, which is both faster and what the wire carries); the canonical form, and so
    the fingerprint, is unchanged by that since canonical form drops ``logicalType`` anyway.
    """

    __slots__ = ("canonical_form", "fingerprint", "name", "parsed", "raw", "source")

    def __init__(self, raw: Mapping[str, Any], *, source: str = "<memory>") -> None:
        """Parse `raw` (a schema as loaded from JSON).

        Raises:
            SchemaError: `raw` is not a valid Avro schema.
        """
        try:
            full = fastavro.parse_schema(copy.deepcopy(dict(raw)))
            parsed = fastavro.parse_schema(_strip_logical_types(dict(raw)))
            canonical = fastavro.schema.to_parsing_canonical_form(full)
        except Exception as exc:
            raise SchemaError(f"{source}: not a valid Avro schema: {exc}") from exc
        self.raw: dict[str, Any] = dict(raw)
        self.source = source
        self.parsed: Any = parsed
        self.canonical_form: str = canonical
        self.fingerprint: bytes = bytes.fromhex(
            fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")
        )
        self.name: str = str(raw.get("name", "")) if isinstance(raw, Mapping) else ""

    def __repr__(self) -> str:
        fingerprint = self.fingerprint.hex()
        return f"Schema({self.name!r}, fingerprint={fingerprint}, source={self.source!r})"

    def field_names(self) -> list[str]:
        """Return the record's field names in order (empty for a non-record schema)."""
        return [str(f["name"]) for f in self.raw.get("fields", [])]


def load_schema(path: str | Path) -> Schema:
    """Load and parse one ``.avsc`` file.

    Raises:
        SchemaError: the file cannot be read, is not JSON, or is not a valid Avro schema.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read schema file: {exc}") from exc
    except ValueError as exc:
        raise SchemaError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SchemaError(f"{path}: a snapshot schema must be a JSON object (an Avro record)")
    return Schema(raw, source=str(path))


class SchemaStore:
    """Writer schemas by fingerprint, plus the reader schema they resolve to.

    `current` is the schema this process writes with and reads into. Any schema can be added
    with `add` (for instance one learnt from a newer pod).
    """

    __slots__ = ("_by_fingerprint", "current")

    def __init__(self, current: Schema, others: Iterable[Schema] = ()) -> None:
        self.current = current
        self._by_fingerprint: dict[bytes, Schema] = {current.fingerprint: current}
        for schema in others:
            self.add(schema)

    @classmethod
    def from_dir(cls, folder: str | Path | None = None) -> SchemaStore:
        """Load every ``*.avsc`` in `folder` (default: the shipped schemas).

        Raises:
            SchemaError: the current schema file is missing, or any file is invalid.
        """
        folder = Path(folder) if folder is not None else schema_dir()
        current_path = folder / CURRENT_SCHEMA_FILE
        if not current_path.is_file():
            raise SchemaError(f"{folder}: missing the current schema {CURRENT_SCHEMA_FILE}")
        others = [load_schema(p) for p in sorted(folder.glob("*.avsc")) if p != current_path]
        return cls(load_schema(current_path), others)

    def add(self, schema: Schema) -> None:
        """Make records written with `schema` readable."""
        self._by_fingerprint.setdefault(schema.fingerprint, schema)

    def get(self, fingerprint: bytes) -> Schema | None:
        """Return the schema with that fingerprint, or None when unknown."""
        return self._by_fingerprint.get(fingerprint)

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._by_fingerprint

    def __iter__(self) -> Iterator[Schema]:
        return iter(self._by_fingerprint.values())

    def __len__(self) -> int:
        return len(self._by_fingerprint)


def _name_location(raw: Any, location: str) -> str:
    """Return a checker location (a JSON pointer such as ``/fields/7/type``) with field names.

    ``/fields/7/type`` becomes ``field 'state' (/fields/7/type)``, so a type change names the
    field like a missing default does. The pointer is returned unchanged when it cannot be
    followed.
    """
    node = raw
    names: list[str] = []
    previous = ""
    try:
        for part in (p for p in location.split("/") if p):
            if isinstance(node, list):
                node = node[int(part)]
                if previous == "fields" and isinstance(node, dict) and "name" in node:
                    names.append(str(node["name"]))
            elif isinstance(node, dict):
                node = node[part]
            else:
                break
            previous = part
    except (LookupError, ValueError):
        return location
    return f"field {'.'.join(names)!r} ({location})" if names else location


def check_compatibility(candidate: Schema, known: Iterable[Schema]) -> list[str]:
    """Return the problems that stop `candidate` from living beside the `known` schemas.

    Compatibility is checked both ways (Avro schema resolution): the candidate must read what
    every known schema wrote, and every known schema must read what the candidate writes, so
    old and new pods can run side by side. An empty list means compatible.
    """
    import avro.schema
    from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

    def parse(s: Schema) -> Any:
        return avro.schema.parse(json.dumps(s.raw))

    checker: Any = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    new = parse(candidate)
    problems: list[str] = []
    for other in known:
        old = parse(other)
        for direction, reader, writer in (
            (f"{candidate.source} cannot read records written with {other.source}", new, old),
            (f"{other.source} cannot read records written with {candidate.source}", old, new),
        ):
            result = checker.get_compatibility(reader, writer)
            if result.compatibility is not SchemaCompatibilityType.compatible:
                kinds = ", ".join(sorted({kind.value for kind in result.incompatibilities}))
                reader_raw = candidate.raw if reader is new else other.raw
                where = ", ".join(
                    _name_location(reader_raw, location) for location in sorted(result.locations)
                )
                names = ", ".join(sorted(str(m) for m in result.messages))
                problems.append(f"{direction}: {kinds} at {where} ({names})")
    return problems
