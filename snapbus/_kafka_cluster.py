"""Several Apache Kafka KRaft nodes as one cluster, for the "kafka" engine (internal).

Every node is a broker and a controller in its own JVM, with its own ports and data directory,
so one can be killed, stopped or restarted alone. The controller quorum is static
(``controller.quorum.voters`` lists every node; the storage of each is formatted with one shared
cluster id before its first start), so a majority of nodes (two of three) keeps the cluster
writable. All nodes start in parallel: a node only serves clients once a quorum elected a
controller, which needs the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from snapbus._kafka_broker import (
    KafkaNode,
    Quorum,
    TlsFiles,
    existing_cluster_id,
    new_cluster_id,
)
from snapbus._process import HOST, Child
from snapbus.errors import BrokerError

__all__ = ["KafkaCluster"]


class KafkaCluster:
    """One or more Kafka nodes; with one node exactly the single-node engine of old."""

    def __init__(
        self,
        *,
        nodes: int,
        port: int | None,
        advertised_port: int | None,
        advertised_ports: Mapping[int, int] | None,
        data_dir: str | os.PathLike[str] | None,
        broker_config: Mapping[str, object] | None,
        scram_users: Mapping[str, str] | None,
        tls: bool,
        tls_client_auth: bool,
    ) -> None:
        if nodes > 1:
            given = [name for name, used in (
                ("port", port is not None), ("advertised_port", advertised_port is not None),
                ("scram_users", bool(scram_users)), ("tls", tls or tls_client_auth),
            ) if used]
            if given:
                raise BrokerError(f"{', '.join(given)} needs nodes=1 (a cluster picks free "
                                  "ports and has no SASL or TLS listener)")
        advertised = dict(advertised_ports or {})
        unknown = sorted(set(advertised) - set(range(1, nodes + 1)))
        if unknown:
            raise BrokerError(f"advertised_ports names no node {unknown[0]}: the node ids are "
                              f"1 to {nodes}")
        if advertised and advertised_port is not None:
            raise BrokerError("advertised_port and advertised_ports: pass one of them")
        self._nodes: dict[int, KafkaNode] = {}
        for node_id in range(1, nodes + 1):
            node_dir = data_dir
            if data_dir is not None and nodes > 1:
                node_dir = Path(data_dir) / f"node-{node_id}"
            self._nodes[node_id] = KafkaNode(
                port=port, advertised_port=advertised.get(node_id, advertised_port),
                data_dir=node_dir, broker_config=broker_config, scram_users=scram_users,
                tls=tls, tls_client_auth=tls_client_auth, node_id=node_id,
                internal_listener=nodes > 1,
            )

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(self._nodes)

    def node(self, node_id: int) -> KafkaNode:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise BrokerError(f"no Kafka node {node_id}: the nodes are "
                              f"{', '.join(map(str, self._nodes))}") from None

    @property
    def first(self) -> KafkaNode:
        return next(iter(self._nodes.values()))

    @property
    def port(self) -> int | None:
        return self.first.port

    @property
    def child(self) -> Child | None:
        return self.first.child

    @property
    def tls_files(self) -> TlsFiles | None:
        return self.first.tls_files

    def alive(self) -> bool:
        return all(node.alive() for node in self._nodes.values())

    @property
    def bootstrap_servers(self) -> str:
        """Every node's plaintext listener on its real (not advertised) port."""
        return ",".join(f"{HOST}:{node.port}" for node in self._nodes.values())

    @property
    def listeners(self) -> dict[str, str]:
        """Each protocol mapped to the advertised ``host:port`` of every node, comma-separated."""
        joined: dict[str, list[str]] = {}
        for node in self._nodes.values():
            for protocol, address in node.listeners.items():
                joined.setdefault(protocol, []).append(address)
        return {protocol: ",".join(addresses) for protocol, addresses in joined.items()}

    async def start(self, deadline: float, node_id: int | None = None) -> None:
        """Start the given node, or every node not running, in parallel."""
        nodes = [self.node(node_id)] if node_id is not None else list(self._nodes.values())
        nodes = [node for node in nodes if not node.alive()]
        if len(self._nodes) > 1:
            self._plan_quorum()
        for node in nodes:
            node.kill()
        try:
            await asyncio.gather(*(node.start(deadline) for node in nodes))
        except BaseException:
            for node in nodes:
                node.kill()
            raise

    def _plan_quorum(self) -> None:
        """Give every node its ports and the static voters (once per life of the ports)."""
        if all(node.quorum is not None for node in self._nodes.values()):
            return
        for node in self._nodes.values():
            if not node.ports_assigned:
                node.assign_ports()
        cluster_id = None
        for node in self._nodes.values():
            if node.data_dir is not None:
                cluster_id = cluster_id or existing_cluster_id(node.data_dir)
        voters = ",".join(f"{node.node_id}@{HOST}:{node.controller_port}"
                          for node in self._nodes.values())
        quorum = Quorum(cluster_id or new_cluster_id(), voters, len(self._nodes))
        for node in self._nodes.values():
            node.quorum = quorum

    async def stop(self, node_id: int | None = None) -> None:
        """Stop one node in order, keeping its data; or every node, dropping temporary data."""
        if node_id is not None:
            await self.node(node_id).halt()
            return
        await asyncio.gather(*(node.stop() for node in self._nodes.values()))
        for node in self._nodes.values():
            node.quorum = None  # (the next start plans the quorum anew)

    def quorum_leader(self) -> int | None:
        """The active controller per the newest quorum state a running node wrote."""
        newest: tuple[int, int] | None = None
        for node in self._nodes.values():
            if not node.alive() or node.data_dir is None:
                continue
            path = node.data_dir / "log" / "__cluster_metadata-0" / "quorum-state"
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                state = json.loads(path.read_text(encoding="utf-8"))
                found = (int(state["leaderEpoch"]), int(state["leaderId"]))
                if newest is None or found[0] > newest[0]:
                    newest = found
        if newest is None or newest[1] < 0:
            return None
        return newest[1]

    def kill(self, node_id: int | None = None) -> None:
        nodes = [self.node(node_id)] if node_id is not None else list(self._nodes.values())
        for node in nodes:
            node.kill()
