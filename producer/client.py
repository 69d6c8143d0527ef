"""The Python producer: enqueue jobs and read their results. Imports neither torch nor the worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.utils.encoding import bytes_to_str
from redis.commands.core import Script

from producer.backfill import chunked
from producer.celery_conf import WEBHOOK_QUEUE, WEBHOOK_TASK_NAME, make_celery
from producer.config import QueueSettings
from producer.contract import JobRequest, JobResult, parse_job
from producer.delivery import (
    WebhookDelivery,
    claim_key,
    connect,
    delivery_state_keys,
    webhook_state_key,
)
from producer.dlq import DeadLetter, DeadLetterStore
from producer.errors import ErrorCode, JobError, JobFailed, JobTimeout, shorten
from producer.wire import MARK_AND_ENQUEUE, task_message


class Job:
    """A handle on an enqueued job.

    Attributes:
        id: the job id (also the Celery task id).
        request: the validated job document, when this handle enqueued it (``None`` when the
            id was taken already: the first submission's document is the one that runs).
    """

    def __init__(self, client: Client, job_id: str, request: JobRequest | None = None) -> None:
        self.client = client
        self.id = job_id
        self.request = request

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def _async(self) -> AsyncResult:
        return AsyncResult(self.id, app=self.client.celery)

    def state(self) -> str:
        """Celery's state of the job: ``PENDING``, ``STARTED``, ``RETRY`` or ``SUCCESS``."""
        return self._async.state

    def ready(self) -> bool:
        """Whether the result is in the backend."""
        return self._async.ready()

    def result(self, timeout: float | None = None, *, raise_on_error: bool = True) -> JobResult:
        """Wait for the result.

        Args:
            timeout: seconds to wait; ``None`` waits for ever.
            raise_on_error: raise :class:`JobFailed` (with the error code) for error results.

        Raises:
            JobTimeout: no result within ``timeout``.
            JobFailed: the job failed and ``raise_on_error`` is set.
        """
        try:
            payload = self._async.get(timeout=timeout, propagate=False, interval=0.05)
        except (TimeoutError, CeleryTimeout):  # Celery's own is no subclass of the built-in
            raise JobTimeout(f"job {self.id} has no result after {timeout} s") from None
        if not isinstance(payload, dict):
            payload = {
                "job_id": self.id,
                "status": "error",
                "error": {
                    "code": ErrorCode.INTERNAL.value,
                    "message": f"the worker raised {payload!r}",
                    "retryable": True,
                },
            }
        result = JobResult.model_validate(payload)
        if raise_on_error and result.status == "error" and result.error is not None:
            raise JobFailed(
                self.id,
                result.error.code,
                result.error.message,
                retryable=result.error.retryable,
                result=payload,
            )
        return result


@dataclass(frozen=True)
class Settling:
    """A dead letter sent again: removed, and ``forget`` (keys of the earlier run) deleted,
    in the same atomic step that enqueues it."""

    letter: DeadLetter
    forget: tuple[str, ...] = ()


class Client:
    """Enqueues cliptag jobs into Redis.

    Args:
        redis_url: the broker; defaults to ``CLIPTAG_REDIS_URL``.
        queue: the queue to send to; defaults to ``CLIPTAG_QUEUE`` (``cliptag``).
        settings: full settings instead of the two above.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        queue: str | None = None,
        settings: QueueSettings | None = None,
    ) -> None:
        overrides = {k: v for k, v in {"redis_url": redis_url, "queue": queue}.items() if v}
        self.settings = settings or QueueSettings(**overrides)
        self.celery = make_celery(self.settings, main="cliptag-producer")

    @cached_property
    def redis(self) -> redis.Redis:
        """A client of the broker's Redis (claims, delivery state, dead letters)."""
        return connect(self.settings.redis_url)

    @property
    def dead_letters(self) -> DeadLetterStore:
        return DeadLetterStore(self.redis)

    def close(self) -> None:
        self.celery.close()
        if "redis" in self.__dict__:
            self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def submit(self, image: str, labels: Sequence[str] | None = None, **options: Any) -> Job:
        """Enqueue one image with its labels; ``options`` are the other job fields."""
        return self.submit_job(_document({"image": image}, labels, options))

    def submit_job(self, job: JobRequest | dict[str, Any], *, queue: str | None = None) -> Job:
        """Validate and enqueue a whole job document (any kind).

        Idempotent by job id: while a job of the same id is pending or its result is kept
        (``CLIPTAG_RESULT_TTL``), submitting it again enqueues nothing and returns a handle
        on that job (the first submission's document is the one that runs).
        """
        document = (
            job.model_dump(mode="json", exclude_none=True) if isinstance(job, JobRequest) else dict(job)
        )
        document.setdefault("submitted_at", time.time())
        request = parse_job(document, max_labels=self.settings.max_labels)
        enqueued = self._enqueue(request, queue or self.settings.queue, only_if_unclaimed=True)
        return Job(self, request.job_id, request if enqueued else None)

    @cached_property
    def _mark_and_enqueue(self) -> Script:
        return self.redis.register_script(MARK_AND_ENQUEUE)

    def _enqueue(
        self, request: JobRequest, queue: str, *, only_if_unclaimed: bool, settles: Settling | None = None
    ) -> bool:
        """Claim the job id and push the job's message onto ``queue``, in one atomic step;
        with ``only_if_unclaimed``, nothing happens when the id is claimed already."""
        return self._push(
            task_message(request.model_dump(mode="json", exclude_none=True), queue=queue),
            queue,
            mark=(claim_key(request.job_id), queue),
            only_if_unmarked=only_if_unclaimed,
            settles=settles,
        )

    def _push(
        self,
        message: str,
        queue: str,
        *,
        mark: tuple[str, str],
        only_if_unmarked: bool,
        settles: Settling | None,
    ) -> bool:
        """Set ``mark`` (key, value) for the result TTL, push ``message`` onto ``queue`` and
        settle a dead letter: all or nothing (:data:`MARK_AND_ENQUEUE`). True when pushed."""
        keys = [mark[0], queue]
        args: list[str | int] = [mark[1], self.settings.result_ttl, message, int(only_if_unmarked)]
        if settles is not None:
            store = self.dead_letters
            keys += [store.entries_key, store.index_key, *settles.forget]
            args.append(store.field(settles.letter.kind, settles.letter.job_id))
        return bool(self._mark_and_enqueue(keys=keys, args=args))

    def requeue(self, letter: DeadLetter) -> bool:
        """Send a dead-lettered job (or webhook delivery) again, under its own job id.

        A job letter runs again from scratch: its stored result, delivery counts and
        webhook state are cleared, so whoever waits on the id gets the new result, and its
        ``expires_at`` is dropped (sending it again is the decision to run it now). A
        webhook letter is POSTed again with the result still in the backend. Either way the
        letter is removed in the same atomic step that clears and enqueues; a new failure
        records a new letter.

        Returns:
            False when the letter was gone by then (sent again or purged by someone else):
            nothing was sent or cleared.

        Raises:
            JobError: ``invalid_request`` when the letter holds no valid job (a raw message).
        """
        if letter.kind == "webhook":
            delivery = WebhookDelivery.model_validate(letter.job)
            fresh = WebhookDelivery(job_id=delivery.job_id, webhook=delivery.webhook, queue=delivery.queue)
            message = task_message(
                fresh.model_dump(mode="json"),
                queue=WEBHOOK_QUEUE,
                task=WEBHOOK_TASK_NAME,
                task_id=str(uuid.uuid4()),
            )
            mark = (webhook_state_key(fresh.job_id), "queued")
            settling = Settling(letter)
            return self._push(message, WEBHOOK_QUEUE, mark=mark, only_if_unmarked=False, settles=settling)
        if not isinstance(letter.job, dict):
            raise JobError(
                ErrorCode.INVALID_REQUEST,
                f"dead letter {letter.job_id!r} holds no job document, only {shorten(letter.job, 60)!r}",
            )
        document = {key: value for key, value in letter.job.items() if key != "expires_at"}
        document |= {"job_id": letter.job_id, "submitted_at": time.time()}
        request = parse_job(document, max_labels=self.settings.max_labels)
        return self._enqueue(
            request,
            letter.queue or self.settings.queue,
            only_if_unclaimed=False,
            settles=Settling(letter, forget=self._job_state_keys(request.job_id)),
        )

    def _job_state_keys(self, job_id: str) -> tuple[str, ...]:
        """The broker keys a job's earlier run left: delivery counts, webhook state and, when
        results live in the broker's Redis (the default), the stored result. A result in a
        Redis of its own is forgotten here, just before the atomic step."""
        keys = delivery_state_keys(job_id)
        if self.settings.backend_url != self.settings.redis_url:
            AsyncResult(job_id, app=self.celery).forget()
            return keys
        return (*keys, bytes_to_str(self.celery.backend.get_key_for_task(job_id)))

    def submit_many(
        self,
        images: Iterable[str],
        labels: Sequence[str] | None = None,
        *,
        bulk_size: int = 0,
        **options: Any,
    ) -> Iterator[Job]:
        """Enqueue many images with one label set, lazily (for backfills of any size).

        Args:
            images: the references.
            labels: the labels every image is scored against.
            bulk_size: 0 sends one job per image; N > 0 sends bulk jobs of up to N images.
            options: the other job fields, shared by every job (not ``job_id``: every job
                after the first would be the first one again).

        Raises:
            JobError: ``invalid_request`` for a ``job_id`` in ``options``.
        """
        if "job_id" in options:
            raise JobError(ErrorCode.INVALID_REQUEST, "submit_many takes no job_id: each job gets its own")
        if bulk_size <= 0:
            for image in images:
                yield self.submit(image, labels, **options)
            return
        for chunk in chunked(images, bulk_size):
            yield self.submit_job(_document({"images": chunk}, labels, options))

    def job(self, job_id: str) -> Job:
        """A handle on an existing job, e.g. from another process."""
        return Job(self, job_id)


def _document(
    images: dict[str, Any], labels: Sequence[str] | None, options: dict[str, Any]
) -> dict[str, Any]:
    document = {**images, **options}
    if labels is not None:  # a lone string is refused as one, not tagged letter by letter
        document["labels"] = labels if isinstance(labels, str) else list(labels)
    return document
