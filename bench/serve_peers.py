"""The peer servers bench/serve.py compares with, each run as its own process:

    python -m bench.serve_peers floor PORT                       # a no-op OIP servicer
    python -m bench.serve_peers kserve PORT WEIGHTS PROBE_SITE   # KServe, inside its own venv
    <cache>/bench-noop-go-<digest> PORT ANSWER_FILE              # a no-op OIP server in Go

The Go one (bench/noop_go, built on first use with the machine's ``go`` into the cache, keyed on
its sources) is the floor without Python on the server side: what a round trip alone costs the
client and the kernel here.

The KServe one runs in KServe's venv, where neither tritonclient nor this repository's packages
are installed: imports of those happen inside the functions that need them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"in_features": 64, "hidden": [128, 64], "num_classes": 10}
MODEL = "bench-mlp"


def floor_answer() -> Any:
    """The no-op servers' answer to every ModelInfer: a prebuilt 1x10 FP32 response."""
    from maas.oip import grpc_predict_v2_pb2 as pb

    answer = pb.ModelInferResponse(model_name=MODEL, model_version="1")
    answer.outputs.add(name="output", datatype="FP32", shape=[1, 10])
    answer.raw_output_contents.append(bytes(40))
    return answer


def serve_floor(port: int) -> None:
    """A do-nothing OIP server: every ModelInfer gets the same prebuilt 1x10 FP32 answer."""
    import grpc

    from maas.oip import grpc_predict_v2_pb2 as pb
    from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    answer = floor_answer()

    class Floor(pb_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> Any:
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:
            return pb.ServerReadyResponse(ready=True)

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            return answer

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def serve_kserve(port: int, weights: str, probe_site: str) -> None:
    """KServe's ModelServer serving the same zoo MLP (torch borrowed from the project's venv)."""
    # kserve's own packages (protobuf, grpcio, numpy) stay first on the path; torch, safetensors
    # and the model zoo come after them.
    sys.path += [str(ROOT / "shared"), probe_site]
    import kserve
    import torch
    from kserve import InferOutput, InferRequest, InferResponse
    from safetensors.torch import load_file

    from maas import zoo

    torch.set_num_threads(1)
    module = zoo.build("mlp", SMALL)
    module.load_state_dict(load_file(weights))
    module.eval()

    class Mlp(kserve.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(MODEL)
            self.ready = True

        def predict(self, payload: InferRequest, headers: Any = None) -> InferResponse:
            x = payload.inputs[0].as_numpy()
            with torch.inference_mode():
                y = module(torch.from_numpy(x)).numpy()
            out = InferOutput("output", list(y.shape), "FP32")
            out.set_data_from_numpy(y, binary_data=True)
            return InferResponse(payload.id, MODEL, [out], use_binary_outputs=True)

    kserve.ModelServer(grpc_port=port, http_port=_free_port(), workers=1).start([Mlp()])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- starting them from the bench -----------------------------------------------------------


@contextlib.contextmanager
def peer(argv: list[str], port: int, log: Path) -> Iterator[tuple[str, int]]:
    """A peer server process (address, pid); stopped by its PID on exit."""
    import tritonclient.grpc as triton

    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    addr = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(Exception):
                if triton.InferenceServerClient(url=addr).is_server_ready():
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(argv)} did not become ready; see {log}")
            time.sleep(0.2)
        yield addr, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def floor_peer(workdir: Path) -> Iterator[tuple[str, int]]:
    port = _free_port()
    argv = [sys.executable, "-m", "bench.serve_peers", "floor", str(port)]
    with peer(argv, port, workdir / "floor.log") as (addr, pid):
        yield addr, pid


@contextlib.contextmanager
def peer_or_reason(argv: list[str], port: int, log: Path) -> Iterator[tuple[str, int] | str]:
    """``peer``, or why it did not start ("not run: ..."): a peer that cannot run is reported
    as not run, never dropped from the figures."""
    with contextlib.ExitStack() as running:
        try:
            started = running.enter_context(peer(argv, port, log))
        except RuntimeError as exc:
            yield f"not run: {exc}"
            return
        yield started


NOOP_GO = ROOT / "bench" / "noop_go"


def noop_go_binary(cache: Path, timeout_s: float = 600.0) -> Path:
    """The Go no-op server, built on first use into ``cache`` under a name keyed on its
    sources (the go command fetches its one module, grpc, through the module proxy). Raises
    OSError or subprocess.SubprocessError with the reason when it cannot be built."""
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        digest.update((NOOP_GO / name).read_bytes())
    binary = cache / f"bench-noop-go-{digest.hexdigest()[:12]}"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    building = binary.with_name(f"{binary.name}.{os.getpid()}.part")
    done = subprocess.run(
        ["go", "build", "-o", str(building), "."],
        cwd=NOOP_GO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if done.returncode != 0:
        raise subprocess.SubprocessError(f"go build failed: {(done.stdout + done.stderr)[-1000:]}")
    building.replace(binary)  # whole or absent: a build cut short leaves only the .part file
    return binary


@contextlib.contextmanager
def go_floor_peer(workdir: Path, cache: Path) -> Iterator[tuple[str, int] | str]:
    """The Go no-op server ((address, pid)), or why it cannot run (no ``go``, no module proxy)."""
    try:
        binary = noop_go_binary(cache)
    except (OSError, subprocess.SubprocessError) as exc:
        yield f"not run: the Go no-op server could not be built ({exc})"
        return
    answer = workdir / "noop-go-answer.bin"
    answer.write_bytes(floor_answer().SerializeToString())
    port = _free_port()
    argv = [str(binary), str(port), str(answer)]
    with peer_or_reason(argv, port, workdir / "noop-go.log") as started:
        yield started


@contextlib.contextmanager
def kserve_peer(module: Any, workdir: Path) -> Iterator[tuple[str, int] | str]:
    """KServe's ModelServer on ``module``'s weights ((address, pid)), or why it cannot run."""
    import site

    from safetensors.torch import save_file

    from infra.harness.serving import kserve_python

    try:
        python = kserve_python()
    except Exception as exc:  # a failed venv build is reported, never silently dropped
        yield f"not run: the KServe venv could not be built ({exc})"
        return
    weights = workdir / "bench-mlp.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    port = _free_port()
    argv = [str(python), "-m", "bench.serve_peers", "kserve", str(port), str(weights)]
    argv.append(site.getsitepackages()[0])
    with peer_or_reason(argv, port, workdir / "kserve.log") as started:
        yield started


if __name__ == "__main__":
    if sys.argv[1] == "floor":
        serve_floor(int(sys.argv[2]))
    else:
        serve_kserve(int(sys.argv[2]), sys.argv[3], sys.argv[4])
