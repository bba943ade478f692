"""The object store's client against an S3 that accepts connections and never answers (a frozen
server): its calls end Unavailable after the read timeout, try by try, instead of waiting."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from maas.config import Settings
from maas.errors import InvalidArgument, Unavailable
from maas.store import ObjectStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts and then reads and says nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    for connection in accepted:
        connection.close()
    listener.close()


def test_a_frozen_s3_is_unavailable_after_the_read_timeout_not_a_hang(silent_server: int) -> None:
    settings = Settings(s3_endpoint=f"127.0.0.1:{silent_server}", s3_read_timeout_s=1)
    store = ObjectStore(settings, max_attempts=2, retry_backoff_ms=10)
    with pytest.raises(Unavailable):
        store.get_bytes("maas-datasets", "x.npz")


def test_a_read_timeout_under_a_second_is_refused_naming_the_setting() -> None:
    with pytest.raises(InvalidArgument, match="MAAS_S3_READ_TIMEOUT_S=0"):
        ObjectStore(Settings(s3_read_timeout_s=0))
