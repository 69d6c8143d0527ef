"""Poison-message detection: count each job's deliveries in Redis, isolate redelivered ones.

A delivery that never finishes (the worker process died on it) leaves its count behind,
so a job that kills every worker it reaches is recognised after
``CLIPTAG_MAX_DELIVERIES`` deliveries instead of looping for ever.

Counts are kept per retry number (a retry is a new message with a fresh count) in the
hash ``producer.delivery.deliveries_key(job_id)``.

A crash takes every job in flight in that process down with it, so counting alone
would let a poison job drag its batch-mates into the dead-letter queue. Hence a job
that was delivered before without finishing (a *suspect*) runs alone among the
suspects of its process: its delivery is counted only once it holds the suspect lock,
so the others wait uncounted, and a crash while it runs is charged to it alone (and to
fresh jobs, which become suspects with one count). Innocent suspects finish one after
the other; the poison job reaches the limit.

A suspect's finish is recorded (field ``"<retry>:finished"``) before it lets go of the
lock. Its result is stored and its message acknowledged only after that, once the task
returns; a crash in between, by the next suspect, must not be charged to it. So the
limit applies to deliveries that never finished, not to deliveries.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import structlog

from producer.delivery import deliveries_key
from producer.errors import shorten

log = structlog.get_logger("cliptag.worker")

COUNT_IF_FIRST = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """One delivery of one attempt of a job.

    Attributes:
        number: which delivery of the attempt this is (1 for the first).
        unfinished: earlier deliveries of the attempt that never finished (their worker died).
    """

    number: int
    unfinished: int


class DeliveryCounter:
    """Counts deliveries of jobs in Redis; shared by the job threads of one worker process.

    Args:
        client: the broker's Redis.
        ttl: seconds the counts are kept after the last delivery (the result TTL).
    """

    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.client = client
        self.ttl = ttl
        self._suspects = threading.Lock()
        self._first_script = client.register_script(COUNT_IF_FIRST)

    def _count(self, job_id: str, retries: int) -> Delivery:
        key = deliveries_key(job_id)
        pipe = self.client.pipeline()
        pipe.hincrby(key, str(retries), 1)
        pipe.hget(key, _finished_field(retries))
        pipe.expire(key, self.ttl)
        number, finished, _ = pipe.execute()
        return Delivery(number=int(number), unfinished=int(number) - 1 - int(finished or 0))

    def _count_if_first(self, job_id: str, retries: int) -> int:
        """Count the delivery and return 1 if it is the attempt's first, else 0 (not counted)."""
        return int(self._first_script(keys=[deliveries_key(job_id)], args=[str(retries), self.ttl]))

    @contextmanager
    def delivery(self, job_id: str, retries: int) -> Iterator[Delivery]:
        """Count this delivery of ``job_id`` (attempt ``retries``) and yield it.

        A first delivery costs one round trip. A suspect (counted before) first waits for
        the process's suspect lock, and holds it until the block ends and its finish is
        recorded (whether the block returned or raised: only a dead process does neither).
        """
        if self._count_if_first(job_id, retries):
            yield Delivery(number=1, unfinished=0)
            return
        with self._suspects:
            try:
                yield self._count(job_id, retries)
            finally:
                self._record_finish(job_id, retries)

    def _record_finish(self, job_id: str, retries: int) -> None:
        """Best effort: without the record (Redis away), a crash before this job's result is
        stored would be charged to it too, as before there was a record at all."""
        try:
            self.client.hincrby(deliveries_key(job_id), _finished_field(retries), 1)
        except redis.RedisError as exc:
            log.warning("delivery_finish_not_recorded", job_id=job_id, error=shorten(str(exc)))


def _finished_field(retries: int) -> str:
    return f"{retries}:finished"
