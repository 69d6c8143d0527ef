"""The Celery task: one positional JSON object in, one JSON result out.

Every job ends as exactly one stored result: an ``ok`` result, or an ``error`` result
with a stable code. Transient errors are retried with exponential backoff first.
"""

from __future__ import annotations

import random
from typing import Any

import structlog
from celery import Task

from producer.contract import TASK_NAME, JobResult, error_result, parse_job
from producer.errors import JobError
from worker.app import app, settings
from worker.runtime import Runtime

log = structlog.get_logger("cliptag.worker")

RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 30.0


def retry_delay(retries: int) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base × 2^retries)]."""
    return random.uniform(0, min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2**retries))


@app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=None)
def tag(self: Task, job: Any) -> dict[str, Any]:
    """Run one job document (see ``producer.contract.JobRequest``) and return its result."""
    job_id = self.request.id
    try:
        request = parse_job(job, max_labels=settings.max_labels)
    except JobError as error:
        metadata = job.get("metadata") if isinstance(job, dict) else None
        result = error_result(str(job_id), error, metadata=metadata if isinstance(metadata, dict) else None)
        log.warning("job_failed", job_id=job_id, code=error.code.value, message=error.message)
        return result.to_json_dict()
    structlog.contextvars.bind_contextvars(job_id=request.job_id)
    try:
        result = Runtime.current().run(request)
        result.attempts = self.request.retries + 1
        if _should_retry(result, self.request.retries):
            log.info("job_retry", code=result.error.code.value, attempt=result.attempts)
            raise self.retry(countdown=retry_delay(self.request.retries))
        _log_outcome(result)
        return result.to_json_dict()
    finally:
        structlog.contextvars.unbind_contextvars("job_id")


def _should_retry(result: JobResult, retries: int) -> bool:
    return (
        result.status == "error"
        and result.error is not None
        and result.error.retryable
        and retries < settings.max_retries
    )


def _log_outcome(result: JobResult) -> None:
    if result.status == "error" and result.error is not None:
        log.warning("job_failed", code=result.error.code.value, message=result.error.message)
    for item in result.items or []:
        if item.error is not None:
            log.warning("image_failed", image=item.image, code=item.error.code.value)
