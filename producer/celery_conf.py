"""The Celery configuration both sides share: JSON only, late acks, bounded redelivery."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.config import QueueSettings
from producer.contract import TASK_NAME

WEBHOOK_TASK_NAME = "cliptag.deliver_webhook"
WEBHOOK_QUEUE = "cliptag-webhooks"


def celery_config(settings: QueueSettings) -> dict[str, Any]:
    """Celery settings for ``settings``; see the README's "Wire contract" for why each is set."""
    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.backend_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_ttl,
        "result_extended": True,
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
