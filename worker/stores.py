"""The worker process's stored state: one client of the broker's Redis (made on first use), results."""

from __future__ import annotations

from functools import cache
from typing import Any

import redis
from celery import states

from producer.delivery import connect
from producer.dlq import DeadLetterStore
from worker.app import app, settings
from worker.deliveries import DeliveryCounter

OUTAGE_SECONDS = 120.0
"""How long job threads wait for an unreachable Redis before their job fails (as the result
backend does, with ``result_backend_always_retry``)."""


@cache
def broker_redis() -> redis.Redis:
    return connect(settings.redis_url, outage_seconds=OUTAGE_SECONDS)


@cache
def dead_letters() -> DeadLetterStore:
    return DeadLetterStore(broker_redis())


@cache
def delivery_counter() -> DeliveryCounter:
    return DeliveryCounter(broker_redis(), ttl=settings.result_ttl)


def stored_result(job_id: str) -> dict[str, Any] | None:
    """The job's final result document in the backend, or ``None`` while it has none.

    Read past the backend's cache: ``cliptag dlq retry`` may have cleared the result.
    """
    meta = app.backend.get_task_meta(job_id, cache=False)
    result = meta.get("result")
    if meta.get("status") == states.SUCCESS and isinstance(result, dict) and "status" in result:
        return result
    return None
