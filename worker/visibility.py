"""Keep a live worker's messages from being handed to another worker.

With the Redis broker, kombu records every message it delivers in the ``unacked_index``
sorted set, scored with the delivery time, and any worker's periodic sweep puts a
message back on its queue once that score is older than the visibility timeout: that
is how a dead worker's messages come back. A live worker that simply holds a message
that long (a long bulk job, a retry waiting for its countdown, a slow webhook) would
lose it to a second worker and the job would run twice.

So every worker process refreshes, every quarter of the visibility timeout, the score of
each message it still holds (``ZADD XX``: only entries that are still there). Only
messages whose worker stopped refreshing them (it died) age past the timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
import structlog
from celery import Celery, signals

from producer.config import QueueSettings
from producer.delivery import connect

log = structlog.get_logger("cliptag.worker")

UNACKED_INDEX_KEY = "unacked_index"


def unacked_index_key(transport_options: dict[str, Any]) -> str:
    """The sorted set kombu's Redis transport scores unacknowledged messages in."""
    prefix = transport_options.get("global_keyprefix", "")
    return prefix + transport_options.get("unacked_index_key", UNACKED_INDEX_KEY)


def held_delivery_tags() -> list[str]:
    """Delivery tags of every message this worker process holds (running, waiting, scheduled)."""
    from celery.worker import state

    for _ in range(5):
        try:
            held = {
                *state.requests.values(),
                *state.active_requests,
                *state.reserved_requests,
                *state.scheduled_requests,
            }
            break
        except RuntimeError:  # a job thread changed a set while we copied it; copy again
            continue
    else:
        return []
    tags = (getattr(getattr(request, "message", None), "delivery_tag", None) for request in held)
    return [tag for tag in tags if isinstance(tag, str)]


class VisibilityHeartbeat:
    """A daemon thread refreshing the unacknowledged-message scores of this process.

    Args:
        client: the broker's Redis.
        key: the ``unacked_index`` key.
        interval: seconds between refreshes (well under the visibility timeout).
        tags: returns the delivery tags to refresh.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        key: str,
        interval: float,
        tags: Callable[[], list[str]] = held_delivery_tags,
    ) -> None:
        self.client = client
        self.key = key
        self.interval = interval
        self.tags = tags
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cliptag-visibility", daemon=True)

    def start(self) -> VisibilityHeartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 5)

    def refresh(self, tags: Iterable[str]) -> int:
        """Mark ``tags`` as delivered just now; how many were still unacknowledged."""
        now = time.time()
        mapping = dict.fromkeys(tags, now)
        if not mapping:
            return 0
        return int(self.client.zadd(self.key, mapping, xx=True, ch=True))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh(self.tags())
            except redis.RedisError as exc:  # Redis away: the next beat tries again
                log.warning("visibility_refresh_failed", error=str(exc))


def install(app: Celery, settings: QueueSettings) -> None:
    """Run a heartbeat in this worker process from ``worker_ready`` to ``worker_shutdown``."""
    heartbeat = VisibilityHeartbeat(
        connect(settings.redis_url),
        key=unacked_index_key(app.conf.broker_transport_options or {}),
        interval=max(0.5, settings.visibility_timeout / 4),
    )

    def start(**_: Any) -> None:
        heartbeat.start()

    def stop(**_: Any) -> None:
        heartbeat.stop()

    signals.worker_ready.connect(start, weak=False)
    signals.worker_shutdown.connect(stop, weak=False)
