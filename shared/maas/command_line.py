"""How every `maas` command and action is declared: its help, description and examples."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime


def command(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    example: str | Sequence[str],
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add ``name`` with its one-line ``help`` (also the description unless one is given) and
    the example command lines `--help` ends with."""
    examples = [example] if isinstance(example, str) else list(example)
    label = "example" if len(examples) == 1 else "examples"
    return subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=f"{label}:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def local_time(ms: int | None) -> str:
    """Milliseconds since the epoch as local ISO 8601 to the second; "-" for none."""
    return "-" if not ms else datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds")
