"""A real Apache Kafka broker (KRaft, single node) run natively from Maven Central jars.

Jars are resolved once into `<cache_dir>/kafka/<version>/libs` with Maven; broker config, cluster id
and data live in `<state_dir>/kafka/`; the PID file and log in `<state_dir>/stack/`. Storage is
formatted on first start only, so a restart keeps every topic and record.

    python -m infra.kafka ensure        # resolve the jars (used by infra/dev.sh setup)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from infra.proc import NativeServer, ensure_command, port_open, split_host_port
from maas.config import Settings
from maas.errors import FailedPrecondition

KAFKA_VERSION = "4.1.1"
_MAVEN_DEPS = (
    ("org.apache.kafka", "kafka_2.13", KAFKA_VERSION),
    ("org.slf4j", "slf4j-api", "2.0.16"),
    ("org.apache.logging.log4j", "log4j-slf4j2-impl", "2.24.3"),
    ("org.apache.logging.log4j", "log4j-core", "2.24.3"),
)
_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.server.BrokerServer" level="INFO"/>
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise cache writers across processes (parallel test sessions share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pom() -> str:
    deps = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>"
        for g, a, v in _MAVEN_DEPS
    )
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>maas.infra</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{deps}
  </dependencies>
</project>
"""


def ensure_jars(cache_dir: Path) -> Path:
    """The directory holding the broker's jars, resolving them with Maven on first use."""
    home = cache_dir / "kafka" / KAFKA_VERSION
    libs = home / "libs"
    done = home / ".complete"
    if done.exists():
        return libs
    with file_lock(home.parent / f"{KAFKA_VERSION}.lock"):
        if done.exists():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise FailedPrecondition("Maven (mvn) is not on PATH; install it to fetch Kafka jars")
        print(
            f"resolving Kafka {KAFKA_VERSION} jars from Maven Central into {libs}", file=sys.stderr
        )
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(_pom())
        shutil.rmtree(libs, ignore_errors=True)
        cmd = [
            mvn,
            "-q",
            "-B",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ]
        result = subprocess.run(cmd, cwd=home, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise FailedPrecondition(
                f"resolving Kafka {KAFKA_VERSION} jars failed (rc {result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        done.write_text(KAFKA_VERSION + "\n")
    return libs


def size_limits(max_message_bytes: int) -> dict[str, int]:
    """Broker limits that let one record of `max_message_bytes` through end to end.

    Gradient and parameter shards are large; every hop (produce request, replica fetch, consumer
    fetch) must admit the largest record, with headroom for the batch and request framing.
    """
    framing = 1024 * 1024
    return {
        "message.max.bytes": max_message_bytes,
        "replica.fetch.max.bytes": max_message_bytes + framing,
        "replica.fetch.response.max.bytes": max(max_message_bytes + framing, 10 * 1024 * 1024),
        "fetch.max.bytes": max(max_message_bytes + framing, 55 * 1024 * 1024),
        "socket.request.max.bytes": max(2 * max_message_bytes + framing, 100 * 1024 * 1024),
    }


@dataclass(frozen=True, kw_only=True)
class KafkaBroker(NativeServer):
    stop_timeout_s: ClassVar[float] = 30.0
    name: ClassVar[str] = "kafka"
    port: int
    controller_port: int
    max_message_bytes: int
    heap: str = "768m"

    @classmethod
    def from_settings(
        cls, settings: Settings, *, controller_port: int | None = None, attached: bool = False
    ) -> KafkaBroker:
        host, port = split_host_port(settings.kafka_bootstrap, default_port=9092)
        return cls(
            **cls.places(settings),
            host=host,
            port=port,
            controller_port=controller_port if controller_port is not None else port + 1,
            max_message_bytes=settings.kafka_max_message_bytes,
            attached=attached,
        )

    @property
    def properties_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def marker(self) -> str:
        return str(self.properties_file)

    def server_properties(self) -> dict[str, str | int]:
        listen = (
            f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}"
        )
        props: dict[str, str | int] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": listen,
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "auto.create.topics.enable": "false",
            "num.partitions": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            "num.network.threads": 2,
            "num.io.threads": 4,
        }
        props.update(size_limits(self.max_message_bytes))
        return props

    def _write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{k}={v}\n" for k, v in self.server_properties().items())
        self.properties_file.write_text("# written by infra/kafka.py on every start\n" + text)
        (self.home / "log4j2.xml").write_text(_LOG4J2_XML)

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
        if not java or not Path(java).exists():
            raise FailedPrecondition("java is not installed (Kafka needs Java 17+); set JAVA_HOME")
        return java

    def _java_base(self, libs: Path) -> list[str]:
        return [
            self._java(),
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.xml'}",
            "-cp",
            f"{libs}/*",
        ]

    def _format_once(self, libs: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        id_file = self.home / "cluster.id"
        if not id_file.exists():
            out = subprocess.run(
                [*self._java_base(libs), "kafka.tools.StorageTool", "random-uuid"],
                capture_output=True,
                text=True,
                check=True,
            )
            id_file.write_text(out.stdout.strip().splitlines()[-1] + "\n")
        cmd = [
            *self._java_base(libs),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            id_file.read_text().strip(),
            "-c",
            str(self.properties_file),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise FailedPrecondition(
                f"formatting Kafka storage in {self.data_dir} failed:\n"
                f"{result.stdout}{result.stderr}"
            )

    def prepare(self) -> list[str]:
        """The broker's command line, its jars resolved and its storage formatted."""
        if port_open(self.host, self.port):
            raise FailedPrecondition(
                f"{self.host}:{self.port} is taken by another process; stop it or set "
                "MAAS_KAFKA_BOOTSTRAP to another port"
            )
        libs = ensure_jars(self.cache_dir)
        self._write_config()
        self._format_once(libs)
        return [
            *self._java_base(libs)[:1],
            "-Xms256m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=50",
            # C1 only: a local broker carries control traffic, and C2's compiler thread took
            # more CPU for its first minutes than the requests it would speed up.
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            *self._java_base(libs)[1:],
            "kafka.Kafka",
            str(self.properties_file),
        ]

    def ready(self) -> bool:
        """The broker answers Kafka requests."""
        return api_versions_ok(self.host, self.port)


def api_versions_ok(host: str, port: int, *, timeout_s: float = 1.0) -> bool:
    """True if a Kafka broker on host:port answers an ApiVersions request without error."""
    client_id = b"maas-probe"
    # Request header v1: api_key=18 (ApiVersions), api_version=0, correlation_id, client_id.
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(sock, 10)
    except OSError:
        return False
    if head is None:
        return False
    _size, correlation_id, error_code = struct.unpack(">iih", head)
    return correlation_id == 7 and error_code == 0


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def main(argv: list[str] | None = None) -> int:
    return ensure_command(
        argv,
        module="infra.kafka",
        does="resolve the Kafka jars into the cache",
        ensure=ensure_jars,
        what=f"kafka {KAFKA_VERSION} jars",
    )


if __name__ == "__main__":
    raise SystemExit(main())
