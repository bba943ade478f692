"""The `maas` command line.

Command groups register themselves: every module `maas.cli_<group>` (shared/maas/cli_*.py) that
defines `register(subparsers)` is picked up, so adding `maas models ...` means adding
shared/maas/cli_models.py, with no edit here:

    def register(subparsers: argparse._SubParsersAction) -> None:
        p = subparsers.addcommand("models", help="...", description="...", epilog="example: ...")
        p.set_defaults(func=run)          # run(args, settings) -> int exit code

Built in here: `maas stack up|down|status`, `maas config`, `maas smoke`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import maas
from maas.command_line import command
from maas.config import Settings, env_doc
from maas.errors import MaasError
from maas.events import printable
from maas.names import small_number

if TYPE_CHECKING:
    from infra.stack import ComponentStatus

Handler = Callable[[argparse.Namespace, Settings], int]


# --- stack ------------------------------------------------------------------------------------


def _stack(settings: Settings, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from infra.stack import LocalStack

    scale = dict(getattr(args, "scale", None) or [])
    return LocalStack.from_settings(settings, with_services=not args.infra_only, scale=scale)


def _scale_arg(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    replicas = small_number(count)
    if not sep or replicas is None:
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: use NAME=COUNT, e.g. gradient-worker=4")
    return name, replicas


def _print_status(rows: Sequence[ComponentStatus]) -> None:
    table = [("COMPONENT", "PID", "HEALTH", "ADDRESS", "PORTS")]
    for row in rows:
        # Alive but not answering its health check: starting, or hung; the log tells which.
        health = "healthy" if row.healthy else ("not ready" if row.alive else "down")
        if row.why_degraded:
            health = "degraded"  # serving what it can; Kafka or S3 does not answer it
        table.append(
            (
                row.name,
                str(row.pid or "-"),
                health,
                f"{row.host}:{row.port}",
                " ".join(f"{var}={port}" for var, port in sorted(row.ports.items())),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for row in rows:
        if row.why_down:
            print(f"{row.name} is down: {row.why_down}")
        elif row.why_not_ready:
            print(f"{row.name} is not ready: {row.why_not_ready}")
        elif row.why_degraded:
            print(f"{row.name} is degraded: {row.why_degraded}")


def _stack_up(args: argparse.Namespace, settings: Settings) -> int:
    from infra.s3 import public_default_keys

    stack = _stack(settings, args)
    rows = stack.up(bootstrap=not args.no_bootstrap, timeout_s=args.timeout_s)
    _print_status(rows)
    exposed = public_default_keys(settings)
    if exposed:
        print(f"warning: {exposed}", file=sys.stderr)
    print(f"state: {settings.state_dir}   logs: {stack.stack_dir}")
    return 0


def _stack_down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = _stack(settings, args).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _stack_status(args: argparse.Namespace, settings: Settings) -> int:
    stack = _stack(settings, args)
    rows = stack.status()
    _print_status(rows)
    mismatch = stack.tls_mismatch()
    if mismatch is not None:
        print(f"not ready from here: {mismatch}")
    return 0 if all(r.healthy for r in rows) else 3


def _register_stack(subparsers: argparse._SubParsersAction) -> None:
    stack = command(
        subparsers,
        "stack",
        help="run Kafka, the S3 server and the five services natively",
        example="maas stack up && maas stack status && maas stack down",
        description="Start, stop and inspect the local stack: the Kafka broker, the S3 server "
        "and every `python -m services.*` service of docker-compose.yml (its environment and "
        "replicas). State (data, PIDs, logs) lives in MAAS_STATE_DIR; ports come from "
        "MAAS_KAFKA_BOOTSTRAP, MAAS_S3_ENDPOINT and the services' MAAS_*_LISTEN settings.",
    )
    stack.add_argument(
        "--infra-only",
        action="store_true",
        help="only the Kafka broker and the S3 server (what the test fixtures run)",
    )
    actions = stack.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    up = command(
        actions,
        "up",
        help="start what is not running, then create topics and buckets",
        example="MAAS_STATE_DIR=/tmp/maas-demo maas stack up",
    )
    up.add_argument("--no-bootstrap", action="store_true", help="skip creating topics and buckets")
    up.add_argument(
        "--scale",
        type=_scale_arg,
        action="append",
        metavar="NAME=COUNT",
        help="run COUNT replicas of a compose service instead of its deploy.replicas, e.g. "
        "gradient-worker=4 (remembered until `stack down`; repeatable)",
    )
    up.add_argument(
        "--timeout-s",
        type=float,
        default=120.0,
        help="how long to wait for each component (default 120)",
    )
    up.set_defaults(func=_stack_up)
    down = command(
        actions, "down", help="stop every component (data is kept)", example="maas stack down"
    )
    down.set_defaults(func=_stack_down)
    status = command(
        actions,
        "status",
        help="show component, pid, health, address (exit 3 unless every one is healthy)",
        example="maas stack status",
    )
    status.set_defaults(func=_stack_status)


# --- config, smoke ----------------------------------------------------------------------------


def _config(args: argparse.Namespace, settings: Settings) -> int:
    current = settings.describe()
    width = max(len(name) for name in current)
    if args.markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        home = str(Path.home())
        for name, default, doc in env_doc():
            # As a reader's shell spells it: the state and cache dirs are under their home.
            shown = "~" + default[len(home) :] if default.startswith(home + "/") else default
            print(f"| `{name}` | `{shown}` | {doc} |")
    elif args.doc:
        for name, default, doc in env_doc():
            print(f"{name.ljust(width)}  {current[name]!s:<28}  {doc} (default {default})")
    else:
        for name, value in current.items():
            print(f"{name.ljust(width)}  {value}")
    return 0


def _smoke(args: argparse.Namespace, settings: Settings) -> int:
    from infra.smoke import run

    for line in run(settings):
        print(line)
    return 0


def _register_builtin(subparsers: argparse._SubParsersAction) -> None:
    _register_stack(subparsers)
    config = command(
        subparsers,
        "config",
        help="print the effective settings (secrets masked)",
        example="MAAS_KAFKA_BOOTSTRAP=kafka:9092 maas config --doc",
    )
    config.add_argument("--doc", action="store_true", help="add each setting's meaning")
    config.add_argument(
        "--markdown", action="store_true", help="print the env table of docs/OPERATIONS.md"
    )
    config.set_defaults(func=_config)
    smoke = command(
        subparsers,
        "smoke",
        help="round trip one Kafka record and one S3 object (multipart)",
        example="maas stack up && maas smoke",
    )
    smoke.set_defaults(func=_smoke)


# --- assembly ---------------------------------------------------------------------------------


def _plugin_modules() -> list[str]:
    return sorted(
        f"maas.{m.name}" for m in pkgutil.iter_modules(maas.__path__) if m.name.startswith("cli_")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maas",
        description="Model-as-a-Service: train, version, compress and serve models. "
        "Settings come from MAAS_* environment variables (see `maas config --doc`).",
        epilog="example:\n  maas stack up && maas smoke && maas stack down",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_builtin(subparsers)
    for name in _plugin_modules():
        try:
            module = importlib.import_module(name)
            if hasattr(module, "register"):  # cli_import adds to `models`, it is no group
                module.register(subparsers)
        except Exception as exc:  # one broken group must not take `maas stack` down with it
            print(f"maas: skipping command module {name}: {exc}", file=sys.stderr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The CLI says what failed itself (Unavailable naming the address and what to check); the
    # Kafka client's own connection errors, printed bare before that, only repeat it.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        settings = Settings.from_env()
        handler: Handler = args.func
        return handler(args, settings)
    except MaasError as exc:
        # Messages echo what was typed or received: as text, never as terminal control codes.
        message = printable(exc.message, limit=20_000, keep="\n")
        print(f"maas: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (`maas models list | head`): stop quietly
        with contextlib.suppress(OSError, ValueError):  # stdout may have no descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # 128 + SIGPIPE, as a shell reports a process the pipe ended


if __name__ == "__main__":
    sys.exit(main())
