"""Session fixtures for a real Kafka broker + S3 server (and nothing else: keep other fixtures in
the test directories that need them).

`stack` starts a private broker and S3 server on free 127.0.0.1 ports with a temporary state dir,
so parallel test sessions and a developer's `maas stack up` never collide; it bootstraps topics
and buckets, exports MAAS_* for subprocesses, and stops exactly the processes it started.
With MAAS_TEST_USE_RUNNING_STACK=1 it uses the stack the MAAS_* environment points at instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from infra.bootstrap import bootstrap
from infra.s3 import WeedPorts
from infra.stack import LocalStack
from maas.config import Settings

_EXPORTED = (
    ("MAAS_KAFKA_BOOTSTRAP", "kafka_bootstrap"),
    ("MAAS_S3_ENDPOINT", "s3_endpoint"),
    ("MAAS_S3_ACCESS_KEY", "s3_access_key"),
    ("MAAS_S3_SECRET_KEY", "s3_secret_key"),
    ("MAAS_STATE_DIR", "state_dir"),
    ("MAAS_CACHE_DIR", "cache_dir"),
)


@dataclass
class StackHandle:
    """What the `stack` fixture yields: settings to connect with, plus broker on/off switches."""

    settings: Settings
    local: LocalStack
    owned: bool  # False when reusing a running stack: teardown then stops nothing

    def stop_broker(self) -> None:
        self.local.kafka.stop()

    def start_broker(self, *, timeout_s: float = 90.0) -> None:
        self.local.kafka.start(timeout_s=timeout_s)

    @contextlib.contextmanager
    def broker_down(self) -> Iterator[None]:
        """`with stack.broker_down(): ...` — the broker is stopped inside, back up after."""
        self.stop_broker()
        try:
            yield
        finally:
            self.start_broker()


def _free_ports(n: int) -> list[int]:
    # Hold every socket until all are chosen so the OS hands out n distinct ports.
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    if os.environ.get("MAAS_TEST_USE_RUNNING_STACK") == "1":
        settings = Settings.from_env()
        asyncio.run(bootstrap(settings))
        yield StackHandle(settings, LocalStack.from_settings(settings), owned=False)
        return

    kafka_port, controller_port, *weed = _free_ports(10)
    settings = Settings.from_env().replace(
        kafka_bootstrap=f"127.0.0.1:{kafka_port}",
        s3_endpoint=f"127.0.0.1:{weed[0]}",
        state_dir=str(tmp_path_factory.mktemp("maas-state")),
    )
    local = LocalStack.from_settings(
        settings,
        kafka_controller_port=controller_port,
        s3_ports=WeedPorts(*weed),
        attached=True,
    )
    saved = {name: os.environ.get(name) for name, _ in _EXPORTED}
    try:
        local.up()
        for name, attr in _EXPORTED:
            os.environ[name] = str(getattr(settings, attr))
        yield StackHandle(settings, local, owned=True)
    finally:
        local.down()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
