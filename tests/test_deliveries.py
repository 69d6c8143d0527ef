"""Poison-message counting against a real Redis, in process.

Each ``DeliveryCounter`` stands for one worker process. A process that dies on a job is a
delivery block entered and never left (the context managers are kept, so that nothing
closes them). ``test_crash_safety`` runs the same through real worker processes, where the
order of events below depends on timing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import pytest
import redis

from producer.delivery import deliveries_key
from worker.deliveries import Delivery, DeliveryCounter
from worker.processes import RedisServer


def test_a_suspect_that_finished_is_not_charged_for_the_next_suspects_crash(
    redis_server: RedisServer, queue_name: str
):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    innocent, poison = f"innocent-{queue_name}", f"poison-{queue_name}"
    never_left: list[AbstractContextManager[Delivery]] = []

    def die_during(counter: DeliveryCounter, job_id: str) -> Delivery:
        never_left.append(counter.delivery(job_id, 0))
        return never_left[-1].__enter__()

    # process 1 dies with both jobs in flight: both fresh, counted, never finished
    first = DeliveryCounter(client, ttl=600)
    assert die_during(first, innocent) == die_during(first, poison) == Delivery(number=1, unfinished=0)

    # process 2 runs the innocent suspect to its end, then the poison suspect kills it
    # before the innocent's result is stored and its message acknowledged
    second = DeliveryCounter(client, ttl=600)
    with second.delivery(innocent, 0) as delivery:
        assert delivery == Delivery(number=2, unfinished=1)
    assert die_during(second, poison) == Delivery(number=2, unfinished=1)

    # process 3: only the poison job has died twice
    third = DeliveryCounter(client, ttl=600)
    with third.delivery(innocent, 0) as delivery:
        assert delivery == Delivery(number=3, unfinished=1)
    with third.delivery(poison, 0) as delivery:
        assert delivery == Delivery(number=3, unfinished=2)
    with pytest.raises(RuntimeError), third.delivery(innocent, 0):
        raise RuntimeError("a block that raised did finish: its process lives")
    assert client.hgetall(deliveries_key(innocent)) == {"0": "4", "0:finished": "3"}

    # a retry is a new message: its count starts afresh
    with third.delivery(poison, 1) as delivery:
        assert delivery == Delivery(number=1, unfinished=0)
    assert len(never_left) == 3


def test_a_finish_redis_cannot_record_does_not_fail_the_job(
    redis_server: RedisServer, queue_name: str, monkeypatch: pytest.MonkeyPatch
):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    job_id = f"blip-{queue_name}"
    counter = DeliveryCounter(client, ttl=600)
    with counter.delivery(job_id, 0):
        pass  # the first delivery: fresh, no finish to record

    def unreachable(*_: object) -> int:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(client, "hincrby", unreachable)
    with counter.delivery(job_id, 0) as delivery:
        assert delivery == Delivery(number=2, unfinished=1)
    monkeypatch.undo()
    assert client.hgetall(deliveries_key(job_id)) == {"0": "2"}, "counted, its finish unrecorded"
    with counter.delivery(job_id, 0) as delivery:
        assert delivery == Delivery(number=3, unfinished=2), "the lock was let go all the same"
