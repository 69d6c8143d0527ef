"""The ``cliptag`` command line.

Producer commands live here; ``worker`` and ``demo`` import the worker (and torch) only
when they run, so a producer-only install keeps a light ``cliptag submit``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from producer.client import Client, Job
from producer.contract import DEFAULT_TEMPLATE, JobResult
from producer.errors import CliptagError, JobTimeout

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Zero-shot image tagging with CLIP over Celery."
)
console = Console(stderr=True)

RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", envvar="CLIPTAG_REDIS_URL", help="Broker URL.", show_default=False),
]


def read_labels(labels: str | None, label_file: Path | None) -> list[str]:
    """Labels from ``--labels a,b`` and/or ``--label-file`` (one per line, # comments)."""
    found = [part.strip() for part in (labels or "").split(",") if part.strip()]
    if label_file is not None:
        lines = label_file.read_text(encoding="utf-8").splitlines()
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return found


def progress_bar(total: int | None, description: str) -> Progress:
    """A progress bar on a terminal; silent when stderr is not one."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )


def print_results(results: Iterable[JobResult], *, as_json: bool) -> None:
    """JSON lines, or a table with the top labels of each image."""
    if as_json:
        for result in results:
            sys.stdout.write(json.dumps(result.to_json_dict()) + "\n")
        return
    table = Table("job", "image", "status", "top label", "scores", "tags")
    for result in results:
        for item in result.items or [result]:
            scores = ", ".join(f"{s.label} {s.score:.3f}" for s in (item.scores or [])[:3])
            status = item.status if item.error is None else f"{item.status}: {item.error.code.value}"
            table.add_row(
                result.job_id[:12],
                Path(item.image or "").name,
                status,
                item.top_label or "",
                scores,
                ", ".join(item.tags or []),
            )
    Console().print(table)


def wait_for(jobs: list[Job], *, timeout: float | None) -> list[JobResult]:
    """Each job's result in order, with a progress bar on a terminal."""
    results = []
    with progress_bar(len(jobs), "waiting") as progress:
        task = progress.add_task("waiting", total=len(jobs))
        for job in jobs:
            results.append(job.result(timeout=timeout, raise_on_error=False))
            progress.advance(task)
    return results


@app.command()
def submit(
    images: Annotated[list[str], typer.Argument(help="Image references: paths, https:// or s3:// URLs.")],
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels.")] = None,
    label_file: Annotated[Path | None, typer.Option(help="File with one label per line.")] = None,
    template: Annotated[str, typer.Option(help="Prompt template with {} for the label.")] = DEFAULT_TEMPLATE,
    top_k: Annotated[int | None, typer.Option(help="Keep the best K scores.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Tag labels scoring at least this.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for and print the results.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each result.")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Enqueue images for tagging; with --wait, print one result per image."""
    label_list = read_labels(labels, label_file)
    options = {"template": template, "top_k": top_k, "threshold": threshold}
    options = {k: v for k, v in options.items() if v is not None}
    with Client(redis_url) as client:
        jobs = []
        with progress_bar(len(images), "submitting") as progress:
            task = progress.add_task("submitting", total=len(images))
            for job in client.submit_many(images, label_list, **options):
                jobs.append(job)
                progress.advance(task)
        if not wait:
            for job in jobs:
                sys.stdout.write(job.id + "\n")
            return
        try:
            print_results(wait_for(jobs, timeout=timeout), as_json=as_json)
        except JobTimeout as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(2) from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option("--queues", "-Q", help="Queues to consume, comma-separated.")] = "",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run a Celery worker (extra arguments go to Celery)."""
    from worker.cli import run_worker

    run_worker(queues=queues, loglevel=loglevel, extra_args=list(ctx.args))


@app.command()
def demo(
    redis_url: RedisUrl = None,
    model: Annotated[str | None, typer.Option(envvar="CLIPTAG_MODEL", help="Checkpoint to demo.")] = None,
) -> None:
    """Start Redis (if needed) and a worker, tag the bundled sample photos, print the results."""
    from worker.demo import run_demo

    run_demo(redis_url=redis_url, model=model)


def main() -> None:
    try:
        app()
    except CliptagError as exc:
        console.print(f"[red]cliptag: {exc}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
