"""A data-plane stream to a peer that stopped answering (a SIGSTOPped process, a paused VM: its
kernel still holds the connection) ends within seconds, by the keepalive pings' timeout: a worker
then dials again instead of waiting on it for as long as the peer is frozen."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest

from maas.config import Settings
from maas.training.dataplane import open_channel

# A peer that answers a stream once, then holds it open: the address goes to stdout.
PEER = """
import asyncio, grpc
from maas.training.dataplane import _KEEPALIVE
async def once(requests, context):
    await requests.__anext__()
    yield b"hello"
    await asyncio.Event().wait()
async def main():
    server = grpc.aio.server(options=list(_KEEPALIVE))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Peer", {"Hold": grpc.stream_stream_rpc_method_handler(once)}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
async def test_a_stream_to_a_frozen_peer_ends_within_seconds() -> None:
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert peer.stdout is not None
        port = int(peer.stdout.readline())
        async with open_channel(f"127.0.0.1:{port}", Settings(auth=False)) as channel:
            call = channel.stream_stream("/t.Peer/Hold")()
            await call.write(b"join")
            assert await asyncio.wait_for(call.read(), 30) == b"hello"
            os.kill(peer.pid, signal.SIGSTOP)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), 30)  # grpc's default waited a minute
            assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        os.kill(peer.pid, signal.SIGCONT)
        peer.kill()
        peer.wait(timeout=10)
