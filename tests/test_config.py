"""KafkaConfig: settings from arguments and the environment, validated."""

from pathlib import Path

import pytest

from snapbus import ConfigError, KafkaConfig, ValidationError


def test_defaults_and_env_with_overrides_winning() -> None:
    env = {"SNAPBUS_BOOTSTRAP_SERVERS": "k1:9092, k2:9093", "SNAPBUS_TOPIC": "sessions",
           "SNAPBUS_CONNECT_TIMEOUT_S": "3.5"}
    config = KafkaConfig.from_env(env)
    assert config.bootstrap_servers == "k1:9092,k2:9093"
    assert config.topic == "sessions"
    assert config.connect_timeout_s == 3.5
    assert KafkaConfig.from_env(env, topic="other", client_id=None).topic == "other"
    assert KafkaConfig.from_env({}).topic == "snapbus.workspace-sessions"


@pytest.mark.parametrize("servers", ["", "nohost", "host:port", "a:1,,b"])
def test_bad_bootstrap_servers(servers: str) -> None:
    if servers == "a:1,,b":
        with pytest.raises(ConfigError, match="'b'"):
            KafkaConfig(bootstrap_servers=servers)
        return
    with pytest.raises(ConfigError):
        KafkaConfig(bootstrap_servers=servers)


@pytest.mark.parametrize("topic", ["", ".", "..", "has space", "x" * 250, "slash/no"])
def test_bad_topic_names(topic: str) -> None:
    with pytest.raises(ValidationError, match="invalid topic name") as info:
        KafkaConfig(topic=topic)
    assert info.value.field == "topic"


def test_sasl_needs_mechanism_and_credentials() -> None:
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        KafkaConfig(security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ConfigError, match="username and password"):
        KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")
    config = KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
                         sasl_username="u", sasl_password="secret")
    kwargs = config.client_kwargs()
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
    assert kwargs["sasl_plain_username"] == "u"
    assert kwargs["sasl_plain_password"] == "secret"
    assert "secret" not in repr(config)


def test_ssl_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ssl_cafile"):
        KafkaConfig(security_protocol="SSL", ssl_cafile=str(tmp_path / "missing.pem"))
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="both ssl_certfile and ssl_keyfile"):
        KafkaConfig(security_protocol="SSL", ssl_certfile=str(cert))


def test_unknown_security_protocol() -> None:
    with pytest.raises(ConfigError, match="security protocol"):
        KafkaConfig(security_protocol="TLS")  # type: ignore[arg-type]
