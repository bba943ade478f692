"""The end-to-end demo behind `maas demo` (see maas.cli_demo for what it does).

Kept apart from the command so that building the CLI parser imports none of this.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from maas import jobs
from maas.cli_jobs import console, follow
from maas.config import Settings
from maas.datasets import load_builtin
from maas.demo_report import Row, infer, p50_ms, print_table
from maas.edge import call_metadata
from maas.errors import FailedPrecondition
from maas.policy import ACTOR, policy_job_id
from maas.registry import RegistryClient
from maas.registry.types import DEFAULT_ALIAS, AliasChange, ModelVersion, PolicyVersion

# shared/maas/examples links to the repository's examples/ (a wheel holds a copy)
EXAMPLES = Path(__file__).resolve().parent / "examples" / "jobs"
POLICIES = EXAMPLES.parent / "policies"
PROMOTION_POLL_S = 0.5


class Demo:
    def __init__(self, settings: Settings, timeout_s: float) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.run_id = uuid.uuid4().hex[:6]
        self.training: list[jobs.JobSummary] = []  # train/finetune jobs, for the curves

    async def submit(self, file: str, **changes: Any) -> jobs.JobSummary:
        doc = jobs.load_job_file(EXAMPLES / file)
        doc.update(changes)
        job = jobs.prepare_job(doc, f"demo-{self.run_id}-{Path(file).stem}")
        jobs.check_job(job, self.settings)
        await jobs.publish_job(self.settings, job)
        console().rule(f"[bold]{job['type']}[/bold] {job['job_id']}")
        summary = await follow(self.settings, job["job_id"], self.timeout_s)
        if summary.state != "succeeded":
            raise FailedPrecondition(f"demo job {job['job_id']} ended {summary.state}")
        if job["type"] != "compress":
            self.training.append(summary)
        return summary

    async def run(self) -> None:
        policy = await self.set_policy("digits-mlp", "digits-mlp.yaml")
        trained = await self.submit("train-digits-mlp.yaml")
        assert trained.model is not None
        parent_ref = f"{trained.model['name']}@{trained.model['version']}"
        # No compress or promote step here: the compressor reacts to the registered version.
        console().print(f"policy v{policy.version}: the compressor runs its plan on {parent_ref}")
        plan_id = policy_job_id(trained.model["name"], trained.model["version"])
        compressed = await follow(self.settings, plan_id, self.timeout_s)
        if compressed.state != "succeeded":
            raise FailedPrecondition(f"the policy's plan for {parent_ref} ended {compressed.state}")
        async with RegistryClient(self.settings) as registry:
            parent = await registry.get(parent_ref)
            # The plan's final status names every variant it registered.
            variants = [
                await registry.get(f"{m['name']}@{m['version']}") for m in compressed.models
            ]
            move = await self.promotion(registry, parent)
            best = await registry.get(f"{parent.name}@{move.to_version}")
        console().print(
            f"{parent.name}@{move.alias} -> [bold]{best.version}[/bold] by {move.actor}: "
            f"{move.reason}"
        )
        rows = [Row(v) for v in sorted([parent, *variants], key=lambda v: v.version)]
        await asyncio.to_thread(self.query_and_time, rows)
        await self.submit("train-digits-0-4.yaml")
        await self.submit("finetune-digits-5-9.yaml")
        print_table(rows, best)
        plot = plot_curves(self.training, self.settings.state_path / "demo")
        console().print(f"training curves: {plot}")
        from maas.demo_text import text_chapter  # its own module; it uses this one's helpers

        await text_chapter(self)
        await self.stream_from_gpt()

    async def set_policy(self, name: str, file: str) -> PolicyVersion:
        document = yaml.safe_load((POLICIES / file).read_text())
        async with RegistryClient(self.settings) as registry:
            stored = await registry.set_policy(name, document)
        console().rule(f"[bold]policy[/bold] {name} v{stored.version} (examples/policies/{file})")
        return stored

    async def promotion(self, registry: RegistryClient, parent: ModelVersion) -> AliasChange:
        """The promoter's move made for ``parent``'s plan (it follows the plan's last status)."""
        alias = DEFAULT_ALIAS
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while asyncio.get_running_loop().time() < deadline:
            for change in reversed(await registry.alias_history(parent.name, alias)):
                if change.ts_ms >= parent.created_ms and change.reason.startswith(ACTOR):
                    return change
            await asyncio.sleep(PROMOTION_POLL_S)
        raise FailedPrecondition(f"no promotion of {parent.name}@{alias} within the timeout")

    async def stream_from_gpt(self) -> None:
        """Train the small GPT as a platform job, then stream a completion token by token."""
        from maas.text.stream import stream_completion

        gpt = await self.submit("train-gpt.yaml")
        if gpt.model is None:
            raise FailedPrecondition("the GPT job succeeded without registering a model")
        name, version = gpt.model["name"], str(gpt.model["version"])
        console().rule(f"streamed completion from {name}@{version} (OIP ModelStreamInfer)")
        prompt = "def "
        console().print(prompt, end="")
        await asyncio.to_thread(stream_completion, self.settings, name, prompt, version=version)
        console().print()

    def query_and_time(self, rows: list[Row]) -> None:
        """One prediction through alias production, then p50 latency of every variant."""
        import tritonclient.grpc as triton

        digits = load_builtin("digits")
        row = digits.x_test[:1].astype(np.float32)
        client = triton.InferenceServerClient(
            self.settings.inference_addr,
            ssl=self.settings.grpc_tls,
            root_certificates=self.settings.tls_ca_file or None,
        )
        headers = dict(call_metadata(self.settings))
        try:
            name = rows[0].version.name
            answer = infer(triton, client, headers, name, "", row)
            console().print(
                f"gRPC ModelInfer {name} (alias production): predicted {int(answer.argmax())}, "
                f"label {int(digits.y_test[0])}"
            )
            for r in rows:
                r.p50_ms = p50_ms(triton, client, headers, name, str(r.version.version), row)
        finally:
            client.close()


def plot_curves(summaries: list[jobs.JobSummary], out_dir: Path) -> Path:
    """Loss and accuracy per step for every training job of the demo, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for summary in summaries:
        points = [
            (e["step"], e["metrics"])
            for e in summary.history
            if e.get("metrics") and "step" in e and e["state"] in ("running", "checkpointed")
        ]
        if not points:
            continue
        steps = [s for s, _ in points]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            values = [m.get(key) for _, m in points]
            if any(v is not None for v in values):
                ax.plot(steps, [np.nan if v is None else v for v in values], label=summary.job_id)
    for ax, title in ((loss_ax, "training loss"), (acc_ax, "accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    path = out_dir / "training-curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
