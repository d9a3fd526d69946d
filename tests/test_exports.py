"""The public API is exactly the intended names, with the intended signatures."""

import datetime
import inspect
from typing import Any, get_type_hints

import snapbus


def test_exported_names_are_the_intended_ones() -> None:
    assert snapbus.__all__ == sorted(snapbus.__all__)
    assert set(snapbus.__all__) == {
        "BrokerError", "Change", "ChangeStream", "CheckpointError", "ConfigError",
        "CorruptBatchError", "DecodeError",
        "KafkaAuthenticationError", "KafkaConfig", "KafkaUnavailableError", "PublishError",
        "Receipt", "SchemaError", "SnapbusError",
        "SnapshotPublisher", "SnapshotView", "TopicError", "TopicInfo", "ValidationError",
        "ViewError", "ViewStats", "ViewTimeoutError", "ViewStatus", "WorkspaceCache",
        "WorkspaceSnapshot",
        "__version__", "decode", "decode_key", "describe_topic", "encode", "encode_key",
        "ensure_topic", "Event", "Health", "Janitor", "history", "rebuild", "replay",
    }
    for name in snapbus.__all__:
        assert getattr(snapbus, name) is not None


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(snapbus, n) for n in snapbus.__all__ if n.endswith("Error")]
    assert len(errors) == 14
    for error in errors:
        assert issubclass(error, snapbus.SnapbusError)
    assert snapbus.KafkaUnavailableError.retriable
    assert not snapbus.KafkaAuthenticationError.retriable
    assert not snapbus.ValidationError.retriable


# The signatures of the public callables (a class: its constructor), annotations as written.
# A change here is a change of the public API: update the pin deliberately (and the README).
# `bootstrap_servers`/`topic` of replay and rebuild are deprecated (removed in 0.3;
# docs/adr/0003-connection-settings-and-timestamps.md).
SIGNATURES = {
    "SnapshotPublisher": (
        "(config: KafkaConfig | None = None, *, acks: Literal['all', 0, 1] = 'all', "
        "linger_ms: int = 5, compression_type: str | None = None, "
        "idempotence: bool | None = None, delivery_timeout_s: float = 30.0, "
        "max_value_bytes: int = 1000000, ensure_topic: bool = True, "
        "allow_non_compacted: bool = False, partitions: int = 12, codec: Codec | None = None, "
        "history_retention_ms: int = 604800000, producer_options: dict[str, "
        "Any] | None = None) -> None"),
    "SnapshotView": (
        "(config: KafkaConfig | None = None, *, start_timeout_s: float = 60.0, "
        "fetch_max_wait_ms: int = 100, ensure_topic: bool = True, "
        "allow_non_compacted: bool = False, codec: Codec | None = None, "
        "stale_after_s: float = 10.0, fail_after_s: float | None = None, "
        "dead_letter_topic: str | None = None, ttl_s: float | None = None, "
        "checkpoint_path: str | Path | None = None, decode: Literal['lazy', 'eager'] = 'lazy', "
        "consumer_options: Mapping[str, Any] | None = None, topic_check_s: float | None = 30.0, "
        "clock: Callable[[], float] = <built-in function time>) -> None"),
    "WorkspaceCache": (
        "(config: KafkaConfig | None = None, *, publisher: SnapshotPublisher | None = None, "
        "view: SnapshotView | None = None, write_timeout_s: float = 30.0) -> None"),
    "Janitor": (
        "(view: SnapshotView, publisher: SnapshotPublisher, *, interval_s: float = 30.0) -> None"),
    "replay": (
        "(config: KafkaConfig | None = None, *, bootstrap_servers: str | None = None, "
        "topic: str | None = None, since: Bound = None, until: Bound = None, "
        "use_history: bool = True, errors: str = 'skip', codec: Codec | None = None, "
        "fetch_max_wait_ms: int = 100, progress: Progress | None = None, quiet: bool = False, "
        "on_error: Callable[[int, Record, DecodeError], "
        "object] | None = None) -> AsyncIterator[Event]"),
    "rebuild": (
        "(config: KafkaConfig | None = None, *, bootstrap_servers: str | None = None, "
        "topic: str | None = None, as_of: datetime.datetime | None = None, "
        "use_history: bool = True, codec: Codec | None = None) -> dict[uuid.UUID, "
        "WorkspaceSnapshot]"),
    "history": (
        "(config: KafkaConfig | None, session_id: uuid.UUID | str | None = None, *, "
        "since: Bound = None, "
        "until: Bound = None, use_history: bool = True) -> list[Event]"),
    "describe_topic": (
        "(config: KafkaConfig) -> TopicInfo"),
    "ensure_topic": (
        "(config: KafkaConfig, *, partitions: int = 12, replication_factor: int | None = None, "
        "min_insync_replicas: int | None = None, allow_non_compacted: bool = False, "
        "extra_configs: dict[str, str] | None = None) -> TopicInfo"),
    "encode": (
        "(snapshot: WorkspaceSnapshot) -> bytes"),
    "decode": (
        "(data: bytes | bytearray | memoryview | None) -> WorkspaceSnapshot"),
    "encode_key": (
        "(session_id: uuid.UUID | str) -> bytes"),
    "decode_key": (
        "(key: bytes | bytearray | memoryview | None) -> uuid.UUID"),
}


class _Raw:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def shape(obj: Any) -> str:
    """`obj`'s signature as text, its annotations as written."""
    def raw(annotation: Any) -> Any:
        if annotation is inspect.Parameter.empty:
            return annotation
        return _Raw(annotation if isinstance(annotation, str)
                    else inspect.formatannotation(annotation))
    sig = inspect.signature(obj)
    return str(sig.replace(parameters=[p.replace(annotation=raw(p.annotation))
                                       for p in sig.parameters.values()],
                           return_annotation=raw(sig.return_annotation)))


def test_public_signatures_are_the_pinned_ones() -> None:
    for name, expected in SIGNATURES.items():
        assert shape(getattr(snapbus, name)) == expected, f"the signature of snapbus.{name}"


def test_connection_settings_come_first_as_a_config_everywhere() -> None:
    # SnapshotPublisher, SnapshotView, WorkspaceCache, replay, rebuild, history, the topic
    # calls: the KafkaConfig is the first parameter, positional, named config
    takers = [name for name in snapbus.__all__ if callable(getattr(snapbus, name))
              and "config" in inspect.signature(getattr(snapbus, name)).parameters]
    assert set(takers) >= {"SnapshotPublisher", "SnapshotView", "WorkspaceCache", "replay",
                           "rebuild", "history", "describe_topic", "ensure_topic"}
    for name in takers:
        first = next(iter(inspect.signature(getattr(snapbus, name)).parameters.values()))
        assert first.name == "config", name
        assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        assert first.annotation in ("KafkaConfig", "KafkaConfig | None"), name


def test_timestamp_is_a_datetime_and_timestamp_ms_an_int_everywhere() -> None:
    # one meaning in the public API: `timestamp` an aware UTC datetime (None when unknown),
    # `timestamp_ms` milliseconds since the epoch; time bounds are datetimes
    with_stamps = [getattr(snapbus, name) for name in snapbus.__all__
                   if isinstance(getattr(snapbus, name), type)
                   and hasattr(getattr(snapbus, name), "timestamp")]
    assert {cls.__name__ for cls in with_stamps} == {"Event", "Receipt"}
    for cls in with_stamps:
        assert get_type_hints(cls.timestamp.fget)["return"] == datetime.datetime | None
        assert get_type_hints(cls)["timestamp_ms"] is int
    receipt = snapbus.Receipt("t", 0, 0, 1_700_000_000_123, "k")
    assert receipt.timestamp == datetime.datetime(2023, 11, 14, 22, 13, 20, 123000,
                                                  tzinfo=datetime.timezone.utc)
    assert snapbus.Receipt("t", 0, 0, -1, "k").timestamp is None
    for name, parameter in (("replay", "since"), ("replay", "until"), ("history", "since"),
                            ("history", "until"), ("rebuild", "as_of")):
        hint = get_type_hints(getattr(snapbus, name))[parameter]
        assert datetime.datetime in getattr(hint, "__args__", (hint,)), (name, parameter)
