"""The Celery task: one positional JSON object in, one JSON result out.

Every job ends as exactly one stored result: an ``ok`` result, or an ``error`` result with
a stable code. Transient errors are retried with exponential backoff first; a job that
failed for good (a permanent error, or retries exhausted) is also dead-lettered. The
return value is always the JSON result document (signal handlers read it).

Delivery is at least once (late acks; a dead worker's messages come back), made
effectively once here: a job delivered again (counted before) whose result is already
stored is answered from the backend without running again, a job delivered more than
``CLIPTAG_MAX_DELIVERIES`` times without finishing is dead-lettered as ``poison_message``
(``worker.deliveries``), and its webhook is enqueued once the result is stored, at most
once per job.
"""

from __future__ import annotations

import os
from typing import Any

import structlog
from celery import Task
from pydantic import ValidationError

from producer.contract import TASK_NAME, ErrorInfo, JobRequest, JobResult, error_result, parse_job
from producer.delivery import WebhookDelivery, webhook_state_key
from producer.dlq import DeadLetter
from producer.errors import ErrorCode, JobError, shorten
from worker import visibility
from worker.app import app, settings
from worker.backoff import backoff_delay, countdown_cap
from worker.deliveries import Delivery
from worker.runtime import Runtime
from worker.stores import broker_redis, dead_letters, delivery_counter, stored_result
from worker.webhook import enqueue as enqueue_webhook

log = structlog.get_logger("cliptag.worker")

RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 30.0
TEST_CRASH_EXIT_CODE = 86
RESULT_REPR_CHARS = 200
"""How much of a result Celery renders into its task-succeeded event (Flower shows it).
Celery renders up to 1,024 characters of every result by default, which for a full
result document costs more CPU than the rest of the task's bookkeeping."""

visibility.install(app, settings)


def retry_delay(retries: int) -> float:
    """Exponential backoff with jitter, kept well inside the visibility timeout."""
    cap = countdown_cap(settings.visibility_timeout, RETRY_CAP_SECONDS)
    return backoff_delay(retries, base=RETRY_BASE_SECONDS, cap=cap)


def job_error(result: JobResult) -> ErrorInfo | None:
    """The error a failed job failed with: its own, or (bulk) its first image's, retryable
    only when every image's error is; ``None`` for a job that succeeded."""
    if result.status != "error":
        return None
    if result.error is not None:
        return result.error
    errors = [item.error for item in result.items or [] if item.error is not None]
    if not errors:
        return None
    return errors[0].model_copy(update={"retryable": all(error.retryable for error in errors)})


class TagTask(Task):
    """The ``cliptag.tag`` task class: enqueues the webhook once the result is stored."""

    def on_success(self, retval: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        document = args[0] if args else None
        raw = document.get("webhook") if isinstance(document, dict) else None
        if raw is None:
            return
        try:
            delivery = WebhookDelivery(job_id=task_id, webhook=raw, queue=_queue(self))
        except ValidationError:
            return  # an invalid job, answered invalid_request: nowhere valid to deliver to
        try:
            if broker_redis().get(webhook_state_key(task_id)) is not None:
                return  # queued, delivered or dead-lettered by an earlier delivery of this job
            enqueue_webhook(delivery)
        except Exception as exc:  # Redis stayed away through every retry: say so loudly
            log.error("webhook_not_enqueued", job_id=task_id, error=shorten(str(exc)))


def _queue(task: Task) -> str:
    return (task.request.delivery_info or {}).get("routing_key") or settings.queue


@app.task(
    name=TASK_NAME,
    bind=True,
    base=TagTask,
    acks_late=True,
    max_retries=None,
    resultrepr_maxsize=RESULT_REPR_CHARS,
)
def tag(self: Task, job: Any) -> dict[str, Any]:
    """Run one job document (see ``producer.contract.JobRequest``) and return its result."""
    job_id = str(self.request.id)
    structlog.contextvars.bind_contextvars(job_id=job_id)
    try:
        try:
            request = parse_job(job, max_labels=settings.max_labels)
        except JobError as error:
            metadata = job.get("metadata") if isinstance(job, dict) else None
            result = error_result(job_id, error, metadata=metadata if isinstance(metadata, dict) else None)
            return _finish(self, job_id, job, result)
        retries = self.request.retries
        with delivery_counter().delivery(job_id, retries) as delivery:
            if delivery.number > 1 and (stored := stored_result(job_id)) is not None:
                log.info("job_duplicate", status=stored.get("status"), deliveries=delivery.number)
                return stored
            if delivery.unfinished >= settings.max_deliveries:
                return _finish(self, job_id, job, _poison(request, delivery))
            _crash_if_told(request)
            result = _run(request)
        result.attempts = retries + 1
        error = job_error(result)
        if error is not None and error.retryable and retries < settings.max_retries:
            log.info("job_retry", code=error.code.value, attempt=result.attempts)
            raise self.retry(countdown=retry_delay(retries))
        return _finish(self, job_id, job, result)
    finally:
        structlog.contextvars.unbind_contextvars("job_id")


def _run(request: JobRequest) -> JobResult:
    try:
        return Runtime.current().run(request)
    except Exception as exc:  # a bug: answered as a retryable internal error, never a raw traceback
        log.exception("job_crashed")
        error = JobError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {shorten(str(exc))}")
        return error_result(request.job_id, error, kind=request.kind, metadata=request.metadata)


def _poison(request: JobRequest, delivery: Delivery) -> JobResult:
    error = JobError(
        ErrorCode.POISON_MESSAGE,
        f"delivered {delivery.number} times, {delivery.unfinished} of them never finished "
        f"(the worker died); the limit is CLIPTAG_MAX_DELIVERIES={settings.max_deliveries}",
    )
    result = error_result(request.job_id, error, kind=request.kind, metadata=request.metadata)
    result.attempts = delivery.number - 1
    return result


def _crash_if_told(request: JobRequest) -> None:
    """TEST-ONLY fault injection (``CLIPTAG_TEST_CRASH_ON``): die as a decoder crash would."""
    if settings.test_crash_on and settings.test_crash_on in request.references:
        log.error("test_crash", reference=shorten(settings.test_crash_on))
        os._exit(TEST_CRASH_EXIT_CODE)


def _finish(task: Task, job_id: str, job: Any, result: JobResult) -> dict[str, Any]:
    """Dead-letter (and log) a job that failed for good; return the result document."""
    error = job_error(result)
    if error is not None:
        log.warning(
            "job_failed",
            code=error.code.value,
            message=error.message,
            attempts=result.attempts,
            dead_lettered=True,
        )
        dead_letters().add(
            DeadLetter(
                job_id=job_id,
                job=job,
                error=error,
                attempts=result.attempts,
                queue=_queue(task),
            )
        )
    for item in result.items or []:
        if item.error is not None:
            log.warning("image_failed", image=item.image, code=item.error.code.value)
    return result.to_json_dict()
