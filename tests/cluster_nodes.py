"""A real Redis Cluster on one machine: ``redis-server --cluster-enabled yes`` processes
on ephemeral ports, joined by ``redis-cli --cluster create``, with fault controls.

``LocalCluster(server, cli, masters=3, replicas=2)`` starts ``masters * (1 +
replicas)`` nodes with a short ``cluster-node-timeout`` (a killed master's replica
takes over within a few seconds). Nodes can be killed (SIGKILL), restarted with their
cluster config (a killed master comes back as a replica of its successor), promoted
by hand (``CLUSTER FAILOVER`` on a replica), and slots moved with ``redis-cli
--cluster reshard``. Without ``persistent`` a node keeps no data across a restart;
with it every write is in an append-only file, fsynced (``appendfsync always``).
``wrap`` turns each node's command line into the one to run (``taskset``, say).

No test dependencies: the tests (tests/redis_cluster.py) and the benchmark use it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from tests.redis_binary import find_redis_server

NODE_TIMEOUT_MS = 1500
START_TIMEOUT = 30.0


def find_cluster_tools() -> tuple[str, str] | None:
    """redis-server and redis-cli, or None."""
    server, cli = find_redis_server(), shutil.which("redis-cli")
    return None if server is None or cli is None else (server, cli)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = random.randint(20000, 50000)
        if port not in taken and _free(port) and _free(port + 10000):
            return port


@dataclass
class Node:
    port: int
    process: subprocess.Popen[bytes] | None = None

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalCluster:
    """Nodes of one Redis Cluster on 127.0.0.1 (see the module)."""

    def __init__(self, server: str, cli: str, masters: int = 3, replicas: int = 2,
                 persistent: bool = False,
                 wrap: Callable[[list[str]], list[str]] = list) -> None:
        self.server, self.cli, self.wrap = server, cli, wrap
        self.masters_wanted = masters
        self.replicas = replicas
        self.persistent = persistent
        self.dir = tempfile.mkdtemp(prefix="squall-cluster-")
        taken: set[int] = set()
        self.nodes: list[Node] = []
        for _ in range(masters * (1 + replicas)):
            port = cluster_port(taken)
            taken.update((port, port + 10000))
            self.nodes.append(Node(port))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> LocalCluster:
        for node in self.nodes:
            self.start_node(node)
        command = [self.cli, "--cluster", "create", *(node.address for node in self.nodes),
                   "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        subprocess.run(command, check=True, capture_output=True, timeout=START_TIMEOUT)
        self.wait_ok()
        return self

    def start_node(self, node: Node) -> None:
        data = os.path.join(self.dir, str(node.port))
        os.makedirs(data, exist_ok=True)
        persistence = (["--appendonly", "yes", "--appendfsync", "always"]
                       if self.persistent else ["--appendonly", "no"])
        node.process = subprocess.Popen(self.wrap(
            [self.server, "--port", str(node.port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "", *persistence,
             "--repl-diskless-sync-delay", "0",
             "--dir", data, "--protected-mode", "no", "--loglevel", "warning"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"redis-server on {node.port} exited")
            try:
                with node.client() as admin:
                    admin.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
            except redis.ResponseError:  # loading its data
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on {node.port} did not answer")

    def stop(self) -> None:
        for node in self.nodes:
            self.stop_node(node)
        shutil.rmtree(self.dir, ignore_errors=True)

    def stop_node(self, node: Node) -> None:
        if node.process is None:
            return
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGCONT)
            node.process.terminate()
            try:
                node.process.wait(5)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        node.process = None

    def kill(self, node: Node) -> None:
        """Die at once: its connections break; without persistence its data is gone."""
        assert node.process is not None
        node.process.kill()
        node.process.wait()
        node.process = None

    def restart_all(self) -> None:
        """Every node killed, then started again with its cluster config."""
        for node in self.nodes:
            if node.process is not None:
                self.kill(node)
        for node in self.nodes:
            self.start_node(node)
        self.wait_ok()

    # -- state -------------------------------------------------------------------------

    def url(self) -> str:
        live = [node for node in self.nodes if node.process is not None]
        return "redis+cluster://" + ",".join(node.address for node in live[:3])

    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.process is not None]

    def view(self) -> list[dict[str, str]]:
        """CLUSTER NODES as a live node sees it: id, address, flags, master, slots."""
        for node in self.live():
            try:
                with node.client() as admin:
                    text = admin.execute_command("CLUSTER", "NODES")
                break
            except redis.RedisError:
                continue
        else:
            raise RuntimeError("no cluster node answers")
        text = text.decode() if isinstance(text, bytes) else text
        rows = []
        for line in text.splitlines():
            parts = line.split()
            rows.append({"id": parts[0], "address": parts[1].split("@")[0],
                         "flags": parts[2], "master": parts[3], "slots": " ".join(parts[8:])})
        return rows

    def node_at(self, address: str) -> Node:
        return next(node for node in self.nodes if node.address == address)

    def masters(self) -> list[Node]:
        return [self.node_at(row["address"]) for row in self.view()
                if "master" in row["flags"] and "fail" not in row["flags"] and row["slots"]]

    def node_id(self, node: Node) -> str:
        return next(row["id"] for row in self.view() if row["address"] == node.address)

    def replicas_of(self, master: Node) -> list[Node]:
        master_id = self.node_id(master)
        return [self.node_at(row["address"]) for row in self.view()
                if row["master"] == master_id and "fail" not in row["flags"]]

    def master_of_slot(self, slot: int) -> Node:
        for row in self.view():
            if "master" not in row["flags"] or "fail" in row["flags"]:
                continue
            for part in row["slots"].split():
                if part.startswith("["):
                    continue
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return self.node_at(row["address"])
        raise LookupError(f"no master serves slot {slot}")

    def ok(self) -> bool:
        """Every live node sees all slots served and the same number of masters, and
        every replica is in sync with its master (only then can it be promoted)."""
        for node in self.live():
            try:
                with node.client(timeout=1.0) as admin:
                    info = admin.execute_command("CLUSTER", "INFO")
                    replication = admin.info("replication")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                return False
            if f"cluster_size:{self.masters_wanted}" not in text:
                return False
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        return True

    def wait_ok(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ok():
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ok in time")
            time.sleep(0.05)

    def flush(self) -> None:
        for node in self.masters():
            with node.client() as admin:
                admin.flushall()

    # -- faults --------------------------------------------------------------------------

    def promote(self, replica: Node) -> None:
        """A manual failover: the replica takes its master's slots, the master follows."""
        with replica.client() as admin:
            admin.execute_command("CLUSTER", "FAILOVER")

    def reshard(self, source: Node, target: Node, slots: int) -> subprocess.Popen[bytes]:
        """Start moving ``slots`` slots from one master to another; returns the process."""
        return subprocess.Popen(
            [self.cli, "--cluster", "reshard", source.address, "--cluster-from",
             self.node_id(source), "--cluster-to", self.node_id(target), "--cluster-slots",
             str(slots), "--cluster-yes", "--cluster-pipeline", "10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
