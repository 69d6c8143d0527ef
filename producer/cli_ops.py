"""Operator commands of ``cliptag``: ``status`` (the deployment) and ``health`` (this host's workers).

Neither imports torch or the worker: ``cliptag health`` is meant as a container healthcheck.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.table import Table

from producer.celery_conf import WEBHOOK_QUEUE, make_celery
from producer.cli_options import RedisUrl, console, settings_for
from producer.config import QueueSettings
from producer.dlq import DeadLetterStore
from producer.errors import shorten
from producer.ops import live_workers, queue_depth, unacked_count
from producer.readiness import DEFAULT_HEALTH_DIR, check_workers

BROKER_TIMEOUT_S = 2.0


def deployment_status(settings: QueueSettings, *, queues: list[str], timeout: float) -> dict[str, Any]:
    """Queue depths, live workers, dead letters and recent throughput, as one JSON-able dict.

    Args:
        settings: where the broker is.
        queues: queues to measure; empty means the configured and webhook queues plus every
            queue a live worker consumes.
        timeout: seconds to wait for workers to answer.

    Raises:
        redis.RedisError: the broker does not answer.
    """
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
    )
    client.ping()  # fail fast: Celery's broadcast would retry an absent broker for ever
    app = make_celery(settings, main="cliptag-status")
    try:
        workers = live_workers(app, timeout=timeout)
    finally:
        app.close()
    names = queues or sorted(
        {settings.queue, WEBHOOK_QUEUE, *(q for w in workers.values() for q in w.get("queues", []))}
    )
    reports = [w for w in workers.values() if "jobs_recent" in w]
    window_s = max((w["window_s"] for w in reports), default=60.0)
    jobs = sum(w["jobs_recent"] for w in reports)
    return {
        "queues": {name: queue_depth(client, name) for name in names},
        "unacked": unacked_count(client),
        "workers": workers,
        "dead_letters": DeadLetterStore(client).count(),
        "throughput": {
            "window_s": window_s,
            "jobs": jobs,
            "jobs_per_second": round(jobs / window_s, 3),
            "images_per_second": round(sum(w["images_per_second"] for w in reports), 3),
        },
    }


def print_status(report: dict[str, Any]) -> None:
    out = Console(width=None if sys.stdout.isatty() else 240)  # piped: no 80-column truncation
    queues = Table("queue", "waiting", box=None, pad_edge=False)
    for name, depth in report["queues"].items():
        queues.add_row(name, str(depth))
    out.print(queues)
    out.print(f"held by workers (unacknowledged): {report['unacked']}")
    columns = ("worker", "model", "device", "queues", "recent jobs", "images/s", "batches")
    workers = Table(*columns, box=None, pad_edge=False)
    for node, info in report["workers"].items():
        if "error" in info:
            workers.add_row(node, f"[yellow]{info['error']}", "", "", "", "", "")
            continue
        workers.add_row(
            node,
            str(info.get("model", "")),
            str(info.get("device", "")),
            ",".join(info.get("queues", [])),
            str(info.get("jobs_recent", "")),
            str(info.get("images_per_second", "")),
            str(info.get("batches", "")),
        )
    out.print(workers if report["workers"] else "workers: none answered")
    out.print(f"dead letters: {report['dead_letters']}")
    rate = report["throughput"]
    out.print(
        f"throughput (last {rate['window_s']:.0f} s): {rate['jobs']} jobs, "
        f"{rate['jobs_per_second']} jobs/s, {rate['images_per_second']} images/s"
    )


def status(
    queue: Annotated[
        str, typer.Option("--queue", "-Q", help="Queues to measure, comma-separated (default: all known).")
    ] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for workers to answer.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    redis_url: RedisUrl = None,
) -> None:
    """Queue depths, live workers, dead-letter count and recent throughput."""
    settings = settings_for(redis_url)
    names = [name.strip() for name in queue.split(",") if name.strip()]
    try:
        report = deployment_status(settings, queues=names, timeout=timeout)
    except redis.RedisError as exc:
        url, reason = settings.redis_url, shorten(str(exc))
        console.print(f"[red]cliptag status: the broker at {url} does not answer: {reason}", soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        print_status(report)


def health(
    health_dir: Annotated[
        Path, typer.Option(envvar="CLIPTAG_HEALTH_DIR", help="Where this host's workers write heartbeats.")
    ] = DEFAULT_HEALTH_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Exit 0 when every worker on this host has its model loaded and reaches the broker, else 1."""
    verdicts = check_workers(health_dir)
    ready = bool(verdicts) and all(problem is None for problem in verdicts.values())
    if as_json:
        sys.stdout.write(json.dumps({"ready": ready, "workers": verdicts}) + "\n")
    else:
        if not verdicts:
            sys.stdout.write(f"not ready: no worker heartbeat in {health_dir}\n")
        for node, problem in verdicts.items():
            sys.stdout.write(f"{node}: {'ready' if problem is None else 'NOT READY: ' + problem}\n")
    raise typer.Exit(0 if ready else 1)


def register_ops(app: typer.Typer) -> None:
    """Add ``status`` and ``health`` to the ``cliptag`` app."""
    app.command()(status)
    app.command()(health)
