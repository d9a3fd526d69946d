"""The "kafka" engine of the embedded broker: Apache Kafka from its Maven jars (internal).

A single KRaft node (broker and controller in one JVM) started from the jars of the release
pinned in ``kafka-engine.pom.xml``. Maven resolves them once into the user's local repository;
the resulting class path is cached under ``$XDG_CACHE_HOME/snapbus`` (``~/.cache/snapbus``), so
later starts neither run Maven nor download anything.

Listeners, each on its own free loopback port: ``PLAINTEXT`` always; ``SASL_PLAINTEXT`` when
SCRAM users are given (SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN, the same credentials for each);
``SSL`` when TLS is on (a CA, a server and a client certificate are made for the broker); and
``SASL_SSL`` when both are. A node of a multi-node cluster also has ``INTERNAL`` (plaintext),
the listener brokers replicate over, so client listeners can be faulted (or advertised through a
proxy) without touching replication; the controllers talk over ``CONTROLLER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import uuid
import weakref
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

from snapbus._process import (
    HOST,
    POLL_INTERVAL,
    Child,
    answers_metadata,
    check_progress,
    free_port,
    port_is_free,
)
from snapbus.errors import BrokerError

__all__ = ["KafkaNode", "Quorum", "TlsFiles", "kafka_version"]

_POM = "kafka-engine.pom.xml"
_JAVA_HINT = "install a JDK 17 or newer (e.g. apt-get install openjdk-17-jdk-headless)"
_MAVEN_HINT = "install Maven (e.g. apt-get install maven)"
_HEAP = "-Xmx768m"
_CLUSTER_HEAP = "-Xmx320m"
# JVM threads of a cluster node: three JVMs share a small machine
_CLUSTER_JVM = ("-Xms96m", "-XX:ParallelGCThreads=1", "-XX:ConcGCThreads=1",
                "-XX:CICompilerCount=2", "-Xss512k")
_NODE_ID = 1
_ORDERLY_STOP_S = 30.0
_MAVEN_TIMEOUT_S = 600.0
_LOG4J2 = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        Pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
      - name: kafka.Kafka
        level: INFO
"""


@dataclasses.dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files made for a broker with TLS: point a client's ``ssl_*`` settings at them."""

    cafile: str
    """The CA that signed the broker's and the client's certificates (trust this)."""
    certfile: str
    """A client certificate the broker accepts (for mutual TLS)."""
    keyfile: str
    """The client certificate's private key."""


def kafka_version() -> str:
    """The Apache Kafka release the engine runs (from the pinned pom)."""
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", _pom_text())
    if match is None:  # pragma: no cover - the pom ships with the package
        raise BrokerError(f"{_POM} names no kafka.version")
    return match.group(1)


@dataclasses.dataclass(frozen=True, slots=True)
class Quorum:
    """The controller quorum a node of a multi-node cluster belongs to (static voters)."""

    cluster_id: str
    voters: str
    """``id@host:port,...``: every node's controller listener."""
    size: int
    """Number of nodes (each a broker and a controller)."""


class KafkaNode:
    """One Apache Kafka KRaft node in a child process; see the module docstring."""

    def __init__(
        self,
        *,
        port: int | None,
        advertised_port: int | None,
        data_dir: str | os.PathLike[str] | None,
        broker_config: Mapping[str, object] | None,
        scram_users: Mapping[str, str] | None,
        tls: bool,
        tls_client_auth: bool,
        node_id: int = _NODE_ID,
        internal_listener: bool = False,
    ) -> None:
        self.node_id = node_id
        self.quorum: Quorum | None = None
        self._controller_port = 0
        # (a cluster's replication has its own listener, so a client-side fault spares it)
        self._internal_listener = internal_listener
        self._internal_port = 0
        self._port = port
        self._advertised_port = advertised_port
        self._keep_data = data_dir is not None
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._broker_config = {str(k): _property(v) for k, v in (broker_config or {}).items()}
        self._scram_users = dict(scram_users or {})
        for user in self._scram_users:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", user):
                raise BrokerError(f"SCRAM user name {user!r}: use letters, digits, . _ -")
        self._tls = tls or tls_client_auth
        self._tls_client_auth = tls_client_auth
        self._ports: dict[str, int] = {}
        self._remove_data: Callable[[], object] | None = None  # (a weakref.finalize)
        self._child: Child | None = None
        self.tls_files: TlsFiles | None = None

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def child(self) -> Child | None:
        return self._child

    @property
    def controller_port(self) -> int:
        return self._controller_port

    @property
    def data_dir(self) -> Path | None:
        return self._data_dir

    @property
    def ports_assigned(self) -> bool:
        return bool(self._ports)

    def alive(self) -> bool:
        return self._child is not None and self._child.alive()

    @property
    def listeners(self) -> dict[str, str]:
        """Each client security protocol mapped to its ``host:port``."""
        ports = dict(self._ports)
        if self._advertised_port is not None and "PLAINTEXT" in ports:
            ports["PLAINTEXT"] = self._advertised_port
        return {protocol: f"{HOST}:{p}" for protocol, p in ports.items()}

    async def start(self, deadline: float) -> None:
        java = await asyncio.to_thread(_java)
        classpath = await asyncio.to_thread(_classpath)
        first = self._data_dir is None
        if self._data_dir is None:
            temporary = Path(tempfile.mkdtemp(prefix="snapbus-kafka-"))
            self._data_dir = temporary
            # (removed by stop(), or at the latest when this object or the interpreter goes)
            self._remove_data = weakref.finalize(self, shutil.rmtree, temporary, True)
        try:
            await self._start(java, classpath, first, deadline)
        except BaseException:
            if first:  # (nothing of a failed first start stays on disk: TLS keys included)
                self._drop_temporary_data()
            raise

    async def _start(self, java: str, classpath: str, first: bool, deadline: float) -> None:
        assert self._data_dir is not None
        self._data_dir.mkdir(parents=True, exist_ok=True)
        if not self._ports:
            self.assign_ports()
        else:
            for protocol, p in self._ports.items():
                if not port_is_free(p):
                    raise BrokerError(
                        f"port {p} on {HOST} ({protocol}) is already in use: stop what holds it"
                    )
        if self._tls and self.tls_files is None:
            self.tls_files = await asyncio.to_thread(_make_tls_files, self._data_dir / "tls")
        properties = self._data_dir / "server.properties"
        properties.write_text(self._render_properties(), encoding="utf-8")
        (self._data_dir / "log4j2.yaml").write_text(_LOG4J2, encoding="utf-8")
        if not (self._data_dir / "log" / "meta.properties").exists():
            await asyncio.to_thread(self._format, java, classpath, properties)
        jvm = [_CLUSTER_HEAP, *_CLUSTER_JVM] if self.quorum is not None else [_HEAP]
        argv = [
            java, *jvm, "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._data_dir / 'log4j2.yaml'}",
            "-cp", classpath, "kafka.Kafka", str(properties),
        ]
        self._child = child = Child("kafka", argv, env=dict(os.environ))
        port = self._ports["PLAINTEXT"]
        while not (await answers_metadata(port) and child.alive()):
            check_progress(child, "the Kafka broker", deadline)
            await asyncio.sleep(POLL_INTERVAL)

    async def stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            await child.terminate()
        if not self._keep_data and self._data_dir is not None:
            await asyncio.to_thread(self._drop_temporary_data)

    async def halt(self) -> None:
        """Stop the process in order (SIGTERM: a controlled shutdown), keeping its data."""
        child, self._child = self._child, None
        if child is not None:
            await child.terminate(_ORDERLY_STOP_S)

    def _drop_temporary_data(self) -> None:
        if self._remove_data is not None:
            self._remove_data()
            self._remove_data = None
            self._data_dir = None
            self.tls_files = None
            self._ports = {}

    def kill(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.close()

    def assign_ports(self) -> None:
        protocols = ["PLAINTEXT", "CONTROLLER"]
        if self._internal_listener:
            protocols.append("INTERNAL")
        if self._scram_users:
            protocols.append("SASL_PLAINTEXT")
        if self._tls:
            protocols.append("SSL")
        if self._tls and self._scram_users:
            protocols.append("SASL_SSL")
        ports: dict[str, int] = {}
        for protocol in protocols:
            if protocol == "PLAINTEXT" and self._port is not None:
                if not port_is_free(self._port):
                    raise BrokerError(
                        f"port {self._port} on {HOST} is already in use: pass another port, "
                        "or none to let the broker pick a free one"
                    )
                ports[protocol] = self._port
                continue
            found = free_port()
            while found in ports.values():
                found = free_port()
            ports[protocol] = found
        self._port = ports["PLAINTEXT"]
        self._controller_port = ports.pop("CONTROLLER")
        self._internal_port = ports.pop("INTERNAL", 0)
        self._ports = ports

    def _render_properties(self) -> str:
        assert self._data_dir is not None
        ports = self._ports
        advertised = dict(ports)
        if self._advertised_port is not None:
            advertised["PLAINTEXT"] = self._advertised_port
        listeners = [f"{p}://{HOST}:{port}" for p, port in ports.items()]
        listeners.append(f"CONTROLLER://{HOST}:{self._controller_port}")
        internal = []  # (brokers replicate over INTERNAL, clients use the others)
        if self._internal_port:
            internal = [f"INTERNAL://{HOST}:{self._internal_port}"]
        listeners += internal
        quorum = self.quorum
        replicas = min(3, quorum.size) if quorum is not None else 1
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": (quorum.voters if quorum is not None
                                         else f"{_NODE_ID}@{HOST}:{self._controller_port}"),
            "controller.listener.names": "CONTROLLER",
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join([f"{p}://{HOST}:{port}"
                                              for p, port in advertised.items()] + internal),
            "listener.security.protocol.map": ",".join(
                [f"{p}:{p}" for p in ports] + ["CONTROLLER:PLAINTEXT"]
                + (["INTERNAL:PLAINTEXT"] if internal else [])
            ),
            "inter.broker.listener.name": "INTERNAL" if internal else "PLAINTEXT",
            "log.dirs": str(self._data_dir / "log"),
            "num.partitions": "1",
            # one node: the internal topics cannot have three replicas
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min(2, replicas)),
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min(2, replicas)),
            "group.initial.rebalance.delay.ms": "0",
            "log.flush.interval.messages": str(2**62),
        }
        if quorum is not None:  # several JVMs on one small machine: few threads each
            props.update({
                "default.replication.factor": str(replicas),
                "num.network.threads": "1",
                "num.io.threads": "2",
                "background.threads": "2",
                "num.replica.fetchers": "1",
                "num.recovery.threads.per.data.dir": "1",
                "log.cleaner.threads": "1",
            })
        if self._scram_users:
            mechanisms = "SCRAM-SHA-256,SCRAM-SHA-512,PLAIN"
            props["sasl.enabled.mechanisms"] = mechanisms
            plain_users = " ".join(
                f'user_{user}="{_jaas_escape(password)}"'
                for user, password in self._scram_users.items()
            )
            for listener in ("sasl_plaintext", "sasl_ssl"):
                if listener.upper() not in ports:
                    continue
                prefix = f"listener.name.{listener}"
                props[f"{prefix}.plain.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f"{plain_users};"
                )
                for mechanism in ("scram-sha-256", "scram-sha-512"):
                    props[f"{prefix}.{mechanism}.sasl.jaas.config"] = (
                        "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                    )
        if self._tls:
            tls_dir = self._data_dir / "tls"
            props.update({
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(tls_dir / "broker.pem"),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(tls_dir / "ca.pem"),
                "ssl.client.auth": "required" if self._tls_client_auth else "none",
            })
        props.update(self._broker_config)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _format(self, java: str, classpath: str, properties: Path) -> None:
        argv = [java, "-cp", classpath, "kafka.tools.StorageTool", "format",
                "--config", str(properties), "--cluster-id",
                self.quorum.cluster_id if self.quorum is not None else _cluster_id(),
                "--ignore-formatted"]
        for user, password in self._scram_users.items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                argv += ["--add-scram", f"{mechanism}=[name={user},password={password}]"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-2000:]
            raise BrokerError(f"formatting the Kafka storage failed: {output}")


def _property(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _jaas_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def existing_cluster_id(data_dir: Path) -> str | None:
    """The cluster id a node's storage was formatted with, or None if it is not formatted."""
    with contextlib.suppress(OSError):
        text = (data_dir / "log" / "meta.properties").read_text(encoding="utf-8")
        match = re.search(r"^cluster\.id=(\S+)$", text, re.MULTILINE)
        if match is not None:
            return match.group(1)
    return None


def new_cluster_id() -> str:
    """A fresh Kafka cluster id."""
    return _cluster_id()


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes in URL-safe base64 without padding, never starting
    with "-" (the storage tool would read it as an option)."""
    import base64

    while True:
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not found.startswith("-"):
            return found


def _pom_text() -> str:
    return resources.files("snapbus").joinpath(_POM).read_text(encoding="utf-8")


def _java() -> str:
    """The java command to run (JAVA_HOME first, then PATH), checked to be 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    candidate = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not candidate or not os.access(candidate, os.X_OK):
        where = f"JAVA_HOME={home} has no bin/java" if home else "no java on PATH"
        raise BrokerError(f"the Kafka engine needs Java 17+ ({where}): {_JAVA_HINT}")
    try:
        done = subprocess.run([candidate, "-version"], capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"could not run {candidate} -version: {exc}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8.0_..." is Java 8
        major = int(match.group(2))
    if major < 17:
        raise BrokerError(f"the Kafka engine needs Java 17+, {candidate} is Java {major or '?'}: "
                          f"{_JAVA_HINT}")
    return candidate


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "snapbus"


def _classpath() -> str:
    """The broker's class path: from the cache when every jar in it is still there, else from
    Maven (which downloads what the local repository lacks)."""
    pom = _pom_text()
    digest = hashlib.sha256(pom.encode()).hexdigest()[:16]
    cache = _cache_dir() / f"kafka-{kafka_version()}-{digest}.classpath"
    with contextlib.suppress(OSError):
        cached = cache.read_text(encoding="utf-8").strip()
        if cached and all(Path(jar).is_file() for jar in cached.split(os.pathsep)):
            return cached
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(f"the Kafka engine resolves the broker's jars with Maven, and there "
                          f"is no mvn on PATH: {_MAVEN_HINT}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="snapbus-maven-") as work:
        (Path(work) / "pom.xml").write_text(pom, encoding="utf-8")
        out = Path(work) / "classpath.txt"
        try:
            done = subprocess.run(
                [mvn, "-q", "-B", "-f", str(Path(work) / "pom.xml"),
                 "dependency:build-classpath", f"-Dmdep.outputFile={out}"],
                capture_output=True, text=True, check=False, timeout=_MAVEN_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrokerError(f"Maven could not resolve the Kafka jars: {exc}") from exc
        if done.returncode != 0 or not out.is_file():
            output = done.stdout + done.stderr
            log_file = cache.with_suffix(".maven.log")
            try:
                log_file.write_text(output, encoding="utf-8")
                where = f" (Maven's output: {log_file})"
            except OSError:
                where = ""
            raise BrokerError(f"Maven could not resolve the Kafka {kafka_version()} jars "
                              f"(exit {done.returncode}): {_first_error(output)}{where}")
        classpath = out.read_text(encoding="utf-8").strip()
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(classpath, encoding="utf-8")
    os.replace(tmp, cache)
    return classpath


def _make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA, a broker certificate for 127.0.0.1/localhost and a client certificate."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise BrokerError("a TLS listener needs the cryptography package: "
                          "pip install cryptography") from exc
    import datetime
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(name("snapbus test CA"))
        .issuer_name(name("snapbus test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST)),
            ]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    broker_cert, broker_key = leaf("snapbus broker", ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = leaf("snapbus client", ExtendedKeyUsageOID.CLIENT_AUTH)
    (directory / "ca.pem").write_bytes(ca_pem)
    (directory / "broker.pem").write_bytes(broker_key + broker_cert + ca_pem)
    (directory / "client.pem").write_bytes(client_cert)
    (directory / "client-key.pem").write_bytes(client_key)
    return TlsFiles(str(directory / "ca.pem"), str(directory / "client.pem"),
                    str(directory / "client-key.pem"))


def prepare() -> str:
    """Check Java and resolve (download once) the broker's jars; return the class path.

    Raises:
        BrokerError: no Java 17+, no Maven, or the jars cannot be resolved.
    """
    _java()
    return _classpath()


def _first_error(output: str) -> str:
    """The line of Maven's output that says what failed, on one line and short."""
    lines = [line.strip() for line in output.splitlines()]
    errors = [text for line in lines
              if line.startswith("[ERROR]") and (text := line.removeprefix("[ERROR]").strip())]
    line = (errors or [line for line in lines if line] or ["no output"])[0]
    return line if len(line) <= 300 else line[:297] + "..."


if __name__ == "__main__":  # `python -m snapbus._kafka_broker`: what `make test` runs first
    import sys

    try:
        jars = prepare().split(os.pathsep)
    except BrokerError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    print(f"Apache Kafka {kafka_version()}: {len(jars)} jars ready")
