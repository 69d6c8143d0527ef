"""``cliptag worker``: a Celery worker with cliptag's pool, concurrency and queues.

With ``--gpus`` (or ``--processes``) it supervises one such worker per GPU instead
(:mod:`worker.supervisor`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

OPENMP_SPIN_COUNT = 10_000


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


def run_worker(
    *,
    queues: str = "",
    loglevel: str = "INFO",
    extra_args: Sequence[str] = (),
    device: str | None = None,
    gpus: str | None = None,
    processes: int = 1,
) -> None:
    """Run a worker in this process until it is told to stop (SIGTERM: warm shutdown).

    Args:
        queues: queues to consume, comma-separated; empty means ``CLIPTAG_QUEUE`` and the
            webhook queue.
        loglevel: Celery's log level.
        extra_args: more ``celery worker`` arguments.
        device: overrides ``CLIPTAG_DEVICE`` (``cpu``, ``cuda``, ``cuda:N``).
        gpus: ``all`` or ``0,1,3``: supervise one worker per GPU instead (needs CUDA).
        processes: more than 1: supervise that many workers on ``device`` instead.
    """
    if device:
        os.environ["CLIPTAG_DEVICE"] = device  # read by worker.app's settings on import
    # OpenMP's threads spin after each parallel region (300,000 turns by default), taking
    # the CPU that fetching, decoding and Celery need; 10,000 turns still bridge the gaps
    # between the operations of one forward pass. Set before torch is imported.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", str(OPENMP_SPIN_COUNT))
    if gpus is not None or processes > 1:
        from worker.config import WorkerSettings
        from worker.supervisor import run_supervisor

        child_args = [f"--loglevel={loglevel}", *([f"--queues={queues}"] if queues else []), *extra_args]
        raise SystemExit(
            run_supervisor(
                gpus=gpus,
                processes=processes,
                device=device,
                worker_args=child_args,
                metrics_port=WorkerSettings().metrics_port,
            )
        )

    from producer.celery_conf import WEBHOOK_QUEUE
    from worker.app import app, settings

    argv = worker_argv(
        queues=queues,
        loglevel=loglevel,
        concurrency=settings.worker_concurrency,
        default_queues=(settings.queue, WEBHOOK_QUEUE),
    )
    app.worker_main([*argv, *extra_args])
