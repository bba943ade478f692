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
version's process starts in tens of milliseconds, not seconds; the model reaches it as
``torch.save`` bytes (the child holds its own copy of the weights). A child exits when its
command pipe closes — also when the server dies — and its end of the event pipe closing tells
the server that it is gone, whatever the reason.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import signal
import struct
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import torch

from maas.errors import Unavailable
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
    """One message on a pipe: its pickle's length (4 bytes, little-endian), then the pickle."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
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
            messages.append(pickle.loads(self._buffer[start + _LENGTH.size : end]))
            start = end
        del self._buffer[:start]
        return messages


def submit(request_id: int, ids: list[int], params: SamplingParams) -> bytes:
    return frame((SUBMIT, request_id, array("i", ids).tobytes(), params))


def cancel(request_id: int) -> bytes:
    return frame((CANCEL, request_id))


def token_of(event: Event) -> Token | Unavailable:
    _, token_id, text, finish = event
    if token_id == FAILED_TOKEN:
        return Unavailable(text)
    return Token(token_id, text, finish)


def decode_loop(model: GPT, commands: int, events: int, slots: int) -> None:
    """Serve ``commands`` (a pipe's read end) until it closes, writing to ``events``."""
    batch = DecodeBatch(model, slots)
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

    def apply(command: tuple[object, ...]) -> None:
        if command[0] == CANCEL:
            request = requests.pop(int(command[1]))  # type: ignore[call-overload]
            batch.release(request)
            return
        _, request_id, ids, params = command
        assert isinstance(request_id, int) and isinstance(ids, bytes)
        assert isinstance(params, SamplingParams)
        request = Request(array("i", ids).tolist(), params, emitter(request_id))
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
                assert isinstance(command, tuple)
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


def start_process(model: GPT, slots: int, name: str) -> Worker:
    """A child process decoding ``model``; blocks while it starts (call it off the loop)."""
    commands_r, commands_w = _CONTEXT.Pipe(duplex=False)
    events_r, events_w = _CONTEXT.Pipe(duplex=False)
    # torch.save, not torch's shared-memory pickling: that drops the temporary tensors a
    # quantized layer's state is made of before the forkserver can take their descriptors.
    weights = io.BytesIO()
    torch.save(model, weights)
    process = _CONTEXT.Process(
        target=_child,
        args=(weights.getvalue(), commands_r, events_w, slots, torch.get_num_threads()),
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
    saved_model: bytes,
    commands: multiprocessing.connection.Connection,
    events: multiprocessing.connection.Connection,
    slots: int,
    torch_threads: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops it by closing the pipe
    torch.set_num_threads(torch_threads)
    # Our own process's bytes, written just now by torch.save: not an artifact from outside.
    model = torch.load(io.BytesIO(saved_model), weights_only=False)
    decode_loop(model, _take_fd(commands), _take_fd(events), slots)
