"""The dead-letter store: jobs (and webhook deliveries) that failed for good, kept in Redis.

Each entry keeps the original job document, the error, the number of attempts and
timestamps, so an operator can inspect it (``cliptag dlq``) and requeue it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from producer.contract import ErrorInfo

DLQ_PREFIX = "cliptag:dlq"

LetterKind = Literal["job", "webhook"]


class DeadLetter(BaseModel):
    """One dead-lettered job or webhook delivery.

    Attributes:
        job_id: the job's id; for a message that carried none, a generated ``raw-…`` id.
        kind: ``job`` (the job failed) or ``webhook`` (its result could not be delivered).
        job: the original job document, or the raw message text when it was not JSON; for a
            ``webhook`` letter, the delivery document (``producer.delivery.WebhookDelivery``).
        error: the final error.
        attempts: how many times it was tried (deliveries that died, for ``poison_message``).
        queue: the queue the job came from (``cliptag dlq retry`` sends it back there);
            ``None`` when unknown.
        first_failed_at, last_failed_at: unix times.
    """

    job_id: str
    kind: LetterKind = "job"
    job: Any
    error: ErrorInfo
    attempts: int = 1
    queue: str | None = None
    first_failed_at: float = Field(default_factory=time.time)
    last_failed_at: float = Field(default_factory=time.time)


class DeadLetterStore:
    """Dead letters in Redis: a hash of entries by ``kind:job_id`` and a time-ordered index.

    Args:
        client: a redis-py client (``decode_responses`` either way).
        prefix: the key prefix; one deployment shares one prefix.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = DLQ_PREFIX) -> None:
        self.client = client
        self.entries_key = f"{prefix}:entries"
        self.index_key = f"{prefix}:index"

    @staticmethod
    def field(kind: LetterKind, job_id: str) -> str:
        """The letter's field in the entries hash and member of the index."""
        return f"{kind}:{job_id}"

    def add(self, letter: DeadLetter) -> None:
        """Record ``letter``; a second failure of the same job updates it and keeps first_failed_at."""
        field = self.field(letter.kind, letter.job_id)
        previous = self.get(letter.job_id, kind=letter.kind)
        if previous is not None:
            letter = letter.model_copy(update={"first_failed_at": previous.first_failed_at})
        pipe = self.client.pipeline()
        pipe.hset(self.entries_key, field, letter.model_dump_json())
        pipe.zadd(self.index_key, {field: letter.last_failed_at})
        pipe.execute()

    def get(self, job_id: str, *, kind: LetterKind = "job") -> DeadLetter | None:
        raw = self.client.hget(self.entries_key, self.field(kind, job_id))
        return None if raw is None else DeadLetter.model_validate(json.loads(raw))

    def list(
        self, *, code: str | None = None, kind: LetterKind | None = None, queue: str | None = None
    ) -> Iterator[DeadLetter]:
        """Entries oldest first, optionally only those with error ``code``, of ``kind``, from ``queue``."""
        for field in self.client.zrange(self.index_key, 0, -1):
            raw = self.client.hget(self.entries_key, field)
            if raw is None:
                continue
            letter = DeadLetter.model_validate(json.loads(raw))
            if (
                (code is None or letter.error.code == code)
                and (kind is None or letter.kind == kind)
                and (queue is None or letter.queue == queue)
            ):
                yield letter

    def remove(self, job_id: str, *, kind: LetterKind = "job") -> bool:
        """Delete one entry; whether it was there."""
        field = self.field(kind, job_id)
        pipe = self.client.pipeline()
        pipe.hdel(self.entries_key, field)
        pipe.zrem(self.index_key, field)
        removed, _ = pipe.execute()
        return bool(removed)

    def count(self, *, queue: str | None = None) -> int:
        """How many entries there are (only those from ``queue`` when given)."""
        if queue is None:
            return int(self.client.zcard(self.index_key))
        return sum(1 for _ in self.list(queue=queue))
