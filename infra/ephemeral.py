"""A private, throw-away stack on free ports: for test sessions and benchmarks.

    with ephemeral_stack(tmp_dir) as settings:
        ...  # a real broker and S3 server, topics and buckets ready

Processes are tied to the caller (`attached`) and stopped by their own PIDs on exit, so runs in
parallel with each other and with a developer's `maas stack up` never collide.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from infra.proc import free_port
from infra.s3 import WeedPorts
from infra.stack import LocalStack
from maas.config import Settings
from maas.edge.auth import token_file, tokens_file

# What subprocesses (services under test) need to find the same stack.
EXPORTED_ENV = (
    ("MAAS_KAFKA_BOOTSTRAP", "kafka_bootstrap"),
    ("MAAS_S3_ENDPOINT", "s3_endpoint"),
    ("MAAS_S3_ACCESS_KEY", "s3_access_key"),
    ("MAAS_S3_SECRET_KEY", "s3_secret_key"),
    ("MAAS_STATE_DIR", "state_dir"),
    ("MAAS_CACHE_DIR", "cache_dir"),
    # Auth is on: servers started by tests find the stack's token table even with a state dir
    # of their own, and clients send the stack's write token (admin), read from its file.
    ("MAAS_AUTH_TOKENS_FILE", "auth_tokens_file"),
    ("MAAS_AUTH_TOKEN_FILE", "auth_token_file"),
    ("MAAS_AUTH_TOKEN", "auth_token"),
)


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def private_stack(
    state_dir: Path, base: Settings | None = None, *, with_services: bool = False
) -> LocalStack:
    """Kafka + S3 (and with ``with_services`` the compose services) on free ports."""
    kafka_port, controller_port, registry_port, inference_port, http_port, *weed = free_ports(13)
    settings = (base or Settings.from_env()).replace(
        kafka_bootstrap=f"127.0.0.1:{kafka_port}",
        s3_endpoint=f"127.0.0.1:{weed[0]}",
        state_dir=str(state_dir),
        auth_tokens_file="",
        auth_token_file="",
        auth_token="",
    )
    # The stack's own tokens (`up` creates them), never ones from the caller's environment.
    settings = settings.replace(
        auth_tokens_file=str(tokens_file(settings)), auth_token_file=str(token_file(settings))
    )
    if with_services:
        registry, inference = f"127.0.0.1:{registry_port}", f"127.0.0.1:{inference_port}"
        settings = settings.replace(
            registry_listen=registry,
            registry_addr=registry,
            inference_listen=inference,
            inference_addr=inference,
            inference_http_listen=f"127.0.0.1:{http_port}",
        )
    return LocalStack.from_settings(
        settings,
        kafka_controller_port=controller_port,
        s3_ports=WeedPorts(*weed),
        attached=True,
        with_services=with_services,
        fresh_ports=with_services,
    )


@contextlib.contextmanager
def exported(settings: Settings) -> Iterator[None]:
    """Export the stack's MAAS_* variables for subprocesses; restore the old ones after."""
    saved = {name: os.environ.get(name) for name, _ in EXPORTED_ENV}
    try:
        for name, attr in EXPORTED_ENV:
            os.environ[name] = str(getattr(settings, attr))
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def ephemeral_stack(state_dir: Path, *, with_services: bool = False) -> Iterator[LocalStack]:
    """Start a private stack, export its env, and stop exactly its processes afterwards."""
    local = private_stack(state_dir, with_services=with_services)
    try:
        local.up()
        with exported(local.settings):
            yield local
    finally:
        local.down()


@contextlib.contextmanager
def bench_settings(workdir: Path | None = None) -> Iterator[Settings]:
    """What a benchmark runs against: the stack MAAS_* points at when
    MAAS_BENCH_USE_RUNNING_STACK=1, else a private one under ``workdir`` (or a temp dir)."""
    if os.environ.get("MAAS_BENCH_USE_RUNNING_STACK") == "1":
        yield Settings.from_env()
        return
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="maas-bench-")))
        local = stack.enter_context(ephemeral_stack(workdir / "stack"))
        yield local.settings
