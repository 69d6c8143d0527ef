"""Answer queue messages that are not valid cliptag jobs, instead of dropping them or crashing.

A malformed message with a usable task id gets an ``invalid_request`` result under that id
(so the producer waiting on it learns why); one without is dead-lettered with its raw text
(``cliptag dlq``). Either way it is acknowledged and the worker goes on.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import redis
import structlog
from celery import Celery, states
from kombu.message import Message

from producer.contract import JOB_ID_PATTERN, ErrorInfo, error_result
from producer.dlq import DeadLetter, DeadLetterStore
from producer.errors import ErrorCode, JobError, shorten

log = structlog.get_logger("cliptag.worker")

MAX_DEAD_LETTER_CHARS = 65_536
"""Raw text kept per dead-lettered message; hostile messages may be huge."""


def usable_task_id(value: object) -> str | None:
    """``value`` when it is a job id the contract allows, else ``None``."""
    return value if isinstance(value, str) and re.match(JOB_ID_PATTERN, value) else None


def task_id_in_envelope(raw: str) -> str | None:
    """The task id in the headers of a raw (kombu JSON) envelope, when it has a usable one."""
    try:
        envelope = json.loads(raw)
    except ValueError:
        return None
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    return usable_task_id(headers.get("id")) if isinstance(headers, dict) else None


def task_id_of(message: Message) -> str | None:
    """The task id of a delivered message (protocol 2 header, else its correlation id)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    properties = message.properties if isinstance(message.properties, dict) else {}
    return usable_task_id(headers.get("id")) or usable_task_id(properties.get("correlation_id"))


class MalformedMessages:
    """Stores ``invalid_request`` results and dead letters for malformed messages.

    Args:
        app: the worker's Celery app: its result backend stores the answers, and the
            dead-letter store lives in its broker's Redis.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._dead_letters: DeadLetterStore | None = None

    def answer_raw(self, raw: str, reason: str) -> None:
        """Answer an envelope the transport could not even deliver (``raw`` is its text)."""
        self.answer(task_id_in_envelope(raw), raw, reason)

    def answer_message(self, message: Message, reason: str) -> None:
        """Answer a delivered message that is no valid task, then acknowledge it."""
        body = (
            message.body.decode("utf-8", "replace") if isinstance(message.body, bytes) else str(message.body)
        )
        self.answer(task_id_of(message), body, reason)
        if not message.acknowledged:
            try:
                message.ack()
            except Exception:  # a lost connection: the broker redelivers it later
                log.exception("malformed_message_not_acked", reason=reason)

    def answer(self, task_id: str | None, raw: str, reason: str) -> None:
        """Store ``invalid_request`` under ``task_id``, or dead-letter ``raw`` when there is none.

        Never raises: a failure to store is logged, since the worker must go on consuming.
        """
        error = JobError(ErrorCode.INVALID_REQUEST, reason)
        try:
            if task_id is not None:
                result = error_result(task_id, error).to_json_dict()
                self.app.backend.store_result(task_id, result, states.SUCCESS)
                log.warning("malformed_message", task_id=task_id, reason=reason)
                return
            letter = DeadLetter(
                job_id=f"raw-{uuid.uuid4().hex}",
                job=shorten(raw, MAX_DEAD_LETTER_CHARS),
                error=ErrorInfo(**error.to_dict()),
            )
            self.dead_letters().add(letter)
            log.warning("malformed_message", dead_letter=letter.job_id, reason=reason)
        except Exception:
            log.exception("malformed_message_unanswered", task_id=task_id, reason=reason, raw=shorten(raw))

    def dead_letters(self) -> DeadLetterStore:
        if self._dead_letters is None:
            self._dead_letters = DeadLetterStore(redis.Redis.from_url(self.app.conf.broker_url))
        return self._dead_letters


def describe(exc: BaseException) -> str:
    """``exc`` for a reason text: its type and its (shortened) message."""
    return f"{type(exc).__name__}: {shorten(str(exc), 200)}"


def body_shape_problem(body: Any, *, single_argument: bool) -> str | None:
    """Why a decoded protocol-2 body is not ``[args, kwargs, embed]``, or ``None``.

    Args:
        body: the decoded message body.
        single_argument: the task takes exactly one positional argument and no keywords.
    """
    if not (isinstance(body, list) and len(body) == 3):
        return "the message body is not a JSON list [args, kwargs, embed]"
    args, kwargs, embed = body
    if not (isinstance(args, list) and isinstance(kwargs, dict) and isinstance(embed, dict)):
        return "the message body is not [args (list), kwargs (object), embed (object)]"
    if single_argument and (len(args) != 1 or kwargs):
        return f"the task takes one positional argument, the job; got {len(args)} and {len(kwargs)} keywords"
    return None
