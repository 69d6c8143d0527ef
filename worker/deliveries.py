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
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from producer.delivery import deliveries_key

COUNT_IF_FIRST = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


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

    def _count(self, job_id: str, retries: int) -> int:
        key = deliveries_key(job_id)
        pipe = self.client.pipeline()
        pipe.hincrby(key, str(retries), 1)
        pipe.expire(key, self.ttl)
        count, _ = pipe.execute()
        return int(count)

    def _count_if_first(self, job_id: str, retries: int) -> int:
        """Count the delivery and return 1 if it is the attempt's first, else 0 (not counted)."""
        return int(self._first_script(keys=[deliveries_key(job_id)], args=[str(retries), self.ttl]))

    @contextmanager
    def delivery(self, job_id: str, retries: int) -> Iterator[int]:
        """Count this delivery of ``job_id`` (attempt ``retries``) and yield the count.

        A first delivery costs one round trip. A suspect (counted before) first waits for
        the process's suspect lock and holds it until the block ends.
        """
        if self._count_if_first(job_id, retries):
            yield 1
            return
        with self._suspects:
            yield self._count(job_id, retries)
