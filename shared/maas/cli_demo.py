"""`maas demo`: the whole platform end to end on the running local stack.

1. set the digits MLP's policy (examples/policies/digits-mlp.yaml), then train it with 2 workers
   x 2 aggregator shards (sync) and register it;
2. the compressor reacts to the registered version by compressing it (int8, 80% pruning,
   pruning+int8, a distilled student), one version each — no compress command;
3. its promoter moves alias `production` to the smallest variant within 1 point of the parent's
   accuracy, the reason in the alias history — no promote command;
4. query it over gRPC with tritonclient (the Open Inference Protocol, unmodified peer client);
5. transfer learning: a digits 0-4 base, fine-tuned on a tenth of digits 5-9;
6. print a table per variant (accuracy, size, p50 gRPC latency, lineage) and save a PNG of the
   training curves under the state dir;
7. text: import all-MiniLM-L6-v2 from its package, fine-tune it on builtin:stdlib-docs, compress
   it (int8, head/FFN pruning, a 3-layer student), serve the int8 variant and classify one
   docstring sent as a BYTES string over gRPC;
8. train a small GPT on the standard library's sources and stream a completion from it.

Job definitions are the files in examples/jobs, so what the demo runs is what users copy.
"""

from __future__ import annotations

import argparse
import asyncio

from maas.command_line import command
from maas.config import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = command(
        subparsers,
        "demo",
        help="train, register, compress, promote, serve and fine-tune, end to end",
        description=__doc__,
        example="maas stack up && maas demo",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="longest each job may take (default 900)"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from maas.demo import Demo

    asyncio.run(Demo(settings, args.timeout_s).run())
    return 0
