"""Where a generative model decodes: a child process of its own (the default), or a thread.

The decode loop and the server's event loop meet only at two pipes. Commands go in (``submit``
a prompt to a slot, ``cancel`` a request); events come out, one frame per prefill round or decode
step, each event a token or a failure of one request. Closing the command pipe ends the loop.

Why a process: the server's event loop (gRPC, HTTP, Kafka) and the decode loop both run Python,
and in one interpreter they take turns on its lock. Measured with one stream on two cores, a
thread-driven engine gave each token 40 % more time than the in-process generate loop; the same
loop behind pipes in a child process gave it none, since the loop's per-token work then runs on
the other core beside the step instead of between steps. The thread keeps the same loop and
pipes, for embedding and for tests that patch the model in this process.

Children are forked from a forkserver that imports torch and this module once, so a new model
version's process starts in tens of milliseconds, not seconds; the model reaches it as an
artifact would — safetensors bytes and a JSON config, rebuilt by the shared loader — and frames
on the pipes are JSON: nothing crossing a pipe is unpickled. The child holds its own copy of the
weights. A child exits when its command pipe closes — also when the server dies — and its end of
the event pipe closing tells the server that it is gone, whatever the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

from maas.compression import formats
from maas.cpus import pin_process
from maas.errors import Unavailable
from maas.lifecycle import log_to_stderr
from maas.text.gpt import GPT
from maas.text.sampling import SamplingParams, Token
from services.inference.decoding import DecodeBatch, Request

log = logging.getLogger(__name__)

SUBMIT = "submit"
CANCEL = "cancel"
_LENGTH = struct.Struct("<I")
_READ_BYTES = 1 << 16
# One event: (request id, token id, text, finish reason); a failed request has token id -1 and
# the reason in place of the text.
Event = tuple[int, int, str, str | None]
FAILED_TOKEN = -1


def frame(message: object) -> bytes:
    """One message on a pipe: its JSON's length (4 bytes, little-endian), then the JSON."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


class Frames:
    """Reassembles whole messages from pipe reads, which may cut a frame anywhere."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[object]:
        """The messages completed by ``data``; each is returned once, whatever its reader does."""
        self._buffer += data
        messages, start = [], 0
        while len(self._buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer, start)
            end = start + _LENGTH.size + size
            if end > len(self._buffer):
                break
            messages.append(json.loads(self._buffer[start + _LENGTH.size : end]))
            start = end
        del self._buffer[:start]
        return messages


def submit(request_id: int, ids: list[int], params: SamplingParams) -> bytes:
    return frame((SUBMIT, request_id, ids, dataclasses.asdict(params)))


def cancel(request_id: int) -> bytes:
    return frame((CANCEL, request_id))


def token_of(event: Event) -> Token | Unavailable:
    _, token_id, text, finish = event
    if token_id == FAILED_TOKEN:
        return Unavailable(text)
    return Token(token_id, text, finish)


def decode_loop(model: GPT, commands: int, events: int, slots: int, *, warm: bool = False) -> None:
    """Serve ``commands`` (a pipe's read end) until it closes, writing to ``events``;
    ``warm``: compile the decode step before the first request comes."""
    batch = DecodeBatch(model, slots)
    if warm:
        try:
            batch.warm()
        except Exception:  # the first request meets the same fault and fails with it
            log.exception("warming the decode step failed")
    requests: dict[int, Request] = {}
    outbox: list[Event] = []
    inbox = Frames()

    def emitter(request_id: int) -> Callable[[Token | BaseException], None]:
        def emit(item: Token | BaseException) -> None:
            if isinstance(item, BaseException):
                outbox.append((request_id, FAILED_TOKEN, str(item), None))
                requests.pop(request_id, None)
                return
            outbox.append((request_id, item.id, item.text, item.finish))
            if item.finish is not None:
                requests.pop(request_id, None)

        return emit

    def apply(command: list[Any]) -> None:
        if command[0] == CANCEL:
            request = requests.pop(command[1])
            batch.release(request)
            return
        _, request_id, ids, fields = command
        assert isinstance(request_id, int) and isinstance(ids, list) and isinstance(fields, dict)
        request = Request(ids, _params(fields), emitter(request_id))
        requests[request_id] = request
        try:
            batch.admit(request)
        except Exception as exc:  # a failed prefill fails its own stream, and the loop goes on
            log.exception("prefill failed")
            batch.release(request)
            request.emit(_failure(exc))

    try:
        while (received := _read(commands, block=not batch.active)) is not None:
            for command in inbox.feed(received):
                assert isinstance(command, list)
                if command[0] != CANCEL or command[1] in requests:
                    apply(command)
            _write(events, outbox)  # first tokens leave now, not one decode step later
            if batch.active:
                try:
                    batch.step()
                except Exception as exc:  # a failed step fails its streams, never the loop
                    log.exception("decode step failed")
                    batch.fail_all(_failure(exc))
            _write(events, outbox)
    except BrokenPipeError:  # the server is gone: nobody to answer
        pass
    finally:
        os.close(events)
        os.close(commands)


def _params(fields: dict[str, Any]) -> SamplingParams:
    """``SamplingParams`` back from its JSON form (lists where it holds tuples)."""
    bias = tuple((int(token), float(value)) for token, value in fields.pop("logit_bias"))
    stop = tuple(fields.pop("stop"))
    return SamplingParams(**fields, stop=stop, logit_bias=bias)


def _failure(exc: Exception) -> Unavailable:
    return Unavailable(f"generation failed ({type(exc).__name__})")


def _read(fd: int, *, block: bool) -> bytes | None:
    """What the pipe holds now (b"" if nothing and not ``block``); None once it is closed."""
    if not block and not select.select([fd], [], [], 0)[0]:
        return b""
    data = os.read(fd, _READ_BYTES)
    return data or None


def _write(fd: int, outbox: list[Event]) -> None:
    if not outbox:
        return
    data = memoryview(frame(list(outbox)))
    outbox.clear()
    while data:
        data = data[os.write(fd, data) :]


@dataclass
class Worker:
    """A started decode loop: the server's ends of its pipes and a way to wait for its end."""

    commands: int  # write end
    events: int  # read end
    join: Callable[[float], bool]  # wait up to so many seconds; True once it has ended
    pid: int | None = None  # the child process; None for a thread


def start_thread(model: GPT, slots: int, name: str) -> Worker:
    commands_r, commands_w = os.pipe()
    events_r, events_w = os.pipe()
    thread = threading.Thread(
        target=decode_loop,
        args=(model, commands_r, events_w, slots),
        name=f"maas-decode-{name}",
        daemon=True,
    )
    thread.start()

    def join(timeout_s: float) -> bool:
        thread.join(timeout_s)
        return not thread.is_alive()

    return Worker(commands_w, events_r, join)


def _forkserver() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


_CONTEXT = _forkserver()


def start_process(model: GPT, slots: int, name: str, cpus: frozenset[int] = frozenset()) -> Worker:
    """A child process decoding ``model``, on ``cpus`` only if any are named; blocks while it
    starts (call it off the loop)."""
    commands_r, commands_w = _CONTEXT.Pipe(duplex=False)
    events_r, events_w = _CONTEXT.Pipe(duplex=False)
    # As an artifact travels: safetensors bytes and a JSON config, rebuilt by the shared loader
    # (int8 layers included); nothing is unpickled on the other side.
    weights = safetensors.torch.save(formats.running_state(model))
    config = json.dumps(dataclasses.asdict(model.config))
    log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())  # the server's
    threads = torch.get_num_threads()
    process = _CONTEXT.Process(
        target=_child,
        args=(weights, config, commands_r, events_w, slots, threads, sorted(cpus), log_level),
        name=f"maas-decode-{name}",
        daemon=True,  # ended with the server even if it never closes the engine
    )
    process.start()
    # Only the child may hold these ends: the server sees the child's end as end-of-file.
    commands_r.close()
    events_w.close()

    def join(timeout_s: float) -> bool:
        process.join(timeout_s)
        if process.exitcode is None:
            process.kill()
            process.join(timeout_s)
        return process.exitcode is not None

    log.info("decoding %s in process %s", name, process.pid)
    return Worker(_take_fd(commands_w), _take_fd(events_r), join, process.pid)


def _take_fd(connection: multiprocessing.connection.Connection) -> int:
    """The connection's pipe as a bare descriptor: the loops frame their own messages."""
    fd = os.dup(connection.fileno())
    connection.close()
    return fd


def _child(
    weights: bytes,
    config: str,
    commands: multiprocessing.connection.Connection,
    events: multiprocessing.connection.Connection,
    slots: int,
    torch_threads: int,
    cpus: list[int],
    log_level: str,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops it by closing the pipe
    log_to_stderr(log_level)
    if cpus:
        pin_process(cpus)
    torch.set_num_threads(torch_threads)
    model = formats.rebuild("gpt", json.loads(config), safetensors.torch.load(weights)).eval()
    assert isinstance(model, GPT)
    log.info(
        "%s (pid %d) holds the model: %d slots, %d torch threads, cpus %s",
        multiprocessing.current_process().name,
        os.getpid(),
        slots,
        torch_threads,
        cpus or "any",
    )
    decode_loop(model, _take_fd(commands), _take_fd(events), slots, warm=True)
