"""Regenerate every generated gRPC module from ``schemas/proto`` in one reproducible step.

    python -m maas.protogen           # rewrite the generated files
    python -m maas.protogen --check   # exit 1 (naming the files) when the committed code is stale

Each ``Target`` is one .proto (path relative to ``schemas/proto``, which is the only include
root) and the package directory its ``_pb2``/``_pb2_grpc``/``.pyi`` go to. protoc names imports
after the proto's directory; a target whose directory is not its Python package (the OIP proto
lives in ``inference/`` but is imported as ``maas.oip``) lists ``(from, to)`` module rewrites.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "schemas" / "proto"
GENERATED_INIT = b"# Generated package: `python -m maas.protogen` writes the modules here.\n"


@dataclass(frozen=True)
class Target:
    proto: str  # relative to schemas/proto
    out_dir: str  # relative to the repository root
    rewrite_imports: tuple[tuple[str, str], ...] = ()  # (protoc's module, our package)
    # Register the messages in a descriptor pool of their own instead of protobuf's default one:
    # tritonclient registers the same `inference.*` names, and two files defining one name in
    # the default pool make the second import fail.
    private_pool: bool = False


TARGETS: tuple[Target, ...] = (
    Target("maas/registry/v1/registry.proto", "shared/maas/registry/v1"),
    Target("maas/training/v1/training.proto", "shared/maas/training/v1"),
    Target(
        "inference/grpc_predict_v2.proto",
        "shared/maas/oip",
        (("inference", "maas.oip"),),
        private_pool=True,
    ),
)


def _rewrite(text: str, target: Target) -> str:
    for old, new in target.rewrite_imports:
        text = re.sub(
            rf"^(\s*)from {re.escape(old)} import ",
            rf"\1from {new} import ",
            text,
            flags=re.MULTILINE,
        )
    if target.private_pool:
        text = text.replace(
            "_descriptor_pool.Default().AddSerializedFile(",
            "_descriptor_pool.DescriptorPool().AddSerializedFile(",
        )
    return text


def generate(target: Target) -> dict[Path, bytes]:
    """{repository path: contents} protoc produces for ``target`` (nothing is written)."""
    include = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(PROTO_ROOT / target.proto),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {target.proto} (exit {code})")
        produced = Path(tmp) / Path(target.proto).parent
        out = ROOT / target.out_dir
        return {
            out / path.name: _rewrite(path.read_text(), target).encode()
            for path in sorted(produced.iterdir())
            if path.is_file()
        }


def expected_files() -> dict[Path, bytes]:
    files: dict[Path, bytes] = {}
    for target in TARGETS:
        files.update(generate(target))
        files[ROOT / target.out_dir / "__init__.py"] = GENERATED_INIT
    return files


def _package_inits(out_dir: Path) -> list[Path]:
    """__init__.py of every package between shared/ and ``out_dir`` (hand-written ones kept)."""
    shared = ROOT / "shared"
    parents = [p for p in out_dir.parents if shared in p.parents]
    return [p / "__init__.py" for p in parents]


def stale() -> list[Path]:
    """Generated files that are missing or differ from what protoc produces now."""
    problems = [
        path
        for path, data in expected_files().items()
        if not path.exists() or path.read_bytes() != data
    ]
    for target in TARGETS:
        problems += [p for p in _package_inits(ROOT / target.out_dir) if not p.exists()]
    return problems


def write() -> list[Path]:
    written = []
    for path, data in expected_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            written.append(path)
    for target in TARGETS:
        for init in _package_inits(ROOT / target.out_dir):
            if not init.exists():
                init.write_bytes(b"")
                written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maas.protogen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any generated file is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for path in problems:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        if problems:
            print("run `python -m maas.protogen` and commit the result", file=sys.stderr)
        return 1 if problems else 0
    for path in write():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
