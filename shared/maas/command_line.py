"""How every `maas` command and action is declared: its help, description and examples; and
the argument types that check what the registry's names look like before anything is sent."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

from maas.errors import InvalidArgument
from maas.names import check_alias, check_name
from maas.registry.types import ModelRef

Parsed = TypeVar("Parsed")


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


def _argument(check: Callable[[str], Parsed]) -> Callable[[str], Parsed]:
    """``check`` as an argparse type: its refusal becomes argparse's usage error, naming the
    argument (and a name that is not text, e.g. undecodable bytes, is refused here, before it
    reaches a request it could not be encoded into)."""

    def parse(text: str) -> Parsed:
        try:
            return check(text)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    parse.__name__ = check.__name__  # argparse names the type in some of its messages
    return parse


model_ref = _argument(ModelRef.parse)  # NAME, NAME@VERSION or NAME@ALIAS
# What a bare model NAME resolves to, in every command's help (maas.registry's rule).
BARE_NAME = "its production alias, else its newest train, finetune or import version"
model_name = _argument(check_name)
alias_name = _argument(check_alias)
