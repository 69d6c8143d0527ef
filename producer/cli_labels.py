"""``cliptag labels``: named label sets in Redis, for jobs that say ``label_set: NAME``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import redis
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from producer.cli_options import RedisUrl, console, settings_for
from producer.config import QueueSettings
from producer.contract import describe_validation_error
from producer.labelsets import LabelSetDefinition, LabelSetStore, read_label_file

labels_app = typer.Typer(
    no_args_is_help=True,
    help="Named label sets stored in Redis; jobs use them with label_set: NAME.",
)


def _fail(message: str, *, code: int = 1) -> typer.Exit:
    console.print(f"[red]cliptag labels: {message}", highlight=False)
    return typer.Exit(code)


@contextmanager
def _store(settings: QueueSettings) -> Iterator[LabelSetStore]:
    """The store at ``settings.redis_url``; a Redis failure ends the command with one line."""
    try:
        yield LabelSetStore.from_url(settings.redis_url)
    except redis.RedisError as exc:
        raise _fail(f"Redis at {settings.redis_url}: {exc}") from None


@labels_app.command("put")
def put(
    name: Annotated[str, typer.Argument(help="The set's name (letters, digits, . _ : @ -).")],
    file: Annotated[
        Path,
        typer.Option("--file", exists=True, dir_okay=False, help="Labels, one per line (# comments)."),
    ],
    template: Annotated[
        list[str] | None,
        typer.Option(
            "--template",
            "--templates",
            help="Template with {} or ensemble:NAME; repeat to ensemble. Default 'a photo of a {}.'",
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help='JSON file of per-label prompts: {"label": ["…"]}.'),
    ] = None,
    redis_url: RedisUrl = None,
) -> None:
    """Create or replace a label set; prints its new version."""
    settings = settings_for(redis_url)
    templates = template or []
    try:
        document = {
            "labels": read_label_file(file),
            "template": templates[0] if len(templates) == 1 else templates or None,
            "prompts": json.loads(prompts.read_text(encoding="utf-8")) if prompts else None,
        }
        definition = LabelSetDefinition.model_validate(document, context={"max_labels": settings.max_labels})
        with _store(settings) as store:
            stored = store.put(name, definition)
    except ValidationError as exc:
        raise _fail(describe_validation_error(exc), code=2) from None
    except ValueError as exc:  # a bad name, or prompts that are not JSON
        raise _fail(str(exc), code=2) from None
    sys.stdout.write(f"{stored.name} version {stored.version}: {len(stored.labels)} labels\n")


@labels_app.command("list")
def list_sets(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Every stored label set: name, version, size, templates, last change."""
    with _store(settings_for(redis_url)) as store:
        stored_sets = store.list()
    if as_json:
        for stored in stored_sets:
            summary = {
                "name": stored.name,
                "version": stored.version,
                "labels": len(stored.labels),
                "updated_at": stored.updated_at,
            }
            sys.stdout.write(json.dumps(summary) + "\n")
        return
    table = Table("name", "version", "labels", "template", "updated")
    for stored in stored_sets:
        updated = datetime.fromtimestamp(stored.updated_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        template = stored.template if stored.template is not None else "(default)"
        table.add_row(stored.name, str(stored.version), str(len(stored.labels)), str(template), updated)
    Console().print(table)


@labels_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="The set's name.")],
    redis_url: RedisUrl = None,
) -> None:
    """Print one label set (name, version, labels, templates, prompts) as JSON."""
    with _store(settings_for(redis_url)) as store:
        stored = store.get(name)
    if stored is None:
        raise _fail(f"no label set named {name!r}")
    document = {"name": stored.name, "version": stored.version, "updated_at": stored.updated_at}
    document.update(stored.model_dump(exclude_none=True, exclude=set(document)))
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


@labels_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="The set's name.")],
    redis_url: RedisUrl = None,
) -> None:
    """Delete a label set; jobs naming it then fail with unknown_label_set."""
    with _store(settings_for(redis_url)) as store:
        deleted = store.delete(name)
    if not deleted:
        raise _fail(f"no label set named {name!r}")
    sys.stdout.write(f"deleted {name}\n")
