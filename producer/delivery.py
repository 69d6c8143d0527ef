"""Delivery bookkeeping that producers and workers share: Redis key names and the webhook document.

Everything here lives in the broker's Redis and expires with the result (``CLIPTAG_RESULT_TTL``):

- ``cliptag:claim:{job_id}``: set (``SET NX``) by the client that first submits a job id, so a
  second submission of the same id while the first is pending or done enqueues nothing.
- ``cliptag:deliveries:{job_id}``: a hash ``{retry number: deliveries}`` counted by workers;
  a delivery beyond ``CLIPTAG_MAX_DELIVERIES`` is dead-lettered as ``poison_message``.
- ``cliptag:webhook:{job_id}``: the job's webhook state, ``queued``, ``delivered`` or ``failed``;
  a job whose webhook is ``delivered`` is never POSTed again.
- ``cliptag:webhook-lock:{job_id}``: held while one delivery POSTs, so two copies of a
  delivery (after a crash) do not POST at the same time.
"""

from __future__ import annotations

import time
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from producer.contract import JOB_ID_PATTERN, Webhook

KEY_PREFIX = "cliptag"

WebhookState = Literal["queued", "delivered", "failed"]


def claim_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:claim:{job_id}"


def deliveries_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:deliveries:{job_id}"


def webhook_state_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:webhook:{job_id}"


def webhook_lock_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:webhook-lock:{job_id}"


CONNECT_TIMEOUT_SECONDS = 5.0
REPLY_TIMEOUT_SECONDS = 30.0
"""No command of these clients blocks on purpose: a Redis that accepts connections and never
answers must not hang a worker thread or ``cliptag dlq`` for ever."""


def connect(url: str, *, outage_seconds: float = 0.0) -> redis.Redis:
    """A redis-py client for ``url`` that answers ``str``.

    Args:
        url: the Redis URL.
        outage_seconds: how long a command keeps retrying while Redis is unreachable (a
            worker waits out a Redis restart instead of failing the job); 0 keeps redis-py's
            short default.
    """
    timeouts = {"socket_connect_timeout": CONNECT_TIMEOUT_SECONDS, "socket_timeout": REPLY_TIMEOUT_SECONDS}
    if outage_seconds <= 0:
        return redis.Redis.from_url(url, decode_responses=True, **timeouts)
    retry = Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=int(outage_seconds) + 1)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **timeouts,
    )


def delivery_state_keys(job_id: str) -> tuple[str, ...]:
    """The keys of ``job_id``'s delivery counts and webhook state (cleared before it runs again)."""
    return deliveries_key(job_id), webhook_state_key(job_id), webhook_lock_key(job_id)


class WebhookDelivery(BaseModel):
    """The one positional argument of ``cliptag.deliver_webhook``: POST a job's stored result.

    The result itself is read from the result backend at delivery time, so the message
    stays small and the result is sent exactly as stored.

    Attributes:
        job_id: the job whose result is delivered.
        webhook: where to POST it and which key signs it.
        queue: the job's queue (dead letters record it, for ``cliptag dlq retry``).
        attempt: this attempt's number, from 1.
        first_attempt_at: unix time of the first attempt.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    webhook: Webhook
    queue: str | None = None
    attempt: int = Field(default=1, ge=1)
    first_attempt_at: float = Field(default_factory=time.time)
