"""How many bytes of requests the inference service computes at once.

gRPC and HTTP bound one request's size; nothing else bounds how many arrive together, and each
one in computation holds its input, its output and the forward pass's activations (a 256 MB
request peaked near 900 MB). ``InflightBytes`` admits a request while the inputs already being
computed plus its own stay under the budget, and answers the rest UNAVAILABLE (retriable: a
client, or the Kafka request stream, tries again shortly) naming the setting. One request is
always admitted when nothing else is in flight, so a request under the size limits can always
be served.
"""

from __future__ import annotations

from maas.errors import InvalidArgument, Unavailable

MiB = 1 << 20


class InflightBytes:
    def __init__(
        self, limit_bytes: int, setting: str = "MAAS_INFERENCE_MAX_INFLIGHT_BYTES"
    ) -> None:
        if limit_bytes < 1:
            raise InvalidArgument(f"{setting}={limit_bytes} must be at least 1")
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self._setting = setting

    def take(self, nbytes: int) -> None:
        """Hold ``nbytes`` for a request, or refuse it; ``give`` them back when it is done."""
        if self.held_bytes and self.held_bytes + nbytes > self.limit_bytes:
            raise Unavailable(
                f"the server is computing {self.held_bytes / MiB:.1f} MiB of requests and this "
                f"one's {nbytes / MiB:.1f} MiB would go over {self._setting}="
                f"{self.limit_bytes}; retry shortly, or send fewer rows per request"
            )
        self.held_bytes += nbytes

    def give(self, nbytes: int) -> None:
        self.held_bytes -= nbytes
