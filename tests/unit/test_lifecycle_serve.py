"""The one service shell (``maas.lifecycle.run_service``): start, then /metrics and /healthz, run
until stopped or crashed, and always stop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.error

import pytest
from prometheus_client import CollectorRegistry

from infra.harness.http import http_get
from infra.proc import free_port
from maas.errors import Unavailable
from maas.lifecycle import run_service
from maas.liveness import Liveness


class Recorded:
    """A service that records its calls; ``loop`` dies with ``Unavailable`` when told to."""

    def __init__(self, *, crash: bool = False) -> None:
        self.metrics_registry = CollectorRegistry()
        self.liveness = Liveness(self.metrics_registry)
        self.calls: list[str] = []
        self.running = asyncio.Event()
        self.kill_loop = asyncio.Event()
        self._crash = crash

    async def start(self) -> None:
        self.calls.append("start")

    async def _loop(self) -> None:
        await self.kill_loop.wait()
        raise Unavailable("the broker is gone")

    async def run(self) -> None:
        self.calls.append("run")
        self.running.set()
        if self._crash:
            raise RuntimeError("run crashed")
        await self.liveness.supervise("loop", self._loop())

    async def stop(self) -> None:
        self.calls.append("stop")


async def test_healthz_says_serving_then_why_a_supervised_loop_stopped() -> None:
    service, stop, port = Recorded(), asyncio.Event(), free_port()
    task = asyncio.create_task(run_service(service, stop, metrics_port=port))
    await asyncio.wait_for(service.running.wait(), 10)

    assert await asyncio.to_thread(http_get, port, "/healthz") == (200, "SERVING")
    service.kill_loop.set()
    while service.liveness.healthy:
        await asyncio.sleep(0.01)
    status, body = await asyncio.to_thread(http_get, port, "/healthz")
    assert status == 503 and body == "NOT_SERVING: loop: the broker is gone"
    assert "maas_loop_up" in (await asyncio.to_thread(http_get, port, "/metrics"))[1]

    stop.set()
    await asyncio.wait_for(task, 10)
    assert service.calls == ["start", "run", "stop"]
    with pytest.raises(urllib.error.URLError):  # the port closed with the service
        await asyncio.to_thread(http_get, port, "/healthz")


async def test_a_run_that_crashes_ends_the_shell_with_its_error_and_still_stops() -> None:
    service = Recorded(crash=True)
    with pytest.raises(RuntimeError, match="run crashed"):
        await asyncio.wait_for(run_service(service, asyncio.Event()), 10)
    assert service.calls == ["start", "run", "stop"]


async def test_a_failed_start_is_the_error_even_when_stopping_fails_too() -> None:
    class Unreachable(Recorded):
        async def start(self) -> None:
            raise Unavailable("cannot reach Kafka")

        async def stop(self) -> None:
            raise RuntimeError("producer used before start()")

    with pytest.raises(Unavailable, match="cannot reach Kafka"):
        await asyncio.wait_for(run_service(Unreachable(), asyncio.Event()), 10)


REFUSING_SERVICE = """
from maas.config import Settings
from maas.errors import InvalidArgument
from maas.lifecycle import serve

def build():
    raise InvalidArgument("MAAS_AUTH_TOKENS_FILE /nowhere does not exist; create it")

serve(build, Settings(), metrics_port=0)
"""


def test_a_service_refusing_to_start_on_purpose_says_why_in_one_line() -> None:
    ended = subprocess.run(
        [sys.executable, "-c", REFUSING_SERVICE], capture_output=True, text=True, timeout=120
    )
    assert ended.returncode == 1
    assert "cannot go on: invalid_argument: MAAS_AUTH_TOKENS_FILE /nowhere" in ended.stderr
    assert "Traceback" not in ended.stderr
