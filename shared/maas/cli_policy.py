"""`maas models policy ...`: a model's policy in the registry (``maas.policy``).

maas models policy set NAME FILE.yaml    what happens to new versions
maas models policy clear NAME            stop it: no plan or promotion from now on
maas models policy show NAME [--version N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import yaml

from maas.command_line import command, local_time, model_name
from maas.config import Settings
from maas.errors import InvalidArgument, NotFound
from maas.names import small_number
from maas.policy import parse_policy
from maas.registry.types import ModelRef
from maas.textfile import parse_yaml, read_text_file

Action = Callable[[Any, argparse.Namespace], Coroutine[Any, Any, int]]
Runner = Callable[[argparse.Namespace, Settings], int]


async def _policy_set(client: Any, args: argparse.Namespace) -> int:
    document = _policy_file(args.file)
    if parse_policy(document).cleared:
        raise InvalidArgument(
            f"{args.file} sets nothing (a policy needs on_registered, promote, or both); to stop "
            f"{args.name}'s policy, run: maas models policy clear {args.name}"
        )
    stored = await client.set_policy(args.name, document)
    print(f"{stored.name}: policy version {stored.version} set")
    await _note_if_unregistered(client, args.name)
    return 0


async def _note_if_unregistered(client: Any, name: str) -> None:
    try:
        await client.get(ModelRef(name))
    except NotFound:  # allowed (a policy may come first), but a misspelt name looks the same
        print(
            f"note: no model {name!r} is registered yet; the policy applies to its first "
            "version (maas models list shows the names there are)",
            file=sys.stderr,
        )


async def _policy_clear(client: Any, args: argparse.Namespace) -> int:
    stored = await client.set_policy(args.name, {})
    print(
        f"{stored.name}: policy version {stored.version} set: none (no plan or promotion from "
        "now on, pending ones included)"
    )
    await _note_if_unregistered(client, args.name)
    return 0


async def _policy_show(client: Any, args: argparse.Namespace) -> int:
    policy = await client.get_policy(args.name, args.version)
    print(
        f"# {policy.name} policy version {policy.version}, set by {policy.actor} "
        f"at {local_time(policy.created_ms)}"
    )
    if parse_policy(policy.document).cleared:
        print("# none: cleared (no plan or promotion while it is the current policy)")
    print(yaml.safe_dump(policy.document, sort_keys=False).rstrip())
    return 0


def _policy_version(text: str) -> int:
    version = small_number(text)
    if version is None or not 0 < version < 2**63:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: a policy version is 1, 2, ...")
    return version


def _policy_file(path: str) -> Any:
    return parse_yaml(read_text_file(path, "policy file"), path, "policy")


def add_policy_actions(
    actions: argparse._SubParsersAction, runner: Callable[[Action], Runner]
) -> None:
    """`maas models policy ACTION`, each action run by ``runner`` with a registry client."""
    policy = command(
        actions,
        "policy",
        help="set or show a model's policy (compress new versions, promote by a rule)",
        description="A model's policy, versioned in the registry: on_registered.compress runs "
        "a compress plan on every new train/finetune/import version, promote moves an alias "
        "by a rule (smallest_within, best_accuracy, lowest_p50).",
        example="maas models policy set digits-mlp examples/policies/digits-mlp.yaml",
    )
    verbs = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    p = command(
        verbs,
        "set",
        help="store FILE.yaml as the model's next policy version",
        example="maas models policy set digits-mlp examples/policies/digits-mlp.yaml",
    )
    p.set_defaults(func=runner(_policy_set))
    p.add_argument("name", type=model_name, help="the model the policy is for")
    p.add_argument("file", help="a YAML policy document")
    p = command(
        verbs,
        "clear",
        help="stop the policy: no plan or promotion from now on, pending ones included",
        example="maas models policy clear digits-mlp",
    )
    p.set_defaults(func=runner(_policy_clear))
    p.add_argument("name", type=model_name, help="the model whose policy to clear")
    p = command(
        verbs,
        "show",
        help="print the current (or an earlier) policy",
        example="maas models policy show digits-mlp --version 2",
    )
    p.set_defaults(func=runner(_policy_show))
    p.add_argument("name", type=model_name, help="the model whose policy to print")
    p.add_argument("--version", type=_policy_version, help="an earlier policy version (1, 2, ...)")
