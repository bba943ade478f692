"""`maas jobs submit | watch | cancel | list`: publish job events and follow their progress."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from functools import cache
from typing import TYPE_CHECKING

from maas.command_line import command
from maas.config import Settings
from maas.names import small_number

if TYPE_CHECKING:  # imported when a command runs, so `maas --help` stays fast
    from rich.console import Console

    from maas import jobs


@cache
def console() -> Console:
    """The console for job output: wide enough for tables in a file or CI log too."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 140)


def register(subparsers: argparse._SubParsersAction) -> None:
    group = command(
        subparsers,
        "jobs",
        help="submit training/finetune/compress jobs and follow them",
        description="Jobs are events on maas.jobs.v1; their progress is on maas.job-status.v1.",
        example="maas jobs submit examples/jobs/train-digits-mlp.yaml --watch",
    )
    actions = group.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    submit = command(
        actions,
        "submit",
        help="check a job file and publish it; prints the job id",
        description="Checks FILE (YAML or JSON) against the job schema and the model zoo "
        "before publishing, so a mistake is reported here with the field that is wrong.",
        example="maas jobs submit examples/jobs/train-digits-mlp.yaml --watch",
    )
    submit.add_argument("file", help="job file (.yaml, .yml or .json)")
    submit.add_argument("--job-id", help="idempotency key (default: the file's, or a new one)")
    submit.add_argument(
        "--dry-run",
        action="store_true",
        help="check only, publish nothing: the file, and that its dataset and base model exist "
        "(a builtin dataset's rows fit the model)",
    )
    submit.add_argument("--watch", action="store_true", help="follow the job until it ends")
    submit.add_argument(
        "--timeout-s",
        type=_seconds,
        default=None,
        help="with --watch: stop watching after this long (the job goes on)",
    )
    submit.set_defaults(func=_submit)

    watch = command(
        actions,
        "watch",
        help="follow a job: progress bar with loss, accuracy and samples/s",
        description="Shows step/total, loss, accuracy and samples/s live, and ends with the "
        "registered model or the error. Exit code 0 only if the job succeeded.",
        example="maas jobs watch train-3f2a9c01de",
    )
    watch.add_argument("job_id")
    watch.add_argument("--timeout-s", type=_seconds, default=None, help="give up after this long")
    watch.set_defaults(func=_watch)

    cancel = command(
        actions,
        "cancel",
        help="stop a queued or running job",
        description="Publishes a cancel event for JOB_ID and its status becomes cancelled. A "
        "train/finetune job ends at the coordinator's next poll (one already finishing ends as "
        "it would have); a compress job ends before its next variant is registered, keeping the "
        "variants registered so far (the one being built is dropped, its training stopped at "
        "its next step). Exit code 0 once the job "
        "is cancelled, 1 if it ended otherwise or no service knows the job.",
        example="maas jobs cancel train-3f2a9c01de",
    )
    cancel.add_argument("job_id")
    cancel.add_argument("--no-wait", action="store_true", help="publish only, do not follow")
    cancel.add_argument("--timeout-s", type=_seconds, default=60.0, help="give up after this long")
    cancel.set_defaults(func=_cancel)

    listing = command(
        actions,
        "list",
        help="the jobs the status topic knows, with their latest state",
        description="Reads maas.job-status.v1 from the beginning (no consumer group); the most "
        "recently updated job is listed last.",
        example=["maas jobs list", "maas jobs list --state running --state queued --last 20"],
    )
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        metavar="STATE",
        help="only jobs in this state (queued, accepted, running, checkpointed, succeeded, "
        "failed, cancelled; repeat for several)",
    )
    listing.add_argument(
        "--last", type=_count, metavar="N", help="only the N most recently updated jobs"
    )
    listing.set_defaults(func=_list)


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from maas import jobs

    doc = jobs.load_job_file(args.file)
    job = jobs.check_job(jobs.prepare_job(doc, args.job_id), settings)
    if args.dry_run:
        from maas.job_preflight import preflight

        asyncio.run(preflight(job, settings))
        console().print(f"[green]ok[/green] {args.file}: a valid {job['type']} job")
        return 0
    if args.job_id or doc.get("job_id"):  # an id someone chose may be taken already
        known = asyncio.run(jobs.summary_of(settings, job["job_id"]))
        jobs.check_id_free(job, known)
        if known.done:  # the same job, over: a job id runs once, and watching shows that run
            console().print(
                f"job {job['job_id']} already ran: {_describe(known)}; a job id runs once "
                "(submit under a new --job-id to run it again)"
            )
            return _exit_code(known)
    asyncio.run(jobs.publish_job(settings, job))
    print(job["job_id"])
    if args.watch:
        try:
            return _exit_code(asyncio.run(follow(settings, job["job_id"], args.timeout_s)))
        except KeyboardInterrupt:
            print(f"stopped watching; the job goes on: maas jobs watch {job['job_id']}")
            raise
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds > 0")
    return value


def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    from maas import events, jobs

    event = jobs.check_job(
        events.new_event(events.JOB, job_id=args.job_id, type=jobs.CANCEL), settings
    )
    known = asyncio.run(jobs.summary_of(settings, args.job_id))
    if known.done:
        console().print(
            f"job {_job_markup(args.job_id)} already ended: {_describe(known)}; there is nothing "
            "to cancel"
        )
        return 0 if known.state == "cancelled" else 1
    asyncio.run(jobs.publish_job(settings, event))
    if args.no_wait:
        return 0
    if known.state == "unknown":
        console().print(
            f"[yellow]no service has reported on job {_job_markup(args.job_id)}[/yellow] (`maas "
            "jobs list` shows the known jobs): the cancel is sent, but there is nothing to wait for"
        )
        return 1  # nothing was cancelled
    summary = asyncio.run(follow(settings, args.job_id, args.timeout_s))
    return 0 if summary.state == "cancelled" else 1


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    from maas import jobs

    if not asyncio.run(jobs.has_status(settings, args.job_id)):
        console().print(
            f"[yellow]no status for job {_job_markup(args.job_id)} yet[/yellow] (`maas jobs "
            f"list` shows the known ones){_plan_hint(args.job_id)}; waiting for its first — "
            "Ctrl-C stops watching, not the job"
        )
    return _exit_code(asyncio.run(follow(settings, args.job_id, args.timeout_s)))


def _job_markup(job_id: str) -> str:
    """A job id as typed, inside console markup: as data, neither markup nor control codes
    (``maas jobs watch $'\\x1b[2J'`` must not clear the screen)."""
    from rich.markup import escape

    from maas.events import printable

    return escape(printable(job_id))


def _plan_hint(job_id: str) -> str:
    """For a plan's id: a plan runs only for a version registered under a policy, so one that
    never had a policy is watched in vain (the compressor's log alone said so)."""
    from maas.policy import is_plan_id

    if not is_plan_id(job_id):
        return ""
    return (
        "; a policy plan runs only for a version registered while its model had a policy "
        "(`maas models policy show NAME` shows it): a version registered before any policy "
        "gets no plan"
    )


def _exit_code(summary: jobs.JobSummary) -> int:
    return 0 if summary.state == "succeeded" else 1


def _describe(summary: jobs.JobSummary) -> str:
    parts = [summary.state]
    for name, fmt in (("loss", "{:.4f}"), ("accuracy", "{:.3f}"), ("samples_per_s", "{:.0f}")):
        if name in summary.metrics:
            parts.append(f"{name}={fmt.format(summary.metrics[name])}")
    return " ".join(parts)


async def follow(settings: Settings, job_id: str, timeout_s: float | None) -> jobs.JobSummary:
    """A live progress bar for one job; returns its final summary (printed too)."""
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from maas import jobs
    from maas.events import printable

    final = jobs.JobSummary(job_id)
    with Progress(
        TextColumn("[bold]{task.fields[job]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[detail]}"),
        console=console(),
    ) as progress:
        task = progress.add_task(
            "job", total=None, job=job_id, steps="", detail="waiting for the job…"
        )
        told = ""
        async for summary in jobs.watch(settings, job_id, timeout_s=timeout_s):
            if summary.reason and summary.reason != told and not summary.done:
                # What it waits for, who left or joined: kept above the bar, in the scrollback.
                told = summary.reason
                progress.console.print(f"  {escape(printable(told, 500))}")
            progress.update(
                task,
                completed=summary.step,
                total=summary.total_steps or None,
                steps=f"step {summary.step}/{summary.total_steps or '?'}",
                detail=_describe(summary),
            )
            final = summary
    print_final(final)
    return final


def print_final(final: jobs.JobSummary) -> None:
    """How a job ended, in a line or two. Its text came in a status event, which anyone who can
    write the topic wrote: printed without markup or escape sequences (a dataset key holding
    "[/bold]" made this raise MarkupError, and the reason was never shown)."""
    from rich.markup import escape

    from maas.events import printable

    if final.state == "succeeded":
        registered = escape(printable(_registered(final), 500))
        console().print(f"[green]succeeded[/green]{registered} {_describe(final)}")
        if final.reason:
            console().print(f"  {escape(printable(final.reason, 500))}")
    elif final.state == "cancelled":
        console().print(f"[yellow]cancelled[/yellow] at step {final.step}")
    else:
        error = final.error or {"code": final.state, "message": "no details"}
        told = escape(printable(f"{error['code']}: {error['message']}", 2000))
        console().print(f"[red]{final.state}[/red]: {told}")


def _registered(summary: jobs.JobSummary) -> str:
    """`` -> model a@3`` or, for a job that registered several (compress), every one."""
    if not summary.models:
        return ""
    if len(summary.models) == 1:
        (model,) = summary.models
        return f" -> model {model['name']}@{model['version']}"
    listed = ", ".join(
        f"{m['name']}@{m['version']}" + (f" ({m['method']})" if m.get("method") else "")
        for m in summary.models
    )
    return f" -> models {listed}"


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from rich.table import Table
    from rich.text import Text

    from maas import jobs
    from maas.events import printable

    jobs.check_states(args.state)  # before the topic is read, which takes seconds
    summaries = asyncio.run(jobs.summaries(settings)).values()
    table = Table("JOB", "STATE", "STEP", "LOSS", "ACCURACY", "MODEL", "UPDATED")
    for summary in jobs.latest(summaries, states=args.state, last=args.last):
        model = summary.model or {}
        table.add_row(
            Text(printable(summary.job_id)),  # as data: neither markup nor control codes
            summary.state,
            f"{summary.step}/{summary.total_steps}" if summary.total_steps else str(summary.step),
            _fmt(summary.metrics.get("loss")),
            _fmt(summary.metrics.get("accuracy")),
            f"{model['name']}@{model['version']}" if model else "",
            when(summary.updated_ms),
        )
    console().print(table)
    return 0


def when(ms: int, now: dt.datetime | None = None) -> str:
    """A status's time as the table shows it: the time of day for today's, the date as well
    for older ones (a job last heard of yesterday must not read as running now)."""
    at = dt.datetime.fromtimestamp(ms / 1000)
    today = (now or dt.datetime.now()).date()
    return at.strftime("%H:%M:%S" if at.date() == today else "%Y-%m-%d %H:%M")


def _count(text: str) -> int:
    count = small_number(text)
    if count is None or count < 1:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: give a whole number of jobs, 1 or more")
    return count


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
