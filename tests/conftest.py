"""Session fixtures for a real Kafka broker + S3 server (and nothing else: keep other fixtures in
the test directories that need them).

`stack` starts a private broker and S3 server on free 127.0.0.1 ports with a temporary state dir
(`infra.ephemeral`), so parallel test sessions and a developer's `maas stack up` never collide; it
bootstraps topics and buckets, exports MAAS_* for subprocesses, and stops exactly the processes it
started. With MAAS_TEST_USE_RUNNING_STACK=1 it uses the stack the MAAS_* environment points at.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import settings as hypothesis_settings

from infra.bootstrap import bootstrap
from infra.ephemeral import ephemeral_stack, exported
from infra.stack import LocalStack
from maas.config import Settings
from maas.edge.auth import token_file, tokens_file

# Tests never assert wall-clock times, hypothesis's per-example deadline included: on a loaded
# 2-core machine an example can take seconds and still be right.
hypothesis_settings.register_profile("maas", deadline=None)
hypothesis_settings.load_profile("maas")


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


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    if os.environ.get("MAAS_TEST_USE_RUNNING_STACK") == "1":
        settings = Settings.from_env()
        # Servers the tests start keep state dirs of their own: name the stack's tokens outright.
        settings = settings.replace(
            auth_tokens_file=str(tokens_file(settings)), auth_token_file=str(token_file(settings))
        )
        asyncio.run(bootstrap(settings))
        with exported(settings):
            yield StackHandle(settings, LocalStack.from_settings(settings), owned=False)
        return
    with ephemeral_stack(tmp_path_factory.mktemp("maas-state")) as local:
        yield StackHandle(local.settings, local, owned=True)
