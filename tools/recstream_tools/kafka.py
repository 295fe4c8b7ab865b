"""Apache Kafka on loopback for the tests, the benchmarks and ``recstream demo --broker kafka``.

The broker is the release pinned in ``tools/kafka-broker/pom.xml``, resolved from Maven Central
with its runtime dependencies into the ignored cache ``.cache/kafka/`` (Maven checks each
artifact's checksum) and run with the machine's Java 17 in KRaft mode: every node is
broker and controller at once, its storage formatted with one cluster id, its log on disk
under the cluster's work directory, so a node killed with SIGKILL restarts from its log.

    with KafkaCluster(tmp_path, nodes=3) as cluster:
        cluster.bootstrap_servers   # "127.0.0.1:PORT,127.0.0.1:PORT,127.0.0.1:PORT"
        cluster.kill(2); cluster.start_node(2)

With three nodes, topics default to replication factor 3 with ``min.insync.replicas`` 2
(the internal offsets and transaction topics too), so one node can fail under
``acks=all`` producers without losing a write.

``python -m recstream_tools.kafka start [--nodes N]`` (``scripts/kafka``) starts a cluster
in the background and prints its bootstrap servers as its last line; ``stop`` stops it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

from kafka.errors import KafkaError

from recstream_tools.probe import HOST, answers_as, free_port
from recstream_tools.process import Service, stop_process
from stream_worker.broker import admin_client
from stream_worker.errors import BrokerError

__all__ = ["KafkaCluster", "kafka_classpath"]

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
POM = PROJECT / "tools" / "kafka-broker" / "pom.xml"
CACHE = PROJECT / ".cache" / "kafka"
STATE_DIR = PROJECT / "var" / "kafka"  # scripts/kafka's cluster
_LOG_TAIL_LINES = 30
_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def kafka_classpath() -> str:
    """The broker's Java classpath, resolved by Maven on first use and then cached.

    The cache is keyed by the pom's hash, so a new pinned release resolves anew.

    :raises BrokerError: Maven or Java is missing, or the resolution failed.
    """
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    cp_file = CACHE / f"classpath-{digest}.txt"
    if cp_file.is_file():
        classpath = cp_file.read_text().strip()
        if all(os.path.isfile(jar) for jar in classpath.split(os.pathsep)):
            return classpath
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "Apache Kafka is resolved with Maven: install it (apt-get install maven)."
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cp_file.with_suffix(".tmp")
    cmd = [
        mvn, "-B", "-q", "--strict-checksums", "-f", str(POM),
        f"-Dmaven.repo.local={CACHE / 'm2'}",
        "dependency:build-classpath", f"-Dmdep.outputFile={tmp}",
    ]  # fmt: skip
    log.info("resolving Apache Kafka from Maven Central (%s)...", POM)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not tmp.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BrokerError(f"Maven could not resolve Apache Kafka ({POM}):\n{tail}")
    tmp.replace(cp_file)
    return cp_file.read_text().strip()


SCRAM_MECHANISM = "SCRAM-SHA-512"


def secured(ca: Path, cert: Path, key: Path, keystore: Path) -> dict[str, Any]:
    """``KafkaCluster`` arguments for a secured cluster: a SASL_SSL listener ``SECURE``
    (SCRAM-SHA-512 over TLS) and a mutual-TLS listener ``MTLS`` (client certificates
    signed by ``ca``), both with the server certificate ``cert``/``key`` (PEM, the key
    unencrypted PKCS#8), under the StandardAuthorizer: nothing is allowed without an ACL,
    except to the super user ``User:ANONYMOUS``, which is what the PLAINTEXT listener
    (inter-broker, and the tests' administration on loopback) authenticates as.

    ``keystore`` is written: the key and certificate in one PEM file, as Kafka reads it.
    Users are created afterwards with ``alter_user_scram_credentials``.
    """
    keystore.write_text(key.read_text() + cert.read_text())
    tls = {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(ca),
    }
    properties = {
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": "User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": "false",
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "listener.name.secure.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        **{f"listener.name.secure.{k}": v for k, v in tls.items()},
        **{f"listener.name.mtls.{k}": v for k, v in tls.items()},
        "listener.name.mtls.ssl.client.auth": "required",
    }
    return {"listeners": {"SECURE": "SASL_SSL", "MTLS": "SSL"}, "properties": properties}


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise BrokerError("Apache Kafka needs Java 17 or newer: install a JDK (java not found).")
    return java


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    dir: Path
    extra_ports: dict[str, int] = field(default_factory=dict)  # listener name -> port
    proc: subprocess.Popen[bytes] | None = None
    out: IO[bytes] | None = field(default=None, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.dir / "data"

    @property
    def server_log(self) -> Path:
        return self.dir / "server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class KafkaCluster(Service):
    """``nodes`` Apache Kafka processes in KRaft mode on 127.0.0.1, data under ``workdir``.

    ``first_port`` fixes the client port of node 1 (node N gets ``first_port + N - 1``);
    by default free ports are picked. ``properties`` adds or overrides
    ``server.properties`` entries for every node. Every node listens on PLAINTEXT (the
    inter-broker listener, and the one ``bootstrap_servers`` names) and on each of
    ``listeners`` (name -> security protocol, e.g. ``{"SECURE": "SASL_SSL"}``), each on
    a port of its own: :meth:`bootstrap_for` names them. ``format_args`` go to the
    storage tool (``--add-scram``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        nodes: int = 1,
        first_port: int | None = None,
        properties: Mapping[str, str] | None = None,
        listeners: Mapping[str, str] | None = None,
        format_args: Sequence[str] = (),
        heap_mb: int = 512,
        startup_timeout_s: float = 120.0,
        stop_grace_s: float = 20.0,
    ) -> None:
        if nodes < 1:
            raise BrokerError(f"A Kafka cluster needs at least one node, not {nodes}.")
        self.workdir = Path(workdir)
        self.nodes = nodes
        self._properties = dict(properties or {})
        self._listeners = dict(listeners or {})
        if {"PLAINTEXT", "CONTROLLER"} & {name.upper() for name in self._listeners}:
            raise BrokerError("PLAINTEXT and CONTROLLER are the cluster's own listeners.")
        self._format_args = list(format_args)
        self._heap_mb = heap_mb
        self._startup_timeout_s = startup_timeout_s
        self._stop_grace_s = stop_grace_s
        self._first_port = first_port
        self._nodes: dict[int, _Node] = {}
        self.cluster_id = ""
        self._classpath = ""

    # ------------------------------------------------------------------ addresses

    @property
    def bootstrap_servers(self) -> str:
        """Every node's client address, comma-separated."""
        if not self._nodes:
            raise BrokerError("The Kafka cluster is not started: call start() first.")
        return ",".join(f"{HOST}:{n.port}" for n in self._nodes.values())

    def bootstrap_for(self, listener: str) -> str:
        """Every node's address on the extra listener ``listener``, comma-separated."""
        return ",".join(f"{HOST}:{n.extra_ports[listener]}" for n in self._nodes.values())

    def bootstrap_of(self, node_id: int) -> str:
        return f"{HOST}:{self._nodes[node_id].port}"

    @property
    def node_ids(self) -> list[int]:
        return sorted(self._nodes)

    def pid_of(self, node_id: int) -> int | None:
        node = self._nodes[node_id]
        return node.proc.pid if node.running and node.proc is not None else None

    @property
    def pid(self) -> int | None:
        """The process id of a one-node cluster's only node (None: not running)."""
        if self.nodes != 1:
            raise BrokerError(f"A cluster of {self.nodes} nodes has no single pid: use pids.")
        return self.pid_of(1)

    @property
    def pids(self) -> list[int]:
        return [p for p in (self.pid_of(n) for n in self.node_ids) if p is not None]

    def server_log(self, node_id: int) -> Path:
        return self._nodes[node_id].server_log

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Format (once) and start every node; return when all are in the cluster.

        :raises BrokerError: Java or Maven missing, a port taken, or a node that did not
            come up within the start-up timeout (the message quotes its log).
        """
        self._classpath = kafka_classpath()
        self._plan()
        for node in self._nodes.values():
            self._spawn(node)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info(
            "Apache Kafka cluster %s ready at %s (%s)",
            self.cluster_id,
            self.bootstrap_servers,
            self.workdir,
        )
        return self

    def _plan(self) -> None:
        state = self.workdir / "cluster.json"
        if state.is_file():  # a restart of a cluster formatted before: same ids and ports
            saved = json.loads(state.read_text())
            self.cluster_id = saved["cluster_id"]
            for item in saved["nodes"]:
                node = _Node(
                    item["id"], item["port"], item["controller_port"], Path(item["dir"]),
                    dict(item.get("extra_ports", {})),
                )  # fmt: skip
                self._nodes[node.node_id] = node
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cluster_id = self._run_tool("random-uuid").strip().splitlines()[-1]
        for i in range(1, self.nodes + 1):
            port = self._first_port + i - 1 if self._first_port else free_port()
            extra = {name: free_port() for name in self._listeners}
            node = _Node(i, port, free_port(), self.workdir / f"node-{i}", extra)
            node.dir.mkdir(parents=True, exist_ok=True)
            self._nodes[i] = node
        for node in self._nodes.values():
            self._write_config(node)
            self._run_tool(
                "format", "--cluster-id", self.cluster_id,
                "--config", str(node.dir / "server.properties"), "--ignore-formatted",
                *self._format_args,
            )  # fmt: skip
        state.write_text(
            json.dumps(
                {
                    "cluster_id": self.cluster_id,
                    "nodes": [
                        {
                            "id": n.node_id,
                            "port": n.port,
                            "controller_port": n.controller_port,
                            "dir": str(n.dir),
                            "extra_ports": n.extra_ports,
                        }
                        for n in self._nodes.values()
                    ],
                },
                indent=1,
            )
        )

    def _write_config(self, node: _Node) -> None:
        replicas = min(3, self.nodes)
        voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in self._nodes.values())
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": ",".join(
                [f"PLAINTEXT://{HOST}:{node.port}", f"CONTROLLER://{HOST}:{node.controller_port}"]
                + [f"{name}://{HOST}:{port}" for name, port in node.extra_ports.items()]
            ),
            "advertised.listeners": ",".join(
                [f"PLAINTEXT://{HOST}:{node.port}"]
                + [f"{name}://{HOST}:{port}" for name, port in node.extra_ports.items()]
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": ",".join(
                ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
                + [f"{name}:{protocol}" for name, protocol in self._listeners.items()]
            ),
            "log.dirs": str(node.log_dir),
            "num.partitions": "1",
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min(2, replicas)),
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min(2, replicas)),
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min(2, replicas)),
            # Tests start and stop consumers by the dozen: no 3 s wait before a group forms.
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "unclean.leader.election.enable": "false",
        }
        for key, value in self._properties.items():  # {port}, {controller_port}: this node's
            props[key] = value.format(port=node.port, controller_port=node.controller_port)
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        (node.dir / "server.properties").write_text(text)
        (node.dir / "log4j2.properties").write_text(_LOG4J2.format(path=node.server_log))

    def _jvm(self, *args: str, heap_mb: int = 256, log4j: Path | None = None) -> list[str]:
        opts = [
            f"-Xms{min(heap_mb, 256)}m",
            f"-Xmx{heap_mb}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
        ]
        if log4j is not None:
            opts.append(f"-Dlog4j2.configurationFile={log4j}")
        return [_java(), *opts, "-cp", self._classpath, *args]

    def _run_tool(self, *args: str) -> str:
        cmd = self._jvm("kafka.tools.StorageTool", *args)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip()[-2000:]
            raise BrokerError(f"Kafka's storage tool failed ({args[0]}): {tail}")
        return done.stdout

    def _spawn(self, node: _Node) -> None:
        if node.running:
            raise BrokerError(f"Kafka node {node.node_id} is already running.")
        node.out = open(node.dir / "stdout.log", "ab")  # noqa: SIM115 (closed on exit)
        cmd = self._jvm(
            "kafka.Kafka",
            str(node.dir / "server.properties"),
            heap_mb=self._heap_mb,
            log4j=node.dir / "log4j2.properties",
        )
        node.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=node.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the caller is the caller's to handle
        )
        atexit.register(self.stop)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until every running node is a registered broker of this cluster."""
        timeout = self._startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        want = {n.node_id for n in self._nodes.values() if n.proc is not None}
        while True:
            for node in self._nodes.values():
                if node.proc is not None and node.proc.poll() is not None:
                    raise BrokerError(
                        f"Kafka node {node.node_id} exited with code {node.proc.returncode} "
                        f"at start-up{self._log_tail(node)}"
                    )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"The Kafka cluster at {self.bootstrap_servers} did not come up within "
                    f"{timeout:g}s{self._log_tail(next(iter(self._nodes.values())))}"
                )
            if self._brokers_registered(want, min(remaining, 5.0)):
                return
            time.sleep(0.25)

    def _brokers_registered(self, want: set[int], timeout_s: float) -> bool:
        # A bare TCP connect first: kafka-python logs every refused connection.
        for node_id in sorted(want):
            try:
                socket.create_connection((HOST, self._nodes[node_id].port), timeout=1).close()
            except OSError:
                return False
        for node_id in sorted(want):
            bootstrap = self.bootstrap_of(node_id)
            if not answers_as(bootstrap, self.cluster_id, timeout_s):
                return False
        try:
            admin = admin_client(
                bootstrap_servers=self.bootstrap_of(min(want)),
                request_timeout_ms=int(timeout_s * 1000),
            )
        except (KafkaError, OSError):
            return False
        try:
            brokers = {
                b["broker_id"]
                for b in admin.describe_cluster()["brokers"]
                if not b.get("is_fenced", False)
            }
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()
        return want <= brokers

    def _log_tail(self, node: _Node) -> str:
        path = node.server_log if node.server_log.is_file() else node.dir / "stdout.log"
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                tail = "".join(deque(fh, maxlen=_LOG_TAIL_LINES)).strip()
        except OSError:
            return f" (log {path} unreadable)."
        return f"; end of {path}:\n{tail or '<empty>'}"

    def kill(self, node_id: int) -> None:
        """SIGKILL node ``node_id`` (no shutdown: what it had not synced is the OS's)."""
        node = self._nodes[node_id]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
        self._close(node)

    def start_node(self, node_id: int, *, wait: bool = True) -> None:
        """Start node ``node_id`` again from its on-disk log."""
        node = self._nodes[node_id]
        self._close(node)
        node.proc = None
        self._spawn(node)
        if wait:
            self.wait_ready()

    def stop_node(self, node_id: int) -> None:
        """Stop one node cleanly (SIGTERM: a controlled shutdown), SIGKILL after the grace."""
        node = self._nodes[node_id]
        proc = node.proc
        if proc is not None:
            stop_process(proc, self._stop_grace_s, f"Kafka node {node_id}")
        self._close(node)

    def stop(self) -> None:
        """Stop every node (safe to call twice); the data stays in ``workdir``."""
        atexit.unregister(self.stop)
        running = [n for n in self._nodes.values() if n.running]
        for node in running:  # all at once: a lone survivor waits for a quorum to leave
            assert node.proc is not None
            node.proc.terminate()
        for node in running:
            assert node.proc is not None
            try:
                node.proc.wait(timeout=self._stop_grace_s)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        for node in self._nodes.values():
            self._close(node)

    @staticmethod
    def _close(node: _Node) -> None:
        if node.out is not None:
            node.out.close()
            node.out = None

    def __repr__(self) -> str:
        up = [n.node_id for n in self._nodes.values() if n.running]
        return f"KafkaCluster({self.workdir}, nodes={self.nodes}, running={up})"

    # ------------------------------------------------------------------ admin views

    def partition_leaders(self, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
        """partition -> leader node id (-1: none) of ``topic``, as the cluster reports it.

        Asked of the running nodes, again until ``timeout_s`` while a dead node is still
        in the metadata and a request goes its way.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            live = ",".join(self.bootstrap_of(n) for n in self.node_ids if self._nodes[n].running)
            try:
                admin = admin_client(bootstrap_servers=live, request_timeout_ms=5000)
                try:
                    (info,) = admin.describe_topics([topic])
                finally:
                    admin.close()
            except KafkaError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            return {p["partition_index"]: p["leader_id"] for p in info["partitions"]}


# ---------------------------------------------------------------------- scripts/kafka


def _cli_start(args: argparse.Namespace) -> int:
    state = STATE_DIR / "cluster.json"
    pids_file = STATE_DIR / "pids.json"
    if pids_file.is_file() and any(_alive(p) for p in json.loads(pids_file.read_text())):
        print(f"error: a cluster from {STATE_DIR} is running: scripts/kafka stop", file=sys.stderr)
        return 1
    if state.is_file() and not args.keep_data:
        shutil.rmtree(STATE_DIR)
    cluster = KafkaCluster(STATE_DIR, nodes=args.nodes, first_port=args.port)
    try:
        cluster.start()
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    atexit.unregister(cluster.stop)  # it runs on after this process exits
    pids_file.write_text(json.dumps(cluster.pids))
    print(f"Apache Kafka ({args.nodes} node(s)) up; data and logs in {STATE_DIR}", file=sys.stderr)
    print(cluster.bootstrap_servers)
    return 0


def _cli_resolve(_: argparse.Namespace) -> int:
    try:
        jars = kafka_classpath().split(os.pathsep)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Apache Kafka resolved: {len(jars)} jars under {CACHE}", file=sys.stderr)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _cli_stop(_: argparse.Namespace) -> int:
    pids_file = STATE_DIR / "pids.json"
    if not pids_file.is_file():
        print("no cluster started by scripts/kafka", file=sys.stderr)
        return 0
    pids = [p for p in json.loads(pids_file.read_text()) if _alive(p)]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    pids_file.unlink()
    print(f"stopped {len(pids)} Kafka process(es)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/kafka", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster in the background")
    start.add_argument("--nodes", type=int, default=1, help="brokers (each also a controller)")
    start.add_argument("--port", type=int, default=None, help="client port of node 1")
    start.add_argument(
        "--keep-data", action="store_true", help="restart the previous cluster with its data"
    )
    sub.add_parser("stop", help="stop the cluster started by `start`")
    sub.add_parser("resolve", help="resolve the pinned release from Maven Central, then exit")
    args = parser.parse_args(argv)
    if args.command == "start" and args.nodes < 1:
        parser.error("--nodes must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # refused connections while it starts
    handlers: dict[str, Any] = {"start": _cli_start, "stop": _cli_stop, "resolve": _cli_resolve}
    code: int = handlers[args.command](args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
