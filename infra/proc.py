"""Start, find and stop one native background process by its PID file.

A process is ours only if its PID file exists *and* its command line still contains a marker we
chose (a path inside its state dir): a recycled PID belonging to someone else is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, TypedDict

from maas.config import Settings
from maas.errors import DeadlineExceeded, FailedPrecondition


@dataclass(frozen=True)
class ManagedProcess:
    name: str
    pid_file: Path
    log_file: Path
    marker: str  # substring of the command line that proves the PID is still ours
    # Test stacks die with the process that started them (even on SIGKILL of pytest);
    # `maas stack up` must outlive its terminal, so it leaves this off.
    die_with_parent: bool = False

    @classmethod
    def in_stack(
        cls, stack_dir: Path, name: str, marker: str, *, die_with_parent: bool = False
    ) -> ManagedProcess:
        """``name``'s process, with its PID file and log in ``stack_dir``."""
        return cls(
            name, stack_dir / f"{name}.pid", stack_dir / f"{name}.log", marker, die_with_parent
        )

    def pid(self) -> int | None:
        """The PID if the process is running and still ours, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_ours(pid, self.marker) else None

    def alive(self) -> bool:
        return self.pid() is not None

    def start(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> int:
        if not any(self.marker in arg for arg in argv):
            raise FailedPrecondition(f"{self.name}: marker {self.marker!r} is not in its argv")
        running = self.pid()
        if running is not None:
            return running
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.unlink(missing_ok=True)  # a stale PID must not pass for the new one
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(run_marker(RUN_STARTED, self.name))
            log.flush()
            # A new session: Ctrl-C in the terminal that ran `maas stack up` does not kill it.
            proc = subprocess.Popen(
                self._command(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        if self.die_with_parent:
            self.pid_file.write_text(f"{proc.pid}\n")
        # The exit recorder writes the PID file only once it forked, and until the child's exec
        # is done it shows the recorder's command line, then for a moment (on a loaded machine,
        # milliseconds) an empty one, which `alive()` calls dead. Waiting until it shows its own
        # keeps a process that is merely starting from passing for one that has ended.
        deadline = time.monotonic() + 10.0
        while (pid := self._running(argv)) is None:
            if proc.poll() is not None:
                raise FailedPrecondition(
                    f"{self.name} exited at once (rc {proc.returncode}); log {self.log_file}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise FailedPrecondition(
                    f"{self.name} did not start in 10 s; log {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.01)
        return pid

    def _running(self, argv: Sequence[str]) -> int | None:
        """The PID once the process runs ``argv`` itself, else None."""
        pid = self.pid()
        found = None if pid is None else _process(pid)
        return pid if found is not None and found[1].startswith(" ".join(argv)) else None

    def _command(self, argv: Sequence[str]) -> list[str]:
        """``argv``, under the exit recorder unless it dies with its parent: a fixture's
        process ends with the test run, and that parent's death signal would reach only sh."""
        if self.die_with_parent:
            return list(argv)
        return ["/bin/sh", "-c", _RECORD_EXIT, self.name, str(self.pid_file), *argv]

    def stop(self, *, timeout_s: float = 20.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout_s`. True if something was stopped."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _reap(pid)
            if _gone(pid, self.marker):
                break
            time.sleep(0.1)
        else:
            _signal(pid, signal.SIGKILL)
            for _ in range(50):
                _reap(pid)
                if _gone(pid, self.marker):
                    break
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:  # what came before is not why it is down now
            log.write(run_marker(RUN_STOPPED, self.name))
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    # Only succeeds when we are the parent (the pytest fixture); otherwise init reaps it.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _process(pid: int) -> tuple[str, str] | None:
    """The state letter and command line of ``pid``; None when there is no such process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    state = status.partition("\nState:\t")[2][:1]
    return state, cmdline


def _is_ours(pid: int, marker: str) -> bool:
    found = _process(pid)
    return found is not None and found[0] != "Z" and marker in found[1]


def _gone(pid: int, marker: str) -> bool:
    """Whether a process we signalled has finished exiting. While it frees its memory its
    command line already reads empty, though it still runs: that is not gone yet."""
    found = _process(pid)
    if found is None or found[0] == "Z":
        return True
    cmdline = found[1]
    return bool(cmdline) and marker not in cmdline


RUN_MARKER = "--- "  # a line of the log's own: where a run starts, or where it was stopped
RUN_STARTED = "starting"
RUN_STOPPED = "stopped on request"
RUN_EXITED = "exited with status"  # then the status: 128 + the signal's number when killed

# sh stays the process's parent and writes its exit status into its log when it ends: nobody
# else can learn it once `maas stack up`, which started it, has exited. A process killed with
# SIGKILL says nothing itself. $0 is the name, $1 the PID file, the rest the command line;
# wait's own "Killed" note is dropped, the marker says it.
_RECORD_EXIT = (
    'pid_file=$1; shift; "$@" & echo $! > "$pid_file"; wait $! 2>/dev/null; status=$?; '
    f'printf "\\n{RUN_MARKER}%s {RUN_EXITED} %s %s\\n" "$(date "+%F %T")" "$status" "$0"'
)


def run_marker(event: str, name: str) -> bytes:
    return f"\n{RUN_MARKER}{time.strftime('%F %T')} {event} {name}\n".encode()


def port_open(host: str, port: int, *, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout_s: float,
    proc: ManagedProcess | None = None,
    interval_s: float = 0.2,
) -> None:
    """Poll `check` until true; fail fast (with the log tail) if `proc` died meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return
        if proc is not None and not proc.alive():
            raise FailedPrecondition(
                f"{proc.name} exited while waiting for {what}; log {proc.log_file}:\n"
                f"{proc.log_tail()}"
            )
        if time.monotonic() > deadline:
            tail = f"; log {proc.log_file}:\n{proc.log_tail()}" if proc else ""
            raise DeadlineExceeded(f"{what} not ready after {timeout_s:.0f}s{tail}")
        time.sleep(interval_s)


# Test and bench servers take ports from here up to the kernel's ephemeral range.
FIRST_CHOSEN_PORT = 20000
_chosen_ports: set[int] = set()


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, and never one this process chose before. It lies below
    the kernel's ephemeral range: a server that binds it seconds later (after importing torch)
    still finds it free, where a port from that range may by then be the local end of some
    outgoing connection (a Kafka client's; it happened in CI)."""
    end = _ephemeral_ports_start()
    for _ in range(100 if end - FIRST_CHOSEN_PORT > 1000 else 0):
        port = random.randrange(FIRST_CHOSEN_PORT, end)
        if port not in _chosen_ports and _bindable(host, port):
            _chosen_ports.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # an odd port range
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def split_host_port(address: str, *, default_port: int) -> tuple[str, int]:
    first = address.split(",")[0].strip()
    if "://" in first:
        first = first.split("://", 1)[1]
    host, sep, port = first.rpartition(":")
    if not sep:
        return first, default_port
    return host.strip("[]"), int(port)


class Component(Protocol):
    """A process the stack runs: the broker, the S3 server, a platform service."""

    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def process(self) -> ManagedProcess: ...
    def start(self, *, wait: bool = True, timeout_s: float = 90.0) -> int: ...
    def wait_ready(self, *, timeout_s: float = 90.0) -> None: ...
    def ready(self) -> bool: ...
    def stop(self) -> bool: ...


class _Server(Component, Protocol):
    """A native server, as NativeServer's methods see it."""

    stop_timeout_s: ClassVar[float]
    host: str

    @property
    def home(self) -> Path: ...
    def prepare(self) -> list[str]: ...


class Places(TypedDict):
    home: Path
    stack_dir: Path
    cache_dir: Path


@dataclass(frozen=True, kw_only=True)
class NativeServer:
    """What the native servers (the broker, the S3 server) share: where their state, PID file
    and log live, and how they start, wait until ready and stop. Each provides ``name``,
    ``port``, ``marker``, ``prepare()`` (check the ports, fetch the binaries, write the config;
    return the command line) and ``ready()``."""

    stop_timeout_s: ClassVar[float] = 20.0
    name: ClassVar[str]  # its folder in the state dir, and its PID and log files' name
    home: Path  # <state_dir>/<name>
    stack_dir: Path  # <state_dir>/stack
    cache_dir: Path
    host: str
    attached: bool = False  # die with the starting process (test fixtures)

    @classmethod
    def places(cls, settings: Settings) -> Places:
        """``home``, ``stack_dir`` and ``cache_dir`` under ``settings``' state and cache dirs."""
        return {
            "home": settings.state_path / cls.name,
            "stack_dir": settings.state_path / "stack",
            "cache_dir": settings.cache_path,
        }

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def marker(self) -> str:
        """A command-line argument only this server's process has (it proves a PID is ours)."""
        raise NotImplementedError

    @property
    def process(self) -> ManagedProcess:
        return ManagedProcess.in_stack(
            self.stack_dir, self.name, self.marker, die_with_parent=self.attached
        )

    def start(self: _Server, *, wait: bool = True, timeout_s: float = 90.0) -> int:
        """Start the server (no-op if running) and wait until it answers."""
        proc = self.process
        pid = proc.pid()
        if pid is None:
            pid = proc.start(self.prepare(), cwd=self.home)
        if wait:
            self.wait_ready(timeout_s=timeout_s)
        return pid

    def wait_ready(self: _Server, *, timeout_s: float = 90.0) -> None:
        wait_until(
            self.ready,
            what=f"{self.name} on {self.host}:{self.port}",
            timeout_s=timeout_s,
            proc=self.process,
        )

    def stop(self: _Server) -> bool:
        return self.process.stop(timeout_s=self.stop_timeout_s)

    def cut_off(self: _Server) -> bool:
        """Stop at once, as an outage would (SIGTERM, then SIGKILL a second later). A graceful
        stop waits for its clients' open connections to end (the S3 server: ~15 s), which an
        outage test spends for nothing: what it tests begins when the port stops answering."""
        return self.process.stop(timeout_s=1.0)


def ensure_command(
    argv: list[str] | None, *, module: str, does: str, ensure: Callable[[Path], Path], what: str
) -> int:
    """``python -m <module> ensure``: put what a native server runs into the cache (``ensure``
    does, and returns where), then print ``what`` and that path."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["ensure"]:
        print(f"usage: python -m {module} ensure   # {does}")
        return 2
    print(f"{what}: {ensure(Settings.from_env().cache_path)}")
    return 0
