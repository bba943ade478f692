"""A completion streamed from the inference service and shown token by token as it arrives.

The client is the unmodified ``tritonclient.grpc`` stream (``start_stream`` /
``async_stream_infer``) against OIP ``ModelStreamInfer``, with this process's bearer token; the
prompt goes as the BYTES input ``text_input`` and sampling settings as request parameters.
"""

from __future__ import annotations

import queue
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from maas.config import Settings
from maas.edge import call_metadata
from maas.errors import FailedPrecondition

FIRST_TOKEN_TIMEOUT_S = 120.0  # the first request may load the model
TOKEN_TIMEOUT_S = 30.0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def stream_completion(
    settings: Settings,
    model: str,
    prompt: str,
    *,
    version: str = "",
    max_tokens: int = 120,
    temperature: float = 0.8,
    seed: int = 0,
    write: Callable[[str], None] = _write,
) -> str:
    """Stream the completion of ``prompt`` by ``model`` (``version``: a number or an alias, none
    = production), passing each token's text to ``write`` as it arrives."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(
        settings.inference_addr,
        ssl=settings.grpc_tls,
        root_certificates=settings.tls_ca_file or None,
    )
    arrived: queue.Queue[Any] = queue.Queue()
    pieces: list[str] = []
    try:
        client.start_stream(
            callback=lambda result, error: arrived.put(error or result),
            headers=dict(call_metadata(settings)),
        )
        text = triton.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        parameters = {"max_tokens": max_tokens, "temperature": str(temperature), "seed": seed}
        client.async_stream_infer(model, [text], model_version=version, parameters=parameters)
        final = False
        while not final:
            try:
                item = arrived.get(timeout=TOKEN_TIMEOUT_S if pieces else FIRST_TOKEN_TIMEOUT_S)
            except queue.Empty:
                raise FailedPrecondition(
                    f"{model} sent no token for {TOKEN_TIMEOUT_S:.0f}s"
                ) from None
            if isinstance(item, Exception):
                raise FailedPrecondition(f"streaming from {model} failed: {item}")
            piece = bytes(item.as_numpy("text_output")[0]).decode("utf-8", errors="replace")
            pieces.append(piece)
            write(piece)
            final = item.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return "".join(pieces)
