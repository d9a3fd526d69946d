"""Secure connections: TLS end to end through a TLS-terminating proxy; SASL as far as possible.

The embedded broker (Tansu) cannot serve TLS or SASL itself (BROKER.md), so:

- **TLS** is tested for real, with a CA and a server certificate made here, by a
  `FaultProxy` that terminates TLS in front of the broker (the broker advertises the proxy's
  port, so every connection a client opens is TLS). A publisher and a view with
  ``security_protocol="SSL"`` and ``ssl_cafile`` work end to end; the same settings work from
  ``SNAPBUS_*`` variables and from CLI flags; a client trusting another CA, or a plaintext
  client, is refused with `KafkaUnavailableError` (`KafkaAuthenticationError` naming the
  certificate problem for the wrong CA). Mutual TLS is tested with a proxy that requires a
  client certificate signed by the CA.
- **SASL** is tested only as far as configuration and the wire go: the settings reach aiokafka
  (``client_kwargs``), and a SASL client really starts the SASL handshake with the configured
  mechanism (read off the wire behind the TLS proxy), then fails fast with
  `KafkaAuthenticationError` saying the broker does not enable that mechanism.

A successful SASL login (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), the rejection of a wrong
password, and TLS and mutual TLS served by a real broker are tested against Apache Kafka's own
listeners in tests/test_kafka_security.py (Kafka engine only).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from snapbus.config import KafkaConfig
from snapbus.errors import ConfigError, KafkaUnavailableError
from snapbus.publisher import SnapshotPublisher
from snapbus.view import SnapshotView
from tests.faultproxy import FaultProxy, make_snapshot, proxied_broker
from tests.helpers import ENGINE, round_trip

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_aiokafka")]

WAIT_S = 30.0
SASL_HANDSHAKE = 17
"""Kafka API key of SaslHandshake."""


# ---------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    """CA certificate (PEM) that signed the server and client certificates."""
    other_ca: Path
    """An unrelated CA: trusting it must not let a client in."""
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
               *, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server and a client certificate, plus an unrelated CA, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca("snapbus test CA")
    other_ca, _ = _make_ca("some other CA")
    server, server_key = _make_leaf(ca, ca_key, "snapbus test broker", server=True)
    client, client_key = _make_leaf(ca, ca_key, "snapbus test client", server=False)
    return Pki(
        ca=_write_cert(ca, root / "ca.pem"),
        other_ca=_write_cert(other_ca, root / "other-ca.pem"),
        server_cert=_write_cert(server, root / "server.pem"),
        server_key=_write_key(server_key, root / "server.key"),
        client_cert=_write_cert(client, root / "client.pem"),
        client_key=_write_key(client_key, root / "client.key"),
    )


def server_context(pki: Pki, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def tls_proxy(pki: Pki) -> AsyncIterator[FaultProxy]:
    """A broker reachable only through a TLS-terminating proxy (which records what it read)."""
    async with proxied_broker(ssl=server_context(pki), capture=True) as (proxy, _):
        yield proxy


@pytest.fixture
def tls(tls_proxy: FaultProxy) -> FaultProxy:
    tls_proxy.heal()
    tls_proxy.captured.clear()
    return tls_proxy


def ssl_config(proxy: FaultProxy, topic: str, cafile: Path, **changes: object) -> KafkaConfig:
    config = KafkaConfig(proxy.address, topic, security_protocol="SSL", ssl_cafile=str(cafile),
                         connect_timeout_s=5)
    return config.replace(**changes)


async def run_cli(*args: str, env: dict[str, str] | None = None,
                  timeout: float = 60) -> tuple[int, str, str]:
    """Run ``python -m snapbus`` in a subprocess (the proxy keeps serving in this loop)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPBUS_")}
    child_env.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapbus", *args, env=child_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"snapbus {' '.join(args)} hung for {timeout} s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def sasl_handshakes(captured: list[bytearray]) -> list[str]:
    """The mechanisms named by SaslHandshake requests in the captured client bytes."""
    found = []
    for stream in captured:
        data = bytes(stream)
        while len(data) >= 4:
            (size,) = struct.unpack_from(">i", data)
            frame, data = data[4:4 + size], data[4 + size:]
            if len(frame) < 10:
                break
            api_key, _version, _correlation, client_len = struct.unpack_from(">hhih", frame)
            if api_key == SASL_HANDSHAKE:
                body = frame[10 + max(client_len, 0):]
                (length,) = struct.unpack_from(">h", body)
                found.append(body[2:2 + length].decode())
    return found


# ---------------------------------------------------------------------------- TLS


async def test_tls_publisher_and_view_end_to_end(tls: FaultProxy, pki: Pki,
                                                 topic_name: str) -> None:
    await round_trip(ssl_config(tls, topic_name, pki.ca))
    assert tls.counters.connections > 0


async def test_plaintext_client_cannot_talk_to_the_tls_port(tls: FaultProxy,
                                                            topic_name: str) -> None:
    config = KafkaConfig(tls.address, topic_name, connect_timeout_s=3)
    with pytest.raises(KafkaUnavailableError, match="cannot reach Kafka at"):
        await asyncio.wait_for(SnapshotPublisher(config).start(), 20)


async def test_wrong_ca_is_refused_with_unavailable(tls: FaultProxy, pki: Pki,
                                                    topic_name: str) -> None:
    config = ssl_config(tls, topic_name, pki.other_ca, connect_timeout_s=3)
    for client in (SnapshotPublisher(config), SnapshotView(config)):
        with pytest.raises(KafkaUnavailableError) as info:
            await asyncio.wait_for(client.start(), 20)  # the bound only turns a hang into a failure
        await client.stop()
        message = str(info.value)
        assert f"Kafka at {tls.address}: certificate verify failed" in message
        assert "\n" not in message


async def test_wrong_ca_message_names_the_certificate_problem(tls: FaultProxy, pki: Pki,
                                                              topic_name: str) -> None:
    config = ssl_config(tls, topic_name, pki.other_ca, connect_timeout_s=3)
    with pytest.raises(KafkaUnavailableError) as info:
        await asyncio.wait_for(SnapshotPublisher(config).start(), 20)
    assert "certificate" in str(info.value).lower(), str(info.value)


async def test_mutual_tls_needs_the_client_certificate(pki: Pki, topic_name: str) -> None:
    async with proxied_broker(ssl=server_context(pki, require_client_cert=True)) as (proxy, _):
        mutual = ssl_config(proxy, topic_name, pki.ca, ssl_certfile=str(pki.client_cert),
                            ssl_keyfile=str(pki.client_key))
        await round_trip(mutual)
        without_cert = ssl_config(proxy, topic_name, pki.ca, connect_timeout_s=3)
        with pytest.raises(KafkaUnavailableError, match="cannot reach Kafka at"):
            await asyncio.wait_for(SnapshotPublisher(without_cert).start(), 20)


async def test_tls_settings_from_the_environment(tls: FaultProxy, pki: Pki,
                                                 topic_name: str) -> None:
    config = KafkaConfig.from_env({
        "SNAPBUS_BOOTSTRAP_SERVERS": tls.address,
        "SNAPBUS_TOPIC": topic_name,
        "SNAPBUS_SECURITY_PROTOCOL": "SSL",
        "SNAPBUS_SSL_CAFILE": str(pki.ca),
        "SNAPBUS_CONNECT_TIMEOUT_S": "5",
    })
    assert (config.security_protocol, config.ssl_cafile) == ("SSL", str(pki.ca))
    await round_trip(config)


async def test_tls_settings_from_cli_flags_and_environment(tls: FaultProxy, pki: Pki,
                                                           topic_name: str) -> None:
    snapshot = make_snapshot(agent_name="over tls")
    async with SnapshotPublisher(ssl_config(tls, topic_name, pki.ca)) as publisher:
        await publisher.publish(snapshot)

    flags = ["-b", tls.address, "-t", topic_name, "--timeout", "5",
             "--security-protocol", "SSL", "--ssl-cafile", str(pki.ca)]
    code, out, err = await run_cli(*flags, "ls", "--json")
    assert code == 0, err
    assert [s["session_id"] for s in json.loads(out)] == [str(snapshot.session_id)]

    env = {"SNAPBUS_BOOTSTRAP_SERVERS": tls.address, "SNAPBUS_TOPIC": topic_name,
           "SNAPBUS_SECURITY_PROTOCOL": "SSL", "SNAPBUS_SSL_CAFILE": str(pki.ca)}
    code, out, err = await run_cli("--timeout", "5", "get", str(snapshot.session_id), env=env)
    assert code == 0, err
    assert json.loads(out)["agent_name"] == "over tls"

    # without the CA (or with the wrong one) the same command fails with one clear line
    wrong = [*flags[:-1], str(pki.other_ca)]
    code, out, err = await run_cli(*wrong, "ls")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert f"Kafka at {tls.address}: certificate verify failed" in errors[0]
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- SASL


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_settings_reach_the_aiokafka_client(pki: Pki, mechanism: str) -> None:
    env = {
        "SNAPBUS_BOOTSTRAP_SERVERS": "kafka.example:9093",
        "SNAPBUS_SECURITY_PROTOCOL": "SASL_SSL",
        "SNAPBUS_SASL_MECHANISM": mechanism,
        "SNAPBUS_SASL_USERNAME": "alice",
        "SNAPBUS_SASL_PASSWORD": "s3cret",
        "SNAPBUS_SSL_CAFILE": str(pki.ca),
    }
    config = KafkaConfig.from_env(env)
    assert "s3cret" not in repr(config)
    kwargs = config.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == mechanism
    assert kwargs["sasl_plain_username"] == "alice"
    assert kwargs["sasl_plain_password"] == "s3cret"
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    # aiokafka accepts them as they are (it validates protocol/mechanism pairs on creation)
    producer = AIOKafkaProducer(**kwargs)
    assert producer.client._sasl_mechanism == mechanism
    assert producer.client._security_protocol == "SASL_SSL"

    plaintext = KafkaConfig.from_env({**env, "SNAPBUS_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    assert "ssl_context" not in plaintext.client_kwargs()
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        KafkaConfig.from_env({**env, "SNAPBUS_SASL_MECHANISM": "GSSAPI"})
    with pytest.raises(ConfigError, match="username and password"):
        KafkaConfig.from_env({k: v for k, v in env.items() if k != "SNAPBUS_SASL_PASSWORD"})


def sasl_refusal(mechanism: str) -> str:
    """What the error says when a SASL client reaches the plaintext listener behind the proxy:
    Tansu answers the SASL handshake with no mechanisms; Apache Kafka's plaintext listener does
    not speak SASL at all and closes the connection."""
    if ENGINE == "kafka":
        return "and the SASL_SSL settings"
    return f"the broker does not enable SASL mechanism {mechanism}"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_sasl_ssl_client_handshakes_then_fails_clearly(
    tls: FaultProxy, pki: Pki, topic_name: str, mechanism: str
) -> None:
    config = KafkaConfig(tls.address, topic_name, security_protocol="SASL_SSL",
                         sasl_mechanism=mechanism, sasl_username="alice", sasl_password="s3cret",
                         ssl_cafile=str(pki.ca), connect_timeout_s=3)
    loop = asyncio.get_running_loop()
    for client in (SnapshotPublisher(config), SnapshotView(config)):
        started = loop.time()
        with pytest.raises(KafkaUnavailableError) as info:
            await asyncio.wait_for(client.start(), 20)  # the bound only turns a hang into a failure
        await client.stop()
        assert loop.time() - started < 10
        assert f"Kafka at {tls.address}" in str(info.value)
        assert sasl_refusal(mechanism) in str(info.value)
    # the client did speak SASL over TLS with the configured mechanism (read behind the proxy)
    assert mechanism in sasl_handshakes(tls.captured)


async def test_sasl_failure_message_points_at_the_sasl_settings(tls: FaultProxy, pki: Pki,
                                                                topic_name: str) -> None:
    """The error names why the broker refused (aiokafka only logs it) and the setting to fix."""
    config = KafkaConfig(tls.address, topic_name, security_protocol="SASL_SSL",
                         sasl_mechanism="PLAIN", sasl_username="alice", sasl_password="s3cret",
                         ssl_cafile=str(pki.ca), connect_timeout_s=3)
    with pytest.raises(KafkaUnavailableError) as info:
        await asyncio.wait_for(SnapshotPublisher(config).start(), 20)
    message = str(info.value)
    assert sasl_refusal("PLAIN") in message, message
    if ENGINE == "tansu":
        assert "--sasl-mechanism (SNAPBUS_SASL_MECHANISM)" in message, message
    assert "s3cret" not in message


async def test_sasl_settings_from_cli_flags_fail_clearly(tls: FaultProxy, pki: Pki,
                                                         topic_name: str) -> None:
    code, _, err = await run_cli(
        "-b", tls.address, "-t", topic_name, "--timeout", "3",
        "--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-512",
        "--sasl-username", "alice", "--sasl-password", "s3cret", "--ssl-cafile", str(pki.ca),
        "ls",
    )
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert sasl_refusal("SCRAM-SHA-512") in errors[0]
    assert "s3cret" not in err
    assert "SCRAM-SHA-512" in sasl_handshakes(tls.captured)
