"""The text chapter of `maas demo`: a real pretrained transformer through the platform.

1. import all-MiniLM-L6-v2 from its installed package (`maas models import`) as ``minilm``;
2. fine-tune a classifier head with the whole encoder on builtin:stdlib-docs (a finetune job on
   the parameter server, examples/jobs/finetune-minilm-docs.yaml);
3. compress it (int8, head/FFN pruning, a 3-layer student: examples/jobs/compress-minilm-docs.yaml)
   and make the int8 variant ``production``;
4. ask the server over gRPC with tritonclient, a docstring as a BYTES string, for its family,
   and time every version over gRPC.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np

from maas.cli_import import import_pretrained
from maas.cli_jobs import console
from maas.demo_report import Row, p50_ms, print_table
from maas.edge import call_metadata
from maas.errors import FailedPrecondition
from maas.registry import RegistryClient
from maas.text.pretrained import MINILM_PACKAGE

if TYPE_CHECKING:  # the demo imports this module lazily; no cycle at run time
    from maas.demo import Demo

BASE = "minilm"
QUESTION = "Return a new socket connected to the given address, with a timeout in seconds."


async def text_chapter(demo: Demo) -> None:
    console().rule("[bold]text[/bold]: all-MiniLM-L6-v2, imported, fine-tuned, compressed, served")
    async with RegistryClient(demo.settings) as registry:
        imported = await import_pretrained(registry, MINILM_PACKAGE, BASE, alias="production")
        console().print(
            f"imported {MINILM_PACKAGE} as {BASE}@{imported.version} "
            f"({imported.size_bytes / 1e6:.1f} MB, every file's sha256 checked)"
        )
    tuned = await demo.submit("finetune-minilm-docs.yaml")
    compressed = await demo.submit("compress-minilm-docs.yaml")
    if tuned.model is None:
        raise FailedPrecondition("the finetune job succeeded without registering a model")
    async with RegistryClient(demo.settings) as registry:
        parent = await registry.get(f"{tuned.model['name']}@{tuned.model['version']}")
        variants = [await registry.get(f"{m['name']}@{m['version']}") for m in compressed.models]
        int8 = next(v for v in variants if v.method == "quantize")
        await registry.set_alias(int8.name, "production", int8.version)
    rows = [Row(v) for v in (parent, *variants)]
    label = await asyncio.to_thread(ask_and_time, demo, rows)
    console().print(f'gRPC ModelInfer {int8.name}: "{QUESTION}" -> [bold]{label}[/bold]')
    print_table(rows, int8, title=f"{parent.name}: fine-tuned MiniLM and its variants")


def ask_and_time(demo: Demo, rows: list[Row]) -> str:
    """The label the production version gives ``QUESTION``; then each row's p50 over gRPC."""
    import tritonclient.grpc as triton

    settings = demo.settings
    client = triton.InferenceServerClient(
        settings.inference_addr,
        ssl=settings.grpc_tls,
        root_certificates=settings.tls_ca_file or None,
    )
    headers = dict(call_metadata(settings))
    question = np.array([QUESTION], dtype=np.object_)
    name = rows[0].version.name
    try:
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(question)
        answer = client.infer(name, [text], headers=headers)
        for r in rows:
            r.p50_ms = p50_ms(triton, client, headers, name, str(r.version.version), question)
        return str(answer.as_numpy("label")[0].decode())
    finally:
        client.close()
