"""The public API is exactly the intended names."""

import snapbus


def test_exported_names_are_the_intended_ones() -> None:
    assert snapbus.__all__ == sorted(snapbus.__all__)
    assert set(snapbus.__all__) == {
        "BrokerError", "Change", "ChangeStream", "CheckpointError", "ConfigError",
        "CorruptBatchError", "DecodeError",
        "KafkaAuthenticationError", "KafkaConfig", "KafkaUnavailableError", "PublishError",
        "Receipt", "SchemaError", "SnapbusError",
        "SnapshotPublisher", "SnapshotView", "TopicError", "TopicInfo", "ValidationError",
        "ViewError", "ViewStats", "ViewStatus", "WorkspaceCache", "WorkspaceSnapshot",
        "__version__", "decode", "decode_key", "describe_topic", "encode", "encode_key",
        "ensure_topic", "Event", "Health", "Janitor", "history", "rebuild", "replay",
    }
    for name in snapbus.__all__:
        assert getattr(snapbus, name) is not None


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(snapbus, n) for n in snapbus.__all__ if n.endswith("Error")]
    assert len(errors) == 13
    for error in errors:
        assert issubclass(error, snapbus.SnapbusError)
    assert snapbus.KafkaUnavailableError.retriable
    assert not snapbus.KafkaAuthenticationError.retriable
    assert not snapbus.ValidationError.retriable
