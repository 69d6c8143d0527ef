"""``cliptag worker``: a Celery worker with cliptag's pool, concurrency and queues."""

from __future__ import annotations

from collections.abc import Sequence


def worker_argv(*, queues: str, loglevel: str, concurrency: int, default_queues: Sequence[str]) -> list[str]:
    """The ``celery worker`` arguments ``cliptag worker`` runs with."""
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={queues or ','.join(default_queues)}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--task-events",
    ]


def run_worker(*, queues: str = "", loglevel: str = "INFO", extra_args: Sequence[str] = ()) -> None:
    """Run a worker in this process until it is told to stop (SIGTERM: warm shutdown)."""
    from producer.celery_conf import WEBHOOK_QUEUE
    from worker.app import app, settings

    argv = worker_argv(
        queues=queues,
        loglevel=loglevel,
        concurrency=settings.worker_concurrency,
        default_queues=(settings.queue, WEBHOOK_QUEUE),
    )
    app.worker_main([*argv, *extra_args])
