"""Reading a service's HTTP port (``/metrics``, ``/healthz``) from a test, error statuses too."""

from __future__ import annotations

import urllib.error
import urllib.request


def http_get(port: int, path: str, *, host: str = "127.0.0.1") -> tuple[int, str]:
    """(status, body) of ``GET path``; a 4xx/5xx answer is returned, not raised. URLError when
    nothing answers on the port."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
