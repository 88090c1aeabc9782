"""A real Apache Kafka broker (KRaft, one combined broker+controller node) for tests, started from Maven jars.

The jars come from `scripts/lib/install-kafka` (Maven Central, cached). One process, three listeners on free
127.0.0.1 ports:

- PLAINTEXT       `bootstrap`       no authentication (also the inter-broker listener)
- SASL_PLAINTEXT  `sasl_bootstrap`  PLAIN (user `selfix`, from the listener's JAAS config) and SCRAM-SHA-256
                                    (user `selfix-scram`, written into the metadata log at format time)
- CONTROLLER      internal

Topic auto-creation is OFF, as on a production cluster: a test creates its topics with `create_topic`, and a
missing topic is a real error the code under test has to report (selfix doctor, the consumer).
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from tests.servers import ServerLifecycle, die_with_parent, free_ports

Auth = Literal["none", "plain", "scram"]

JVM_OPTS = (
    "-Xms64m",
    "-Xmx384m",
    # Tests need a broker that starts fast on 2 cores, not peak throughput: one GC thread, C1 only.
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
)

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = F
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.f.ref = F
logger.kafka.name = org.apache.kafka
logger.kafka.level = INFO
# The request logger is DEBUG-only noise; state changes are useful when a test fails.
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class KafkaBrokerError(RuntimeError):
    """The broker could not be formatted, started or driven; the message carries the log's tail."""


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _cluster_id() -> str:
    # Same shape as `StorageTool random-uuid` (base64url of 16 random bytes), without paying for a JVM start.
    while True:
        value = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not value.startswith("-"):
            return value


class KafkaBroker(ServerLifecycle):
    PLAIN_USERNAME = "selfix"
    PLAIN_PASSWORD = "selfix-secret"
    SCRAM_MECHANISM = "SCRAM-SHA-256"
    SCRAM_USERNAME = "selfix-scram"
    SCRAM_PASSWORD = "selfix-scram-secret"
    NODE_ID = 1

    def __init__(self, libs_dir: Path | str, base_dir: Path | str | None = None, *,
                 start_timeout: float = 60.0, java: str | None = None) -> None:
        self.libs_dir = Path(libs_dir)
        if not any(self.libs_dir.glob("kafka_2.13-*.jar")):
            raise KafkaBrokerError(f"no kafka_2.13 jar in {self.libs_dir}: run scripts/lib/install-kafka")
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="selfix-kafka-") if base_dir is None else base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_dir = self.base_dir / "logs"
        self.config_path = self.base_dir / "server.properties"
        self.start_timeout = start_timeout
        self.java = java or shutil.which("java") or "java"
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: Any = None
        self.port, self.sasl_port, self.controller_port = free_ports(3)
        self.start_seconds: float | None = None  # wall time of the last start(), for reports

    # ------------------------------------------------------------------ addresses and credentials
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    def client_config(self, auth: Auth = "none", **extra: Any) -> dict[str, Any]:
        """librdkafka properties reaching this broker with the given authentication."""
        if auth == "none":
            conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap}
        else:
            user, password, mechanism = self._credentials(auth)
            conf = {"bootstrap.servers": self.sasl_bootstrap, "security.protocol": "SASL_PLAINTEXT",
                    "sasl.mechanism": mechanism, "sasl.username": user, "sasl.password": password}
        conf.update(extra)
        return conf

    def settings_env(self, auth: Auth = "none") -> dict[str, str]:
        """KAFKA_* variables for `selfix.settings.load()` pointing at this broker."""
        if auth == "none":
            return {"KAFKA_BOOTSTRAP_SERVER": self.bootstrap, "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}
        user, password, mechanism = self._credentials(auth)
        return {"KAFKA_BOOTSTRAP_SERVER": self.sasl_bootstrap, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "KAFKA_SASL_MECHANISM": mechanism, "KAFKA_SASL_USERNAME": user, "KAFKA_SASL_PASSWORD": password}

    def _credentials(self, auth: Auth) -> tuple[str, str, str]:
        if auth == "plain":
            return self.PLAIN_USERNAME, self.PLAIN_PASSWORD, "PLAIN"
        if auth == "scram":
            return self.SCRAM_USERNAME, self.SCRAM_PASSWORD, self.SCRAM_MECHANISM
        raise ValueError(f"unknown auth {auth!r}")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Format on first start, launch, and return once the broker answers a metadata request."""
        if self.running:
            return
        began = time.monotonic()
        formatted = (self.data_dir / "meta.properties").exists()
        for attempt in range(3):
            if not formatted:
                self._write_config()
                self._format()
            self._launch()
            try:
                self._wait_ready(time.monotonic() + self.start_timeout)
                break
            except KafkaBrokerError:
                # A port taken between free_ports() and the JVM's bind: only a fresh node may move ports.
                if formatted or attempt == 2 or "Address already in use" not in self.log_tail(200):
                    self.kill()
                    raise
                self.kill()
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.port, self.sasl_port, self.controller_port = free_ports(3)
        self.start_seconds = time.monotonic() - began

    def stop(self, timeout: float = 20.0) -> None:
        """Controlled shutdown (SIGTERM); SIGKILL if it has not exited by the deadline."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._reap()

    def kill(self) -> None:
        """SIGKILL: the broker dies mid-flight, as on a lost node; data on disk stays for restart()."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._reap()

    # ------------------------------------------------------------------ topics
    def admin(self) -> AdminClient:
        return AdminClient(self.client_config())

    def create_topic(self, name: str, partitions: int = 1, config: dict[str, str] | None = None,
                     timeout: float = 15.0) -> None:
        """Create a topic and return once every partition has a leader (so the first produce does not race)."""
        admin = self.admin()
        futures = admin.create_topics([NewTopic(name, partitions, 1, config=config or {})],
                                      operation_timeout=timeout, request_timeout=timeout)
        futures[name].result(timeout)
        deadline = time.monotonic() + timeout
        while True:
            meta = admin.list_topics(name, timeout=timeout).topics.get(name)
            if meta and not meta.error and len(meta.partitions) == partitions and all(
                    p.leader >= 0 for p in meta.partitions.values()):
                return
            if time.monotonic() > deadline:
                raise KafkaBrokerError(f"topic {name} has no leader after {timeout}s")
            time.sleep(0.05)

    def delete_topic(self, name: str, timeout: float = 15.0) -> None:
        self.admin().delete_topics([name], operation_timeout=timeout)[name].result(timeout)

    # ------------------------------------------------------------------ logs
    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for name in ("console.log", "server.log"):
            path = self.log_dir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts) or f"(no logs in {self.log_dir})"

    # ------------------------------------------------------------------ internals
    def _java(self, main: str, *args: str) -> list[str]:
        return [self.java, *JVM_OPTS, f"-Dlog4j2.configurationFile={self.base_dir / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.log_dir}", "-cp", f"{self.libs_dir}/*", main, *args]

    def _write_config(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "log4j2.properties").write_text(LOG4J2)
        plain_jaas = (f'org.apache.kafka.common.security.plain.PlainLoginModule required '
                      f'user_{self.PLAIN_USERNAME}="{self.PLAIN_PASSWORD}";')
        scram_jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.NODE_ID),
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": f"PLAIN,{self.SCRAM_MECHANISM}",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": plain_jaas,
            f"listener.name.sasl_plaintext.{self.SCRAM_MECHANISM.lower()}.sasl.jaas.config": scram_jaas,
            "log.dirs": str(self.data_dir),
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # Internal topics: one replica (one node) and few partitions (each costs start-up time).
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.num.partitions": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Tests join groups constantly: no 3 s wait for more members before the first rebalance.
            "group.initial.rebalance.delay.ms": "0",
            # Tests lose nodes on purpose and wait for the group to notice: allow session timeouts down to 1 s.
            "group.min.session.timeout.ms": "1000",
            # After kill() the restarted node must wait out its own old session before it may re-register
            # (DUPLICATE_BROKER_REGISTRATION): 9 s by default, 2 s here.
            "broker.session.timeout.ms": "2000",
            "broker.heartbeat.interval.ms": "500",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
        }
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _format(self) -> None:
        scram = f"{self.SCRAM_MECHANISM}=[name={self.SCRAM_USERNAME},password={self.SCRAM_PASSWORD}]"
        cmd = self._java("kafka.tools.StorageTool", "format", "--standalone", "-t", _cluster_id(),
                         "-c", str(self.config_path), "--add-scram", scram)
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, check=False)
        (self.log_dir / "format.log").write_bytes(out.stdout)
        if out.returncode != 0:
            raise KafkaBrokerError(f"StorageTool format failed ({out.returncode}):\n"
                                   + out.stdout.decode(errors="replace")[-4000:])

    def _launch(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._console = (self.log_dir / "console.log").open("ab")
        self._proc = subprocess.Popen(
            self._java("kafka.Kafka", str(self.config_path)), stdin=subprocess.DEVNULL,
            stdout=self._console, stderr=subprocess.STDOUT, cwd=self.base_dir,
            start_new_session=True,  # Ctrl-C in pytest reaches pytest, which then stops the broker in order
            preexec_fn=die_with_parent())

    def _wait_ready(self, deadline: float) -> None:
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise KafkaBrokerError(f"Kafka broker exited with {code} while starting\n{self.log_tail()}")
            if self._answers_metadata():
                return
            if time.monotonic() > deadline:
                raise KafkaBrokerError(f"Kafka broker not ready after {self.start_timeout}s\n{self.log_tail()}")
            time.sleep(0.1)

    def _answers_metadata(self) -> bool:
        if not (_port_open(self.port) and _port_open(self.sasl_port)):
            return False
        # A fresh client per probe: a reused one would back off exponentially between reconnects.
        admin = AdminClient(self.client_config(**{"socket.connection.setup.timeout.ms": 1000}))
        try:
            meta = admin.list_topics(timeout=2.0)
        except KafkaException:
            return False
        return self.NODE_ID in meta.brokers

    def _reap(self) -> None:
        self._proc = None
        if self._console is not None:
            self._console.close()
            self._console = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"KafkaBroker({self.bootstrap}, sasl {self.sasl_bootstrap}, {state}, dir {self.base_dir})"

