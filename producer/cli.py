"""The ``cliptag`` command line.

Producer commands live here; ``worker`` and ``demo`` import the worker (and torch) only
when they run, so a producer-only install keeps a light ``cliptag submit``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, NoReturn

import redis
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from producer.backfill import SubmissionRecord, backfill_job_id, chunked, expand_sources
from producer.cli_dlq import dlq_app
from producer.cli_labels import labels_app
from producer.cli_ops import register_ops
from producer.cli_options import RedisUrl, console
from producer.client import Client, Job
from producer.config import QueueSettings
from producer.contract import DEFAULT_TEMPLATE, JobResult
from producer.errors import CliptagError, JobTimeout
from producer.labelsets import read_label_file

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Zero-shot image tagging with CLIP over Celery."
)
app.add_typer(labels_app, name="labels")
app.add_typer(dlq_app, name="dlq")


def read_labels(labels: str | None, label_file: Path | None) -> list[str]:
    """Labels from ``--labels a,b`` and/or ``--label-file`` (one per line, # comments)."""
    found = [part.strip() for part in (labels or "").split(",") if part.strip()]
    if label_file is not None:
        found += read_label_file(label_file)
    return found


def progress_bar() -> Progress:
    """A progress bar on stderr when it is a terminal; silent otherwise."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
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
    with progress_bar() as progress:
        task = progress.add_task("waiting", total=len(jobs))
        for job in jobs:
            results.append(job.result(timeout=timeout, raise_on_error=False))
            progress.advance(task)
    return results


@app.command()
def submit(
    images: Annotated[
        list[str],
        typer.Argument(
            help="Image references (paths, https://, s3://), directories, or s3://bucket/prefix/."
        ),
    ],
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels.")] = None,
    label_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="File with one label per line.")
    ] = None,
    label_set: Annotated[
        str | None, typer.Option(help="A stored label set (cliptag labels) instead of --labels.")
    ] = None,
    template: Annotated[str, typer.Option(help="Prompt template with {} for the label.")] = DEFAULT_TEMPLATE,
    top_k: Annotated[int | None, typer.Option(help="Keep the best K scores.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Tag labels scoring at least this.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into subfolders.")] = False,
    bulk_size: Annotated[int, typer.Option(help="Images per bulk job (1: one job per image).")] = 1,
    record: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="JSON-lines record of submitted jobs; a rerun skips what's in it."),
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Queue to send to (e.g. cliptag-bulk).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for and print the results.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each result.")] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    s3_endpoint_url: Annotated[
        str | None, typer.Option(envvar="CLIPTAG_S3_ENDPOINT_URL", help="S3-compatible endpoint for listing.")
    ] = None,
    redis_url: RedisUrl = None,
) -> None:
    """Enqueue images for tagging (directories and s3:// prefixes for backfills); --wait prints results."""
    if label_set is not None and (labels or label_file):
        raise CliptagError("--label-set replaces --labels and --label-file: give one or the other")
    options: dict[str, object] = (
        {"label_set": label_set}
        if label_set is not None
        else {"labels": read_labels(labels, label_file), "template": template}
    )
    options.update({k: v for k, v in {"top_k": top_k, "threshold": threshold}.items() if v is not None})
    references = expand_sources(images, recursive=recursive, s3_endpoint_url=s3_endpoint_url)
    with Client(redis_url, queue=queue) as client, SubmissionRecord(record) as submitted:
        skipped = 0

        def unsubmitted() -> Iterable[str]:
            nonlocal skipped
            for reference in references:
                if reference in submitted.done:
                    skipped += 1
                else:
                    yield reference

        job_ids: list[str] = []  # only with --wait: without it each id is printed as it goes
        with progress_bar() as progress:
            task = progress.add_task("submitting", total=None)
            for chunk in chunked(unsubmitted(), bulk_size):
                document = {"images": chunk} if bulk_size > 1 else {"image": chunk[0]}
                if record is not None:
                    document["job_id"] = backfill_job_id(chunk, options)
                job = client.submit_job({**document, **options})
                submitted.add(job.id, chunk)
                if wait:
                    job_ids.append(job.id)
                else:
                    sys.stdout.write(job.id + "\n")
                progress.advance(task, len(chunk))
        if skipped:
            console.print(f"skipped {skipped} images already in {record}")
        if not wait:
            return
        try:
            print_results(wait_for([client.job(i) for i in job_ids], timeout=timeout), as_json=as_json)
        except JobTimeout as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(2) from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option("--queues", "-Q", help="Queues to consume, comma-separated.")] = "",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N (default: CLIPTAG_DEVICE, else CUDA if any).")
    ] = None,
    gpus: Annotated[
        str | None, typer.Option(help="Supervise one worker per GPU: 'all' or indices like 0,1,3.")
    ] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="Supervise this many workers on --device (CPU hosts).")
    ] = 1,
) -> None:
    """Run a Celery worker (extra arguments go to Celery); --gpus runs one per GPU, supervised."""
    from worker.cli import run_worker

    run_worker(
        queues=queues,
        loglevel=loglevel,
        extra_args=list(ctx.args),
        device=device,
        gpus=gpus,
        processes=processes,
    )


@app.command()
def demo(
    redis_url: RedisUrl = None,
    model: Annotated[str | None, typer.Option(envvar="CLIPTAG_MODEL", help="Checkpoint to demo.")] = None,
) -> None:
    """Start Redis (if needed) and a worker, tag the bundled sample photos, print the results."""
    from worker.demo import run_demo

    run_demo(redis_url=redis_url, model=model)


register_ops(app)


def main() -> None:
    try:
        app()
    except CliptagError as exc:
        fail(str(exc))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail(f"Redis did not answer ({exc}); is CLIPTAG_REDIS_URL right?")
    except OSError as exc:  # a file named on the command line
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except ValidationError as exc:
        if exc.title != QueueSettings.__name__:
            raise
        fail("; ".join(f"CLIPTAG_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()))


def fail(message: str) -> NoReturn:
    console.print(f"[red]cliptag: {message}", soft_wrap=True)  # one line, however long
    raise SystemExit(1)


if __name__ == "__main__":
    main()
