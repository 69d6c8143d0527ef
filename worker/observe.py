"""How a worker process shows what it does: Celery signals → metrics, job log lines, heartbeat.

:func:`start` runs in ``worker_init`` once the model is loaded (from
:meth:`worker.runtime.Runtime.start`). The signal handlers below then

- bind the job's correlation id (``metadata.correlation_id``) to every log line of the job,
- log one ``job_done`` line per job with its id, batch id and timings, and count it,
- start the heartbeat once Celery consumes, and remove it at shutdown;

and the ``cliptag_stats`` inspect command answers ``cliptag status``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from celery import signals
from celery.worker.control import inspect_command

from producer.contract import TASK_NAME
from producer.errors import ErrorCode
from producer.ops import STATS_COMMAND
from worker.config import WorkerSettings
from worker.health import HeartbeatWriter
from worker.metrics import METRICS
from worker.pipeline import Pipeline

log = structlog.get_logger("cliptag.worker")

CORRELATION_KEY = "correlation_id"
"""The key of a job's ``metadata`` whose value is bound to its log lines as ``correlation_id``."""
BROKER_TIMEOUT_S = 2.0


@dataclass
class _Observed:
    settings: WorkerSettings
    pipeline: Pipeline
    broker: redis.Redis
    queues: list[str]
    model_loaded: Callable[[], bool]
    heartbeat: HeartbeatWriter | None = None


_observed: _Observed | None = None


def start(
    settings: WorkerSettings,
    pipeline: Pipeline,
    *,
    model_load_s: float,
    model_loaded: Callable[[], bool],
) -> None:
    """Observe this process's worker; serve metrics when ``settings.metrics_port`` is set.

    Args:
        settings: the worker's settings.
        pipeline: the started pipeline (its engine, batcher and model info).
        model_load_s: how long loading the model took.
        model_loaded: says whether the model is still loaded (false once the worker stops).
    """
    global _observed
    broker = redis.Redis.from_url(
        settings.redis_url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
    )
    observed = _Observed(
        settings=settings,
        pipeline=pipeline,
        broker=broker,
        queues=[settings.queue],
        model_loaded=model_loaded,
    )
    METRICS.model_load.set(model_load_s)
    METRICS.watch(engine=pipeline.engine, broker=broker, queues=lambda: observed.queues)
    if settings.metrics_port:
        METRICS.serve(settings.metrics_port)
        log.info("metrics_serving", port=settings.metrics_port)
    _observed = observed


def correlation_id(job: object) -> str | None:
    """``metadata.correlation_id`` of a job document, as text, if it has one."""
    metadata = job.get("metadata") if isinstance(job, dict) else None
    value = metadata.get(CORRELATION_KEY) if isinstance(metadata, dict) else None
    return None if value is None else str(value)


@signals.worker_ready.connect
def _start_heartbeat(sender: Any, **_: Any) -> None:
    """Celery consumes now: note its node name and queues, and start the heartbeat."""
    if _observed is None:
        return
    _observed.queues = [queue.name for queue in sender.task_consumer.queues]
    pipeline, settings = _observed.pipeline, _observed.settings
    _observed.heartbeat = HeartbeatWriter(
        directory=settings.health_dir,
        node=sender.hostname,
        model=pipeline.model_info.id,
        device=str(pipeline.engine.device),
        broker=_observed.broker,
        model_loaded=_observed.model_loaded,
        interval_s=settings.health_interval,
    ).start()


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _observed is not None and _observed.heartbeat is not None:
        _observed.heartbeat.stop()


@signals.task_prerun.connect
def _bind_job_context(sender: Any, args: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != TASK_NAME:
        return
    found = correlation_id(args[0]) if args else None
    if found is None:
        structlog.contextvars.unbind_contextvars("correlation_id")
    else:
        structlog.contextvars.bind_contextvars(correlation_id=found)


@signals.task_postrun.connect
def _observe_job(sender: Any, task_id: str, retval: Any = None, state: str | None = None, **_: Any) -> None:
    if getattr(sender, "name", None) != TASK_NAME:
        return
    try:
        if state == "SUCCESS" and isinstance(retval, dict):
            METRICS.observe_job(retval)
            _log_job(task_id, retval)
        elif state == "FAILURE":  # the task raised: a bug, which Celery logs with its traceback
            METRICS.observe_job({"status": "error", "error": {"code": ErrorCode.INTERNAL.value}})
    finally:
        structlog.contextvars.unbind_contextvars("correlation_id")


def _log_job(job_id: str, result: dict[str, Any]) -> None:
    items = result.get("items") or [result]
    error = result.get("error") or {}
    log.info(
        "job_done",
        job_id=job_id,
        kind=result.get("kind"),
        status=result.get("status"),
        code=error.get("code"),
        images=len(items) if result.get("items") else None,
        batch_id=result.get("batch_id"),
        batch_size=result.get("batch_size"),
        timings_ms=result.get("timings_ms"),
        attempts=result.get("attempts"),
    )


@inspect_command(name=STATS_COMMAND)
def _cliptag_stats(state: Any) -> dict[str, Any]:
    """This worker's model, queues and recent throughput (for ``cliptag status``)."""
    if _observed is None:
        return {"ready": False, "pid": os.getpid()}
    pipeline = _observed.pipeline
    return {
        "ready": _observed.model_loaded(),
        "pid": os.getpid(),
        "model": pipeline.model_info.id,
        "device": str(pipeline.engine.device),
        "dtype": str(pipeline.engine.dtype).removeprefix("torch."),
        "queues": _observed.queues,
        "max_batch": _observed.settings.max_batch,
        "concurrency": _observed.settings.worker_concurrency,
        "window_s": METRICS.jobs_recent.window_s,
        "jobs_recent": METRICS.jobs_recent.count(),
        "images_per_second": round(METRICS.images_recent.per_second(), 3),
        "batches": pipeline.batcher.batches_run,
    }
