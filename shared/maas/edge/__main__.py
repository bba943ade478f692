"""``python -m maas.edge init DIR``: create the token table and token files in DIR (kept if
there). Compose's one-shot ``auth-init`` runs it on the shared auth volume."""

from __future__ import annotations

import argparse
from pathlib import Path

from maas.edge.auth import STACK_IDENTITIES, ensure_tokens


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m maas.edge", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True)
    init = actions.add_parser("init", help="create missing tokens (existing ones are kept)")
    init.add_argument("directory", type=Path)
    args = parser.parse_args()
    table = ensure_tokens(args.directory, STACK_IDENTITIES)
    names = ", ".join(f"{n} ({r.value})" for n, r in STACK_IDENTITIES.items())
    print(f"token table {table}; tokens for {names} in {args.directory}/<identity>.token")


if __name__ == "__main__":
    main()
