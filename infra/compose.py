"""docker-compose.yml is the one description of the deployment; the native local stack reads it.

Every compose service whose command is ``python -m services.<name>`` becomes a local process with
the same module, environment and replica count, so a service added to compose appears in
`maas stack up` too. What differs on a laptop is only *where* things are: the broker, the S3
server, the state dir and the listen/connect addresses come from the local ``Settings`` (and so
from the user's MAAS_* environment) instead of compose's container hostnames.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from maas.config import Settings
from maas.errors import InvalidArgument

# infra/docker-compose.yml links to the repository's (a wheel holds a copy)
COMPOSE_FILE = Path(__file__).resolve().parent / "docker-compose.yml"

# Where-things-are variables: locally they follow Settings, never compose's container names.
_PLACEMENT = {
    "MAAS_KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "MAAS_S3_ENDPOINT": "s3_endpoint",
    "MAAS_S3_ACCESS_KEY": "s3_access_key",
    "MAAS_S3_SECRET_KEY": "s3_secret_key",
    "MAAS_STATE_DIR": "state_dir",
    "MAAS_CACHE_DIR": "cache_dir",
    "MAAS_REGISTRY_LISTEN": "registry_listen",
    "MAAS_REGISTRY_ADDR": "registry_addr",
    "MAAS_INFERENCE_LISTEN": "inference_listen",
    "MAAS_INFERENCE_ADDR": "inference_addr",
    "MAAS_AGGREGATOR_LISTEN": "aggregator_listen",
    "MAAS_METRICS_BIND": "metrics_bind",
}
# Who a service is: compose names its token file; `infra.stack` moves it to the stack's auth dir.
_IDENTITY = frozenset({"MAAS_AUTH_TOKEN", "MAAS_AUTH_TOKEN_FILE", "MAAS_AUTH_TOKENS_FILE"})
_SUBST = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@dataclass(frozen=True)
class ServiceSpec:
    """One local process to run for a compose service replica."""

    name: str  # compose name, plus "-<i>" for replicas after the first
    compose_name: str
    module: str
    replica: int
    env: dict[str, str]
    depends_on: tuple[str, ...]
    health: str  # "grpc" (grpc.health.v1 on the listen address) or "http" (GET /healthz)
    host: str
    port: int


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise InvalidArgument(f"{path} has no services mapping")
    return doc


def _substitute(value: Any, environ: Mapping[str, str]) -> str:
    """Compose's ``${VAR:-default}`` interpolation, against the local environment."""
    return _SUBST.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), str(value))


def python_module(service: Mapping[str, Any]) -> str | None:
    command = service.get("command")
    if isinstance(command, list) and command[:2] == ["python", "-m"] and len(command) == 3:
        module = str(command[2])
        return module if module.startswith("services.") else None
    return None


def _replicas(service: Mapping[str, Any]) -> int:
    deploy = service.get("deploy") or {}
    return int(deploy.get("replicas", 1))


# Replicas of one service on this machine: each is a Python process of a few hundred MB (torch),
# so a typo (500 for 5) would start processes until memory ran out.
MAX_LOCAL_REPLICAS = 32


def check_scale(scale: Mapping[str, int], compose: Mapping[str, Any] | None = None) -> None:
    """``--scale NAME=N``: NAME must be a compose Python service, 0 <= N <= MAX_LOCAL_REPLICAS."""
    compose = compose or load_compose()
    names = sorted(n for n, s in compose["services"].items() if python_module(s))
    for name, count in scale.items():
        if name not in names:
            raise InvalidArgument(f"--scale {name}: no such service; scalable: {', '.join(names)}")
        if not 0 <= count <= MAX_LOCAL_REPLICAS:
            raise InvalidArgument(
                f"--scale {name}={count}: the local stack runs 0 to {MAX_LOCAL_REPLICAS} replicas "
                "of a service on this machine; more belong on a cluster (docs/OPERATIONS.md, "
                "scaling out)"
            )


# Listeners that serve grpc.health.v1 (a shard's data plane does not: its metrics port tells).
_HEALTH_LISTEN = ("MAAS_REGISTRY_LISTEN", "MAAS_INFERENCE_LISTEN")


def _readiness(env: Mapping[str, str]) -> tuple[str, str, int]:
    for name, value in env.items():
        if name in _HEALTH_LISTEN:
            host, _, port = value.rpartition(":")
            return "grpc", host or "127.0.0.1", int(port)
    for name, value in env.items():
        if name.endswith("METRICS_PORT") and int(value or 0) > 0:
            return "http", "127.0.0.1", int(value)
    raise InvalidArgument(
        f"a service needs one of {_HEALTH_LISTEN} or a *METRICS_PORT for the stack to know it "
        "is ready"
    )


def local_services(
    settings: Settings,
    *,
    compose: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    choose_port: PortChooser | None = None,
    scale: Mapping[str, int] | None = None,
) -> list[ServiceSpec]:
    """The compose services as local processes, in dependency order.

    Replicas share this host, so each needs its own ports: a metrics port is compose's plus the
    replica index, and a listener of a replica after the first (inference's gRPC and HTTP) gets
    a free port. ``choose_port`` has the last word on every one (the local stack remembers what
    it chose, and private stacks move every metrics port to a free one). ``scale`` overrides
    compose's replica counts by service name (``maas stack up --scale``)."""
    choose = choose_port or _default_port
    compose = compose or load_compose()
    environ = os.environ if environ is None else environ
    python_services = {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc, dict) and python_module(svc)
    }
    specs: list[ServiceSpec] = []
    for name in _dependency_order(python_services):
        svc = python_services[name]
        base = {k: _substitute(v, environ) for k, v in (svc.get("environment") or {}).items()}
        for var, attr in _PLACEMENT.items():
            # A listen address belongs only to the service that declares one.
            if var in base or not var.endswith("_LISTEN"):
                base[var] = str(getattr(settings, attr))
        for var, value in base.items():
            # Any other listener compose opens to its network stays on this machine here.
            if var.endswith("_LISTEN") and value.startswith("0.0.0.0:"):
                base[var] = "127.0.0.1:" + value.removeprefix("0.0.0.0:")
        if settings.inference_http_listen and "MAAS_INFERENCE_HTTP_LISTEN" in base:
            base["MAAS_INFERENCE_HTTP_LISTEN"] = settings.inference_http_listen
        # Anything the user exported explicitly wins over compose's defaults, except placement
        # and a service's identity (the user's token is the CLI's, not the services').
        base.update(
            {
                k: v
                for k, v in environ.items()
                if k in base and k not in _PLACEMENT and k not in _IDENTITY
            }
        )
        deps = tuple(d for d in (svc.get("depends_on") or {}) if d in python_services)
        count = (scale or {}).get(name, _replicas(svc))
        for replica in range(count):
            replica_name = name if replica == 0 else f"{name}-{replica}"
            env = _place_replica(base, replica_name, replica, choose)
            health, host, port = _readiness(env)
            specs.append(
                ServiceSpec(
                    name=replica_name,
                    compose_name=name,
                    module=str(python_module(svc)),
                    replica=replica,
                    env=env,
                    depends_on=deps,
                    health=health,
                    host=host,
                    port=port,
                )
            )
    return specs


PortChooser = Callable[[str, str, int], int]
"""(replica name, variable, the port compose would give it; 0: it needs a free one) -> port."""


def _default_port(name: str, var: str, port: int) -> int:
    from infra.proc import free_port

    return port or free_port()


def _place_replica(
    base: Mapping[str, str], name: str, replica: int, choose: PortChooser
) -> dict[str, str]:
    """One replica's environment: ports of its own for what it listens on."""
    env = dict(base)
    for var, value in base.items():
        if var.endswith("METRICS_PORT") and int(value or 0) > 0:
            env[var] = str(choose(name, var, int(value) + replica))
        elif var.endswith("_LISTEN") and value:
            host, _, port = value.rpartition(":")
            if int(port) > 0:  # port 0 already binds a free one and advertises it
                env[var] = f"{host}:{choose(name, var, int(port) if replica == 0 else 0)}"
    return env


def listen_ports(spec: ServiceSpec) -> dict[str, int]:
    """Every port a replica serves, by variable: its listeners and its metrics port. A listener
    on port 0 (a shard's data plane: it binds a free port and advertises the one it got) has
    no port to show here."""
    ports = {}
    for var, value in spec.env.items():
        if var.endswith("_LISTEN") and value and int(value.rpartition(":")[2]):
            ports[var] = int(value.rpartition(":")[2])
        elif var.endswith("METRICS_PORT") and int(value or 0) > 0:
            ports[var] = int(value)
    return ports


def _dependency_order(services: Mapping[str, Mapping[str, Any]]) -> list[str]:
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise InvalidArgument(f"docker-compose.yml has a depends_on cycle through {name}")
        visiting.add(name)
        for dep in services[name].get("depends_on") or {}:
            if dep in services:
                visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    return order


# --- readiness --------------------------------------------------------------------------------


def grpc_serving(
    host: str, port: int, *, timeout_s: float = 2.0, settings: Settings | None = None
) -> bool:
    """grpc.health.v1 says SERVING for the whole server (over TLS when ``settings`` say so)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from maas.edge import open_sync_channel

    target = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    with open_sync_channel(settings or Settings(), target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


REASON_BYTES = 2000  # of a health check's answer, kept as the reason


def _http_status(host: str, port: int, path: str, timeout_s: float) -> tuple[int, str] | None:
    """(status, the start of the body when it is not 200) of ``GET path``; None when nothing
    answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout_s) as reply:
            return int(reply.status), ""
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read(REASON_BYTES).decode(errors="replace").strip()
    except (urllib.error.URLError, OSError):
        return None


def http_ok(host: str, port: int, *, path: str = "/metrics", timeout_s: float = 2.0) -> bool:
    answer = _http_status(host, port, path, timeout_s)
    return answer is not None and answer[0] == 200


def health_reason(spec: ServiceSpec, *, timeout_s: float = 2.0) -> str:
    """Why an HTTP-checked service says it is not serving (its ``/healthz`` 503 body), or that
    it does not answer at all; "" when it serves or is checked over gRPC (whose health carries
    no reason)."""
    from maas.liveness import HEALTH_PATH

    if spec.health != "http":
        return ""
    answer = _http_status(spec.host, spec.port, HEALTH_PATH, timeout_s)
    if answer is None:
        return (
            f"its {HEALTH_PATH} on port {spec.port} did not answer within {timeout_s:g} s: the "
            "process is hung or stopped (SIGSTOP?), or starting"
        )
    return answer[1]


def dependency_reason(spec: ServiceSpec, *, timeout_s: float = 2.0) -> str:
    """What a service's ``/readyz`` says while something it works through (Kafka, S3) does not
    answer it (the 503 body); "" while it is ready, or has no metrics port to ask."""
    from maas.liveness import READY_PATH

    ports = [port for var, port in listen_ports(spec).items() if var.endswith("METRICS_PORT")]
    if spec.health == "http":
        ports = [spec.port]  # checked on its metrics port
    if not ports:
        return ""
    answer = _http_status(spec.host, ports[0], READY_PATH, timeout_s)
    return "" if answer is None or answer[0] != 503 else answer[1]


def is_ready(spec: ServiceSpec, *, settings: Settings | None = None) -> bool:
    if spec.health == "grpc":
        return grpc_serving(spec.host, spec.port, settings=settings)
    from maas.liveness import HEALTH_PATH

    # 503 once a loop stopped (maas.liveness.serve_metrics); plain metrics servers answer it too.
    return http_ok(spec.host, spec.port, path=HEALTH_PATH)
