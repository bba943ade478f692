"""`maas models ...`: look at and manage what the model registry holds.

maas models list [NAME [--method M] [--parent NAME@V]]   models, or the versions of one model
maas models show NAME[@VERSION|@ALIAS]   one version: files, sha256, lineage, metrics
maas models alias NAME VERSION ALIAS     point ALIAS at VERSION (kept in the history)
maas models alias NAME ALIAS V=W V=W...  split ALIAS's traffic by weight (canary, A/B)
maas models unalias NAME ALIAS
maas models lineage NAME[@VERSION|@ALIAS]
maas models history NAME [--alias A] [--at TIME]   alias moves with who and why
maas models delete NAME VERSION
maas models policy set|clear|show ...    what happens to new versions (maas.cli_policy)
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

from maas.cli_import import add_import_action
from maas.cli_policy import add_policy_actions
from maas.command_line import (
    BARE_NAME,
    alias_name,
    command,
    local_time,
    model_name,
    model_ref,
)
from maas.config import Settings
from maas.errors import InvalidArgument, NotFound
from maas.events import printable
from maas.names import small_number, version_number
from maas.registry.types import ModelVersion

Action = Callable[[Any, argparse.Namespace], Coroutine[Any, Any, int]]


def _parse_time(text: str) -> int:
    """ISO 8601 (local time unless it has an offset) -> ms since the epoch."""
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        raise InvalidArgument(f"--at {text!r} is not a time; use e.g. 2026-11-24T15:00") from None


def _table(rows: Sequence[Sequence[object]]) -> None:
    # Printed as text, escaped: a reason holding an escape sequence could clear the screen.
    cells = [[printable(str(c), 500) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _describe(v: ModelVersion) -> dict[str, Any]:
    return {
        "name": v.name,
        "version": v.version,
        "aliases": list(v.aliases),
        "arch": v.arch,
        "format": v.format,
        "config": v.config,
        "parent": str(v.parent) if v.parent else None,
        "method": v.method,
        "job_id": v.job_id,
        "metrics": v.metrics,
        "created": local_time(v.created_ms),
        "created_by": v.created_by,
        "location": f"s3://{v.bucket}/{v.prefix}",
        "size_bytes": v.size_bytes,
        "files": {f.name: {"sha256": f.sha256, "size_bytes": f.size_bytes} for f in v.files},
        "manifest_sha256": v.manifest_sha256,
    }


# --- actions -------------------------------------------------------------------------------------


async def _list(client: Any, args: argparse.Namespace) -> int:
    if args.name is None and (args.method or args.parent):
        raise InvalidArgument("--method and --parent filter the versions of one model: give NAME")
    if args.name is None:
        models = await client.list_models()
        rows: list[list[object]] = [["NAME", "LATEST", "VERSIONS", "ALIASES", "UPDATED"]]
        rows += [
            [
                m.name,
                m.latest_version or "-",
                m.version_count,
                ", ".join(f"{a}={v}" for a, v in m.aliases.items()) or "-",
                local_time(m.updated_ms),
            ]
            for m in models
        ]
    else:
        versions = [v async for v in client.iter_versions(args.name)]
        rows = [["VERSION", "ALIASES", "ARCH", "FORMAT", "METHOD", "PARENT", "CREATED", "BY"]]
        rows += [
            [
                v.version,
                ", ".join(v.aliases) or "-",
                v.arch,
                v.format,
                v.method or "-",
                v.parent or "-",
                local_time(v.created_ms),
                v.created_by,
            ]
            for v in versions
            if _selected(v, args)
        ]
        if len(rows) == 1 and versions and (args.method or args.parent):
            raise NotFound(_nothing_selected(args, versions))
    _table(rows)
    return 0


def _nothing_selected(args: argparse.Namespace, versions: list[ModelVersion]) -> str:
    """Why the filters left no version, with what they could have been (a typo is likely)."""
    methods = sorted({v.method for v in versions if v.method})
    parents = sorted({str(v.parent) for v in versions if v.parent})
    said = " and ".join(
        f"{flag} {printable(value)}"
        for flag, value in (("--method", args.method), ("--parent", args.parent))
        if value
    )
    return (
        f"no version of {args.name} has {said}; its methods: {', '.join(methods) or 'none'}; "
        f"its parents: {', '.join(parents) or 'none'}"
    )


def _selected(version: ModelVersion, args: argparse.Namespace) -> bool:
    """``--method`` and ``--parent`` filters: find the variants made from one version."""
    if args.method and version.method != args.method:
        return False
    return not args.parent or str(version.parent) == args.parent


async def _show(client: Any, args: argparse.Namespace) -> int:
    described = _describe(await client.get(args.ref))
    try:
        policy = await client.get_policy(args.ref.name)
        described["policy"] = {"version": policy.version, **policy.document}
    except NotFound:
        described["policy"] = None
    print(json.dumps(described, indent=2))
    return 0


async def _alias(client: Any, args: argparse.Namespace) -> int:
    alias, version, targets = _alias_args(args.target)
    if targets:
        change = await client.set_split(args.name, alias, targets, reason=args.reason)
    else:
        change = await client.set_alias(args.name, alias, version, reason=args.reason)
    before = f" (was {change.from_version})" if change.from_version else ""
    print(f"{change.name}@{change.alias} -> {_split(change)}{before}")
    return 0


def _alias_args(words: Sequence[str]) -> tuple[str, int, list[tuple[int, int]]]:
    """``VERSION ALIAS`` or ``ALIAS VERSION=WEIGHT...`` -> (alias, version, targets)."""
    moved_to = version_number(words[0]) if len(words) == 2 else None
    if moved_to is not None:
        return words[1], moved_to, []
    alias, *pairs = words
    targets = []
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        number, share = small_number(version), small_number(weight)
        if not sep or number is None or share is None:
            raise InvalidArgument(
                f"{pair[:80]!r} is not VERSION=WEIGHT; use e.g. maas models alias NAME {alias} "
                "4=90 5=10"
            )
        targets.append((number, share))
    if not targets:
        raise InvalidArgument("give VERSION ALIAS, or ALIAS VERSION=WEIGHT... for a split")
    return alias, 0, targets


def _split(change: Any) -> str:
    """Where a move sent the alias: a version, or its weighted targets."""
    if change.targets:
        return ", ".join(f"{v}={w}" for v, w in change.targets)
    return str(change.to_version or "(deleted)")


async def _unalias(client: Any, args: argparse.Namespace) -> int:
    change = await client.delete_alias(args.name, args.alias)
    print(f"{change.name}@{change.alias} deleted (was {change.from_version})")
    return 0


async def _lineage(client: Any, args: argparse.Namespace) -> int:
    lineage = await client.lineage(args.ref)
    rows: list[list[object]] = [["", "VERSION", "METHOD", "JOB", "CREATED"]]
    for depth, node in enumerate(lineage.ancestors):
        label = "self" if depth == 0 else "parent" if depth == 1 else f"ancestor {depth}"
        gone = " (deleted)" if node.deleted else ""
        rows.append(
            [
                label,
                f"{node.name}@{node.version}{gone}",
                node.method or "-",
                node.job_id or "-",
                local_time(node.created_ms),
            ]
        )
    rows += [
        [
            "child",
            f"{n.name}@{n.version}",
            n.method or "-",
            n.job_id or "-",
            local_time(n.created_ms),
        ]
        for n in lineage.children
    ]
    _table(rows)
    return 0


async def _history(client: Any, args: argparse.Namespace) -> int:
    changes = await client.alias_history(args.name, args.alias)
    if args.alias and not changes:
        known = sorted({c.alias for c in await client.alias_history(args.name, None)})
        raise NotFound(
            f"{args.name} has never had an alias {printable(args.alias)}; the aliases it has "
            f"had: {', '.join(known) or 'none'}"
        )
    if args.at is not None:
        at_ms = _parse_time(args.at)
        # Where each alias pointed at that moment: its last move at or before it.
        pointed: dict[str, int | None] = {}
        for change in changes:
            if change.ts_ms <= at_ms:
                pointed[change.alias] = change.to_version
        rows: list[list[object]] = [["ALIAS", f"AT {local_time(at_ms)}"]]
        rows += [[a, v if v is not None else "(unset)"] for a, v in sorted(pointed.items())]
    else:
        rows = [["WHEN", "ALIAS", "FROM", "TO", "BY", "REASON"]]
        rows += [
            [
                local_time(c.ts_ms),
                c.alias,
                c.from_version or "-",
                _split(c),
                c.actor,
                c.reason or "-",
            ]
            for c in changes
        ]
    _table(rows)
    return 0


async def _delete(client: Any, args: argparse.Namespace) -> int:
    version = await client.delete_version(args.name, args.version)
    print(f"deleted {version.name}@{version.version}")
    return 0


def _runner(action: Action) -> Callable[[argparse.Namespace, Settings], int]:
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from maas.registry.client import RegistryClient

        async def main() -> int:
            async with RegistryClient(settings) as client:
                return await action(client, args)

        return asyncio.run(main())

    return run


# --- parser --------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    models = command(
        subparsers,
        "models",
        help="list, inspect and alias registered models",
        description="Talk to the model registry at MAAS_REGISTRY_ADDR.",
        example="maas models show digits-mlp@production",
    )
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    add_import_action(actions)  # maas models import (maas.cli_import)

    def action(name: str, fn: Action, help: str, example: str) -> argparse.ArgumentParser:
        p = command(actions, name, help=help, example=example)
        p.set_defaults(func=_runner(fn))
        return p

    ref_help = f"NAME@VERSION, NAME@ALIAS or NAME ({BARE_NAME})"
    p = action(
        "list",
        _list,
        "list models, or the versions of one model",
        "maas models list digits-mlp --parent digits-mlp@1 --method quantize",
    )
    p.add_argument("name", nargs="?", type=model_name, help="a model name: list its versions")
    p.add_argument("--method", help="only versions made by this method (train, quantize, ...)")
    p.add_argument("--parent", metavar="NAME@VERSION", help="only versions made from this one")
    p = action("show", _show, "show one version as JSON", "maas models show digits-mlp@production")
    p.add_argument("ref", type=model_ref, help=ref_help)
    p = action(
        "alias",
        _alias,
        "point an alias at a version, or split it by weight",
        "maas models alias digits-mlp 3 production\n"
        "  maas models alias digits-mlp production 4=90 5=10",
    )
    p.add_argument("name", type=model_name)
    p.add_argument(
        "target", nargs="+", metavar="VERSION ALIAS | ALIAS VERSION=WEIGHT", help="where it points"
    )
    p.add_argument("--reason", default="", help="why it moves, kept in the alias history")
    p = action("unalias", _unalias, "delete an alias", "maas models unalias digits-mlp staging")
    p.add_argument("name", type=model_name)
    p.add_argument("alias", type=alias_name)
    p = action(
        "lineage",
        _lineage,
        "parents up to the root, and children",
        "maas models lineage digits-mlp-int8@1",
    )
    p.add_argument("ref", type=model_ref, help=ref_help)
    p = action(
        "history",
        _history,
        "every alias move, or where aliases pointed at a time",
        "maas models history digits-mlp --alias production --at 2026-11-24T15:00",
    )
    p.add_argument("name", type=model_name)
    p.add_argument("--alias", type=alias_name, help="only this alias")
    p.add_argument("--at", help="ISO time: show where each alias pointed then")
    p = action(
        "delete",
        _delete,
        "delete a version (refused while an alias points at it)",
        "maas models delete digits-mlp 2",
    )
    p.add_argument("name", type=model_name)
    p.add_argument("version", type=int)
    add_policy_actions(actions, _runner)  # maas models policy (maas.cli_policy)
