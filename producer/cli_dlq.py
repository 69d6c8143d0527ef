"""``cliptag dlq``: list, show, retry and purge dead-lettered jobs and webhook deliveries."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, cast

import typer
from rich.console import Console
from rich.table import Table

from producer.cli_options import RedisUrl, console
from producer.client import Client
from producer.dlq import DeadLetter, DeadLetterStore, LetterKind
from producer.errors import ErrorCode, JobError, shorten

dlq_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Dead letters: jobs that failed for good and webhooks that could not be delivered.",
)

Code = Annotated[str | None, typer.Option("--code", help="Only letters with this error code.")]
Kind = Annotated[
    str | None, typer.Option("--kind", help="Only `job` or `webhook` letters.", show_default=False)
]
Queue = Annotated[str | None, typer.Option("--queue", help="Only letters from this queue.")]
JobIds = Annotated[list[str] | None, typer.Argument(help="Job ids.", show_default=False)]
All = Annotated[bool, typer.Option("--all", help="Every letter (narrowed by --code/--kind/--queue).")]


def _check_code(code: str | None) -> str | None:
    if code is not None and code not in {c.value for c in ErrorCode}:
        known = ", ".join(sorted(c.value for c in ErrorCode))
        raise typer.BadParameter(f"unknown error code {code!r}; known codes: {known}", param_hint="--code")
    return code


def _check_kind(kind: str | None) -> LetterKind | None:
    if kind not in (None, "job", "webhook"):
        raise typer.BadParameter(f"kind must be job or webhook, got {kind!r}", param_hint="--kind")
    return cast(LetterKind | None, kind)


def select(
    store: DeadLetterStore,
    *,
    job_ids: Iterable[str],
    every: bool,
    code: str | None,
    kind: str | None,
    queue: str | None,
) -> list[DeadLetter]:
    """The letters named by job id, or (``--all`` / ``--code``) all those matching the filters.

    Raises:
        typer.BadParameter: neither or both of job ids and ``--all``/``--code`` were given,
            or a named job id has no letter.
    """
    ids = list(job_ids)
    code, letter_kind = _check_code(code), _check_kind(kind)
    if bool(ids) == (every or code is not None):
        raise typer.BadParameter("name job ids, or select with --all or --code (not both)")
    if not ids:
        return list(store.list(code=code, kind=letter_kind, queue=queue))
    letters, missing = [], []
    for job_id in ids:
        kinds: tuple[LetterKind, ...] = (letter_kind,) if letter_kind else ("job", "webhook")
        found = [letter for k in kinds if (letter := store.get(job_id, kind=k)) is not None]
        letters += found
        if not found:
            missing.append(job_id)
    if missing:
        raise typer.BadParameter(f"no dead letter for {', '.join(map(repr, missing))}")
    return letters


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


@dlq_app.command("list")
def list_letters(
    code: Code = None,
    kind: Kind = None,
    queue: Queue = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """List dead letters, oldest first."""
    with Client(redis_url) as client:
        letters = list(client.dead_letters.list(code=_check_code(code), kind=_check_kind(kind), queue=queue))
    if as_json:
        for letter in letters:
            sys.stdout.write(letter.model_dump_json() + "\n")
        return
    table = Table("kind")
    table.add_column("job", no_wrap=True)  # ids are copied into `dlq show/retry`
    for column in ("code", "attempts", "queue", "last failed (UTC)", "message"):
        table.add_column(column)
    for letter in letters:
        table.add_row(
            letter.kind,
            letter.job_id,
            letter.error.code.value,
            str(letter.attempts),
            letter.queue or "",
            _when(letter.last_failed_at),
            shorten(letter.error.message, 80),
        )
    Console().print(table)
    console.print(f"{len(letters)} dead letter(s)")


@dlq_app.command()
def show(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    kind: Kind = None,
    redis_url: RedisUrl = None,
) -> None:
    """Print a job's dead letters (the job, the error, attempts, times) as JSON."""
    with Client(redis_url) as client:
        letters = select(client.dead_letters, job_ids=[job_id], every=False, code=None, kind=kind, queue=None)
    for letter in letters:
        sys.stdout.write(json.dumps(letter.model_dump(mode="json"), indent=2) + "\n")


@dlq_app.command()
def retry(
    job_ids: JobIds = None,
    every: All = False,
    code: Code = None,
    kind: Kind = None,
    queue: Queue = None,
    redis_url: RedisUrl = None,
) -> None:
    """Requeue dead letters under their own job ids (fix the cause first)."""
    requeued = failed = 0
    with Client(redis_url) as client:
        letters = select(
            client.dead_letters, job_ids=job_ids or [], every=every, code=code, kind=kind, queue=queue
        )
        for letter in letters:
            try:
                sent = client.requeue(letter)
            except JobError as exc:
                failed += 1
                console.print(f"[red]not requeued {letter.kind} {letter.job_id}: {exc.message}")
                continue
            if not sent:
                console.print(f"{letter.kind} {letter.job_id}: gone meanwhile (sent again or purged)")
                continue
            requeued += 1
            sys.stdout.write(f"requeued {letter.kind} {letter.job_id}\n")
    console.print(f"requeued {requeued} of {len(letters)} dead letter(s)")
    if failed:
        raise typer.Exit(1)


@dlq_app.command()
def purge(
    job_ids: JobIds = None,
    every: All = False,
    code: Code = None,
    kind: Kind = None,
    queue: Queue = None,
    redis_url: RedisUrl = None,
) -> None:
    """Delete dead letters for good."""
    with Client(redis_url) as client:
        store = client.dead_letters
        letters = select(store, job_ids=job_ids or [], every=every, code=code, kind=kind, queue=queue)
        for letter in letters:
            store.remove(letter.job_id, kind=letter.kind)
            sys.stdout.write(f"purged {letter.kind} {letter.job_id}\n")
    console.print(f"purged {len(letters)} dead letter(s)")
