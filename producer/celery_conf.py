"""The Celery configuration both sides share: JSON only, late acks, bounded redelivery."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.config import QueueSettings
from producer.contract import TASK_NAME

WEBHOOK_TASK_NAME = "cliptag.deliver_webhook"
WEBHOOK_QUEUE = "cliptag-webhooks"


def redis_transport_options(visibility_timeout: int) -> dict[str, Any]:
    """kombu Redis options that hand a dead worker's unacknowledged messages on quickly.

    kombu restores a message unacknowledged for ``visibility_timeout`` seconds on its next
    sweep; by default a sweep scans only every 10th tick of 10 s, which would add up to
    100 s. Here every tick scans, ticks come every ``visibility_timeout / 6`` (at most 10 s),
    and a sweeper that died holding the sweep mutex blocks others for at most the timeout:
    recovery takes at most ``visibility_timeout`` plus one tick (100 s at the default 90 s).
    Live workers keep their own messages from being restored (``worker.visibility``).
    """
    return {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": max(1, min(10, visibility_timeout // 6)),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": visibility_timeout,
    }


PUBLISH_RETRY_POLICY = {"max_retries": 64, "interval_start": 0, "interval_step": 0.5, "interval_max": 2.0}
"""How long a message Celery sends (a job's retry, a webhook delivery) waits out a Redis
outage: about two minutes, as a stored result does. Celery's default gives up after 0.6 s,
and a retry that could not be sent rejected its job's message: no result, no dead letter."""


def celery_config(settings: QueueSettings) -> dict[str, Any]:
    """Celery settings for ``settings``; see the README's "Wire contract" for why each is set."""
    transport = redis_transport_options(settings.visibility_timeout)
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.backend_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_ttl,
        "result_extended": True,
        "result_cache_max": -1,  # `cliptag dlq retry` replaces results: never serve a cached one
        "result_backend_always_retry": True,  # a result waits out a Redis outage, never lost
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_default_queue": settings.queue,
        "task_routes": {
            TASK_NAME: {"queue": settings.queue},
            WEBHOOK_TASK_NAME: {"queue": WEBHOOK_QUEUE},
        },
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "enable_utc": True,
    }


def make_celery(settings: QueueSettings, *, main: str = "cliptag") -> Celery:
    """A Celery app configured for cliptag; producers use it only to send and read."""
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app
