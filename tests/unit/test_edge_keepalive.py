"""A gRPC server of the platform ends the calls of a client that stopped answering (a frozen
process: its kernel still holds the connection) once its keepalive ping goes unanswered. While
the server is sending, TCP itself gives up on such a peer (grpc's TCP_USER_TIMEOUT, 20 s); a call
on which nothing is in flight (a stream waiting for a generation slot, a bidirectional stream
between requests) was held for as long as the client stayed frozen."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest

from maas.config import Settings
from maas.edge.server import server_options

# A client that reads the first message of a stream, says so, then holds the stream open.
CLIENT = """
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
stream = channel.unary_stream("/t.Talk/Forever")(b"go")
next(stream)
print("reading", flush=True)
import time; time.sleep(3600)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
async def test_an_idle_stream_of_a_frozen_client_is_ended_by_the_servers_pings() -> None:
    ended = asyncio.Event()

    async def forever(request: bytes, context: grpc.aio.ServicerContext):
        try:
            yield b"first"
            await asyncio.Event().wait()  # then nothing in flight: waiting, as for a slot
        finally:
            ended.set()

    settings = Settings(auth=False, grpc_keepalive_s=1)
    server = grpc.aio.server(options=server_options(settings))
    handler = grpc.unary_stream_rpc_method_handler(forever)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Talk", {"Forever": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    try:
        assert client.stdout is not None
        assert await asyncio.to_thread(client.stdout.readline) == "reading\n"
        os.kill(client.pid, signal.SIGSTOP)
        async with asyncio.timeout(60):  # 1 s of silence, 1 s for the answer: ended long before
            await ended.wait()
    finally:
        os.kill(client.pid, signal.SIGCONT)
        client.kill()
        client.wait(timeout=10)
        await server.stop(None)
