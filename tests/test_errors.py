"""Every error of the public API is a `SnapbusError` with the right `retriable` (issue 16, 5).

The aiokafka errors snapbus's calls can raise are translated in one place
(`snapbus._kafka.translate`); the table below pins where each lands, as httpx pins its
transport's mapping. The other cases: a publisher used outside its life, a bad setting, a
checkpoint that cannot be written, and the CLI against a broker that is not there.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import uuid
from pathlib import Path

import aiokafka.errors as kafka_errors
import pytest
from click.testing import CliRunner

from snapbus import (
    CheckpointError,
    ConfigError,
    CorruptBatchError,
    KafkaAuthenticationError,
    KafkaConfig,
    KafkaUnavailableError,
    PublishError,
    SnapbusError,
    SnapshotPublisher,
    TopicError,
    history,
    rebuild,
    replay,
)
from snapbus._kafka import KAFKA_ERRORS, translate
from snapbus.checkpoint import write_file
from snapbus.cli import cli
from snapbus.topic import _topic_error
from tests.conftest import BrokerAddress
from tests.faultproxy import free_port
from tests.helpers import make_snapshot

CONFIG = KafkaConfig("broker-1:9092", "sessions")

E = kafka_errors


def tls_refusal() -> ssl.SSLCertVerificationError:
    """The error a client gets from a broker whose certificate its CA did not sign."""
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                            "verify failed: self-signed certificate")
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    error.verify_message = "self-signed certificate"
    return error

TABLE: list[tuple[BaseException, type[SnapbusError], bool]] = [
    # cannot reach the cluster, or it did not answer in time: retriable
    (E.KafkaConnectionError("Connection at broker-1:9092 closed"), KafkaUnavailableError, True),
    (E.NoBrokersAvailable(), KafkaUnavailableError, True),
    (E.NodeNotReadyError("node 1"), KafkaUnavailableError, True),
    (E.KafkaTimeoutError(), KafkaUnavailableError, True),
    (E.RequestTimedOutError(), KafkaUnavailableError, True),
    (asyncio.TimeoutError(), KafkaUnavailableError, True),
    (OSError(111, "Connection refused"), KafkaUnavailableError, True),
    (ConnectionResetError(104, "Connection reset by peer"), KafkaUnavailableError, True),
    (E.ConsumerStoppedError(), KafkaUnavailableError, True),
    # leadership or metadata moving: retriable
    (E.NotLeaderForPartitionError(), KafkaUnavailableError, True),
    (E.LeaderNotAvailableError(), KafkaUnavailableError, True),
    (E.StaleMetadata(), KafkaUnavailableError, True),
    (E.NotEnoughReplicasError(), KafkaUnavailableError, True),
    (E.UnknownTopicOrPartitionError(), TopicError, True),
    # refused: not retriable until credentials, certificates or ACLs change
    (E.SaslAuthenticationFailed("Authentication failed during authentication due to invalid "
                                "credentials with SASL mechanism SCRAM-SHA-256"),
     KafkaAuthenticationError, False),
    (E.UnsupportedSaslMechanismError(), KafkaAuthenticationError, False),
    (tls_refusal(), KafkaAuthenticationError, False),
    (E.TopicAuthorizationFailedError(), KafkaAuthenticationError, False),
    (E.ClusterAuthorizationFailedError(), KafkaAuthenticationError, False),
    (E.GroupAuthorizationFailedError(), KafkaAuthenticationError, False),
    (E.TransactionalIdAuthorizationFailed(), KafkaAuthenticationError, False),
    # the log's bytes are damaged
    (E.CorruptRecordException("Invalid CRC"), CorruptBatchError, False),
    # the broker refused the request for good
    (E.UnsupportedVersionError(), KafkaUnavailableError, False),
    (E.IncompatibleBrokerVersion("Kafka broker does not support the 'X' Kafka protocol."),
     KafkaUnavailableError, False),
    (E.MessageSizeTooLargeError(), KafkaUnavailableError, False),
    (E.RecordTooLargeError("too large"), KafkaUnavailableError, False),
    (E.IllegalStateError("the client is in the wrong state"), KafkaUnavailableError, False),
    (E.UnknownError(), KafkaUnavailableError, False),
    (E.KafkaError(), KafkaUnavailableError, False),
]


@pytest.mark.parametrize(("raised", "expected", "retriable"), TABLE,
                         ids=[type(row[0]).__name__ for row in TABLE])
def test_each_aiokafka_error_becomes_its_snapbus_error(
        raised: BaseException, expected: type[SnapbusError], retriable: bool) -> None:
    assert isinstance(raised, KAFKA_ERRORS)  # (what the callers catch)
    error = translate(raised, CONFIG, "replaying topic 'sessions'")
    assert type(error) is expected
    assert error.retriable is retriable
    message = str(error)
    assert "\n" not in message
    assert "broker-1:9092" in message


def test_every_kafka_error_class_translates_to_a_snapbus_error() -> None:
    # (the table's completeness: any KafkaError aiokafka defines, now or in a later version)
    classes = [c for _, c in inspect.getmembers(kafka_errors, inspect.isclass)
               if issubclass(c, kafka_errors.KafkaError)]
    assert len(classes) > 80
    for cls in classes:
        error = translate(cls(), CONFIG, "reading")
        assert isinstance(error, SnapbusError), cls
        assert "\n" not in str(error)
        if issubclass(cls, E.KafkaTimeoutError | E.RequestTimedOutError):
            assert error.retriable, cls  # (a timeout may pass, whatever aiokafka says)
        elif not isinstance(error, KafkaAuthenticationError | CorruptBatchError):
            assert error.retriable is bool(cls.retriable), cls


def test_a_snapbus_error_passes_through_translate_unchanged() -> None:
    error = TopicError("topic 'sessions' does not exist")
    assert translate(error, CONFIG, "reading") is error


def test_a_timeout_describing_a_topic_is_retriable() -> None:
    # (it was a TopicError, not retriable)
    for raised in (E.KafkaTimeoutError(), asyncio.TimeoutError(), E.RequestTimedOutError()):
        error = _topic_error(raised, CONFIG, "describing")
        assert type(error) is KafkaUnavailableError
        assert error.retriable
        assert "describing topic 'sessions' on broker-1:9092 timed out" in str(error)
    refused = _topic_error(E.PolicyViolationError(), CONFIG, "ensuring")
    assert type(refused) is TopicError
    assert not refused.retriable
    assert "ensuring topic 'sessions'" in str(refused)


async def test_an_unstarted_publisher_raises_a_non_retriable_publish_error() -> None:
    publisher = SnapshotPublisher(CONFIG)
    with pytest.raises(PublishError, match="not started") as raised:
        await publisher.publish(make_snapshot())
    assert not raised.value.retriable
    with pytest.raises(PublishError, match="not started") as raised:
        await publisher.publish_many([make_snapshot()])
    assert not raised.value.retriable


def test_publish_errors_are_retriable_unless_the_broker_refused_for_good() -> None:
    publisher = SnapshotPublisher(CONFIG)
    for raised, retriable in ((asyncio.TimeoutError(), True),
                              (E.KafkaConnectionError(), True),
                              (E.NotLeaderForPartitionError(), True),
                              (E.MessageSizeTooLargeError(), False),
                              (E.TopicAuthorizationFailedError(), False)):
        error = publisher._publish_error(raised)
        assert type(error) is PublishError
        assert error.retriable is retriable, raised
        assert ("publishing it again is safe" in str(error)) is retriable


@pytest.mark.parametrize("value", ["abc", "5s", "nan", "-1", "0"])
def test_a_bad_connect_timeout_setting_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match=r"SNAPBUS_CONNECT_TIMEOUT_S|connect_timeout_s"):
        KafkaConfig.from_env({"SNAPBUS_CONNECT_TIMEOUT_S": value})


def test_a_checkpoint_that_cannot_be_written_is_a_checkpoint_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot write checkpoint") as raised:
        write_file(blocker / "view.ckpt", b"data")  # (its directory is a file)
    assert not raised.value.retriable
    assert issubclass(CheckpointError, SnapbusError)


# ---------------------------------------------------------------------------- no broker there


def unreachable() -> KafkaConfig:
    return KafkaConfig(f"127.0.0.1:{free_port()}", "sessions", connect_timeout_s=2)


async def test_replay_rebuild_and_history_without_a_broker_raise_a_retriable_error() -> None:
    config = unreachable()
    with pytest.raises(KafkaUnavailableError, match="cannot reach Kafka") as raised:
        await anext(aiter(replay(config)))
    assert raised.value.retriable
    with pytest.raises(KafkaUnavailableError, match="cannot reach Kafka"):
        await rebuild(config)
    with pytest.raises(KafkaUnavailableError, match="cannot reach Kafka"):
        await history(config, uuid.uuid4())


@pytest.mark.parametrize("command", [["replay"], ["history", str(uuid.uuid4())],
                                     ["ls", "--as-of", "2024-01-01T00:00:00Z"]])
def test_the_cli_without_a_broker_says_so_in_one_line(command: list[str]) -> None:
    result = CliRunner().invoke(
        cli, ["-b", f"127.0.0.1:{free_port()}", "--timeout", "2", *command])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "cannot reach Kafka" in errors[0]



async def test_a_view_wait_that_times_out_is_a_retriable_view_error(
    broker: BrokerAddress, topic_name: str
) -> None:
    # `wait_for` and `barrier` raise from the tree, and stay catchable as asyncio's timeout.
    from snapbus import Receipt, SnapshotView, ViewError, ViewTimeoutError

    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    async with SnapshotView(config, fetch_max_wait_ms=20) as view:
        ahead = Receipt(topic_name, 0, 10**9, -1, str(uuid.uuid4()))
        with pytest.raises(ViewTimeoutError, match=r"offset 1000000000 .* not applied") as info:
            await view.wait_for(ahead, timeout=0.05)
        assert isinstance(info.value, ViewError)
        assert isinstance(info.value, asyncio.TimeoutError)
        assert info.value.retriable


async def test_a_failed_read_while_looking_for_misplaced_records_is_translated(
    broker: BrokerAddress, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snapbus import ensure_topic
    from snapbus.reader import PartitionReader
    from snapbus.replay import find_misplaced

    config = KafkaConfig(broker.bootstrap_servers, topic_name)
    await ensure_topic(config)

    async def refused(self: PartitionReader, timeout_ms: int) -> None:
        raise kafka_errors.TopicAuthorizationFailedError()

    monkeypatch.setattr(PartitionReader, "read", refused)
    with pytest.raises(KafkaAuthenticationError, match="looking for misplaced records"):
        await find_misplaced(config)
