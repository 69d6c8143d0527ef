"""The Celery app of a cliptag worker process: ``celery -A worker.app worker``.

The model is loaded in ``worker_init``, which runs in the worker's main process before it
consumes anything. The pool is ``threads``: every job thread shares the one model and the
one batcher in this process (no fork after CUDA start-up, no copy of the weights per
child), and the forward pass releases the GIL.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import structlog
from celery import signals

from producer.celery_conf import WEBHOOK_QUEUE, make_celery
from worker.config import WorkerSettings
from worker.logs import configure_logging
from worker.result_backend import backend_for
from worker.runtime import Runtime
from worker.transport import transport_for

settings = WorkerSettings()
app = make_celery(settings, main="worker")
app.conf.update(
    worker_pool="threads",
    worker_concurrency=settings.worker_concurrency,
    worker_hijack_root_logger=False,
    include=["worker.tasks"],
    worker_consumer="worker.consumer:Consumer",  # answers malformed messages (worker/consumer.py)
    broker_transport=transport_for(settings.redis_url),
    result_backend=backend_for(settings.backend_url),  # one round trip per stored state
)
log = structlog.get_logger("cliptag.worker")


@signals.worker_init.connect
def load_model(**_: Any) -> None:
    """Load the model once, before consuming; exit with one clear line if it cannot be had."""
    configure_logging()
    try:
        Runtime.start(settings)
    except Exception as exc:  # the worker must not consume without a model
        print(f"cliptag worker: {exc}", file=sys.stderr, flush=True)
        os._exit(3)


@signals.worker_ready.connect
def freeze_startup_objects(**_: Any) -> None:
    """Exempt everything alive once the worker is ready from garbage collection.

    The model, torch, transformers and Celery leave ~400,000 objects that live as long as
    the process; a full collection walks them all with the GIL held, stopping every job
    thread and the batcher for ~200 ms (measured on this project's 2-core host). Jobs
    allocate enough to trigger one every few thousand images. Frozen, they are never
    walked again: a full collection then takes milliseconds.
    """
    gc.collect()  # garbage of start-up goes now, or it would be frozen with the rest
    gc.freeze()
    log.info("startup_objects_frozen", objects=gc.get_freeze_count())


@signals.worker_shutdown.connect
def finish_in_flight(**_: Any) -> None:
    """After Celery's warm shutdown drained the job threads, finish the batcher and exit."""
    Runtime.stop()


__all__ = ["WEBHOOK_QUEUE", "app", "settings"]
