"""The local stack: the real Kafka broker, the S3 server and docker-compose.yml's services as
native processes, with PIDs and logs under `<state_dir>/stack/`.

    stack = LocalStack.from_settings(Settings.from_env())
    stack.up()        # no-op for what already runs; bootstraps topics and buckets, tokens
    stack.status()
    stack.down()      # data stays: the next up() finds every topic, record and object

Adding a service later: give it a class with the `Component` shape (see `PythonService`) and
append it in `LocalStack.from_settings`; `up` starts components in order, `down` in reverse.

Auth is on by default: `up` makes sure the token table (MAAS_AUTH_TOKENS_FILE, default
`<state_dir>/auth/tokens.json`) holds the stack's identities (`maas.edge.STACK_IDENTITIES`),
creating missing tokens next to it; the services get the table and their own token file, the
CLI finds `admin.token` in the state dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from infra.exits import why_down
from infra.kafka import KafkaBroker, file_lock
from infra.proc import (
    Component,
    ManagedProcess,
    port_open,
    wait_until,
)
from infra.s3 import WeedPorts, WeedS3
from maas.config import Settings
from maas.edge import STACK_IDENTITIES, ensure_tokens
from maas.edge.auth import tokens_file
from maas.errors import FailedPrecondition

# The interpreter option that names a service's stack on its command line.
MARKER_OPTION = "maas_stack"


TLS_FILE = "tls.json"  # whether the running services were started with MAAS_GRPC_TLS


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    alive: bool
    host: str
    port: int
    healthy: bool = False  # answering its health check, not just a live PID
    ports: Mapping[str, int] = field(default_factory=dict)  # every port it serves, by variable
    why_down: str = ""  # for a component that is not running: how it ended (see `why_down`)
    why_not_ready: str = ""  # for one running but not healthy: what its health check says
    # For one healthy: what its /readyz says while Kafka or S3 does not answer it.
    why_degraded: str = ""


@dataclass(frozen=True)
class PythonService:
    """A `python -m <module>` service of this repo, ready when it accepts TCP on `port`."""

    service_name: str
    module: str
    host: str
    listen_port: int
    stack_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    # Readiness beyond an open port (gRPC health SERVING, /metrics answering); default: TCP.
    health: Callable[[], bool] | None = None
    health_reason: Callable[[], str] | None = None  # why it is not ready, when it says so
    dependency_reason: Callable[[], str] | None = None  # who does not answer it, when it says so
    served_ports: Mapping[str, int] = field(default_factory=dict)  # every port, by variable
    compose_name: str = ""  # the compose service it is a replica of (default: its name)
    depends_on: tuple[str, ...] = ()  # compose services that must be ready before it starts

    @property
    def name(self) -> str:
        return self.service_name

    @property
    def port(self) -> int:
        return self.listen_port

    @property
    def process(self) -> ManagedProcess:
        # `-X maas_stack=<stack_dir>` makes the command line recognisably ours (see
        # ManagedProcess.marker): CPython only keeps unknown -X options in sys._xoptions. An
        # option with an effect (pycache_prefix) would cost: it hides the venv's .pyc files, and
        # every start compiled torch again (4.8 s of CPU instead of 2.2).
        return ManagedProcess.in_stack(self.stack_dir, self.name, self.marker)

    @property
    def marker(self) -> str:
        return f"{MARKER_OPTION}={self.stack_dir}"

    def start(self, *, wait: bool = True, timeout_s: float = 90.0) -> int:
        proc = self.process
        pid = proc.pid()
        if pid is None:
            argv = [
                sys.executable,
                "-X",
                self.marker,
                "-m",
                self.module,
            ]
            pid = proc.start(argv, cwd=Path.cwd(), env={**os.environ, **self.env})
        if wait:
            self.wait_ready(timeout_s=timeout_s)
        return pid

    def ready(self) -> bool:
        return self.health() if self.health else port_open(self.host, self.port)

    def wait_ready(self, *, timeout_s: float = 90.0) -> None:
        wait_until(
            self.ready,
            what=f"{self.name} on {self.port}",
            timeout_s=timeout_s,
            proc=self.process,
        )

    def stop(self) -> bool:
        return self.process.stop(timeout_s=20.0)


@dataclass
class LocalStack:
    settings: Settings
    kafka: KafkaBroker
    s3: WeedS3
    services: list[PythonService] = field(default_factory=list)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        kafka_controller_port: int | None = None,
        s3_ports: WeedPorts | None = None,
        attached: bool = False,
        with_services: bool = False,
        fresh_ports: bool = False,
        scale: Mapping[str, int] | None = None,
    ) -> LocalStack:
        """`attached=True` ties the processes' lives to this one (test fixtures).

        `with_services=True` adds every `python -m services.*` service of docker-compose.yml,
        with its replicas, in dependency order (what `maas stack up` runs); `fresh_ports=True`
        moves their metrics ports to free ones (private stacks beside a developer's).
        ``scale`` (``maas stack up --scale``) overrides replica counts; it is remembered in the
        stack dir, so `status` and `down` see the same replicas, until `down` forgets it.
        """
        stack = cls(
            settings=settings,
            kafka=KafkaBroker.from_settings(
                settings, controller_port=kafka_controller_port, attached=attached
            ),
            s3=WeedS3.from_settings(settings, ports=s3_ports, attached=attached),
        )
        if with_services:
            counts = stack.remember_scale(scale or {})
            stack.services = list(
                compose_services(settings, stack.stack_dir, fresh_ports=fresh_ports, scale=counts)
            )
        return stack

    def remember_scale(self, scale: Mapping[str, int]) -> dict[str, int]:
        """The replica overrides in force: the remembered ones updated with ``scale``."""
        from infra.compose import check_scale

        path = self.stack_dir / "scale.json"
        counts = json.loads(path.read_text()) if path.exists() else {}
        if scale:
            check_scale(scale)
            counts.update(scale)
            self.stack_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(counts, sort_keys=True))
        return dict(counts)

    @property
    def stack_dir(self) -> Path:
        return self.settings.state_path / "stack"

    def components(self) -> list[Component]:
        return [self.kafka, self.s3, *self.services]

    def up(self, *, bootstrap: bool = True, timeout_s: float = 120.0) -> list[ComponentStatus]:
        """Start whatever is not running, wait for all, then create topics and buckets."""
        keep_private(self.settings.state_path)
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.stack_dir / "stack.lock"):
            mismatch = self.tls_mismatch()
            if mismatch is not None:
                raise FailedPrecondition(f"{mismatch}, or `maas stack down` first")
            infra: list[Component] = [self.kafka, self.s3]
            # Kafka and S3 boot in parallel; services need both, so they come after.
            for component in infra:
                component.start(wait=False)
            for component in infra:
                component.wait_ready(timeout_s=timeout_s)
            ensure_tokens(tokens_file(self.settings).parent, STACK_IDENTITIES)
            if bootstrap:
                from infra.bootstrap import bootstrap as run_bootstrap

                asyncio.run(run_bootstrap(self.settings, timeout_s=timeout_s))
            for start, wait in start_plan(self.services):
                for component in start:
                    component.start(wait=False)
                for component in wait:
                    component.wait_ready(timeout_s=timeout_s)
            self._record()
        return self.status()

    def down(self) -> list[str]:
        """Stop every component this state dir started, services first. Returns what stopped."""
        with file_lock(self.stack_dir / "stack.lock"):
            # The services stop together (each says `down` and drains on its own), then S3
            # and the broker they were talking to, together too.
            services: list[Component] = list(reversed(self.services))
            stopped = stop_together(services) + stop_together([self.s3, self.kafka])
            for remembered in ("scale.json", "ports.json", TLS_FILE):
                (self.stack_dir / remembered).unlink(missing_ok=True)
        return stopped

    def status(self) -> list[ComponentStatus]:
        recorded = self._recorded()
        rows = []
        for component in self.components():
            process = component.process
            pid = process.pid()
            host, port = recorded.get(component.name, (self._host(component), component.port))
            alive = pid is not None
            healthy = alive and component.ready()
            why = "" if alive else why_down(process.log_file)
            ports: Mapping[str, int] = {}
            unready = degraded = ""
            if isinstance(component, PythonService):
                ports = component.served_ports
                if alive and not healthy and component.health_reason is not None:
                    unready = component.health_reason()
                if healthy and component.dependency_reason is not None:
                    degraded = component.dependency_reason()
            rows.append(
                ComponentStatus(
                    component.name, pid, alive, host, port, healthy, ports, why, unready, degraded
                )
            )
        return rows

    def is_up(self) -> bool:
        return all(row.alive for row in self.status())

    def _host(self, component: Component) -> str:
        return str(getattr(component, "host", "127.0.0.1"))

    def _record(self) -> None:
        # What `up` used, so `status` run with another environment still reports the real ports.
        data = {c.name: {"host": self._host(c), "port": c.port} for c in self.components()}
        (self.stack_dir / "stack.json").write_text(json.dumps(data, indent=2) + "\n")
        (self.stack_dir / TLS_FILE).write_text(json.dumps({"grpc_tls": self.settings.grpc_tls}))

    def tls_mismatch(self) -> str | None:
        """What to do when the running services speak TLS and this environment does not (or
        the other way round): their health checks from here fail, which reads as 'not ready'."""
        try:
            started_tls = bool(json.loads((self.stack_dir / TLS_FILE).read_text())["grpc_tls"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        if started_tls == self.settings.grpc_tls:
            return None
        if not any(s.process.pid() is not None for s in self.services):
            return None
        if started_tls:
            return (
                "the running stack's services speak TLS (MAAS_GRPC_TLS=true when it started) "
                "and this environment has it off: set MAAS_GRPC_TLS=true and MAAS_TLS_CA_FILE "
                "(the CA of their certificate)"
            )
        return (
            "the running stack's services speak plaintext (MAAS_GRPC_TLS off when it started) "
            "and this environment has MAAS_GRPC_TLS=true: unset it"
        )

    def _recorded(self) -> dict[str, tuple[str, int]]:
        try:
            data = json.loads((self.stack_dir / "stack.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {name: (v["host"], int(v["port"])) for name, v in data.items()}


@dataclass
class PortBook:
    """The ports the stack's replicas got, kept in ``ports.json`` of the stack dir until `down`,
    so `status` checks the ports `up` chose. ``fresh`` moves every metrics port to a free one."""

    path: Path
    fresh: bool = False

    def __call__(self, name: str, var: str, port: int) -> int:
        from infra.proc import free_port

        book = self._read()
        if var in book.get(name, {}):
            return int(book[name][var])
        if self.fresh and var.endswith("METRICS_PORT"):
            port = 0
        chosen = port or free_port()
        book.setdefault(name, {})[var] = chosen
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(book, indent=2, sort_keys=True) + "\n")
        return chosen

    def _read(self) -> dict[str, dict[str, int]]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (FileNotFoundError, ValueError):
            return {}


def keep_private(directory: Path) -> None:
    """The stack's state directory (tokens, the registry database, S3 objects, Kafka logs) is
    its owner's alone: created 0700, or tightened to 0700 when this user owns it (what the
    servers write inside it is 0644 or 0755: readable by anyone the directory lets in)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        directory.chmod(0o700)


def stop_together(components: Sequence[Component]) -> list[str]:
    """Stop each at once; the names of those that were running, in the order given."""
    if not components:
        return []
    with ThreadPoolExecutor(len(components)) as pool:
        done = list(pool.map(lambda c: c.stop(), components))
    return [c.name for c, ok in zip(components, done, strict=True) if ok]


Step = tuple[list[PythonService], list[PythonService]]


def start_plan(services: Sequence[PythonService]) -> list[Step]:
    """(start these, then wait until these are ready) steps: a service starts as soon as every
    replica of each compose service it depends on is ready, and the stack waits only for what
    a later start needs, then for everything."""
    steps: list[Step] = []
    pending = list(services)
    running: list[PythonService] = []
    while pending:
        present = {_group(c) for c in pending}
        start = [c for c in pending if not present & set(c.depends_on)] or pending[:1]
        pending = [c for c in pending if c not in start]
        running += start
        needed = {d for c in pending for d in c.depends_on}
        wait = [c for c in running if _group(c) in needed] if pending else running
        steps.append((start, wait))
        running = [c for c in running if c not in wait]
    return steps


def _group(service: PythonService) -> str:
    return service.compose_name or service.name


def compose_services(
    settings: Settings,
    stack_dir: Path,
    *,
    fresh_ports: bool = False,
    scale: Mapping[str, int] | None = None,
) -> Iterator[PythonService]:
    """docker-compose.yml's Python services as local processes (see infra/compose.py)."""
    from infra.compose import (
        dependency_reason,
        health_reason,
        is_ready,
        listen_ports,
        local_services,
    )

    book = PortBook(stack_dir / "ports.json", fresh=fresh_ports)
    for spec in local_services(settings, choose_port=book, scale=scale):
        yield PythonService(
            service_name=spec.name,
            module=spec.module,
            host=spec.host,
            listen_port=spec.port,
            stack_dir=stack_dir,
            env={**spec.env, **auth_env(settings, spec.env)},
            health=partial(is_ready, spec, settings=settings),
            health_reason=partial(health_reason, spec),
            dependency_reason=partial(dependency_reason, spec),
            served_ports=listen_ports(spec),
            compose_name=spec.compose_name,
            depends_on=spec.depends_on,
        )


def auth_env(settings: Settings, compose_env: Mapping[str, str]) -> dict[str, str]:
    """A service's token table and token file in this stack's auth directory: the file name
    compose gives it (e.g. inference.token), else services.token. MAAS_AUTH_TOKEN is blanked
    so a token exported in the user's shell never becomes a service's identity."""
    table = tokens_file(settings)
    token_name = Path(compose_env.get("MAAS_AUTH_TOKEN_FILE") or "services.token").name
    return {
        "MAAS_AUTH_TOKENS_FILE": str(table),
        "MAAS_AUTH_TOKEN_FILE": str(table.parent / token_name),
        "MAAS_AUTH_TOKEN": "",
    }
