"""What an operator asks of a running deployment: queue depths and the live workers' own reports.

Reads Redis directly and asks workers through Celery's remote control (the ``cliptag_stats``
inspect command that every cliptag worker answers, see :mod:`worker.observe`). Imports
neither torch nor the worker.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

PRIORITY_SEPARATOR = "\x06\x16"
"""kombu's Redis transport keeps priority ``p > 0`` messages of queue ``q`` in list ``q + SEP + p``."""
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED_KEY = "unacked"
"""kombu's hash of messages delivered to a worker and not yet acknowledged (all queues)."""
STATS_COMMAND = "cliptag_stats"


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` (all priorities), not counting those a worker holds."""
    keys = [queue, *(f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS[1:])]
    pipe = client.pipeline()
    for key in keys:
        pipe.llen(key)
    return int(sum(pipe.execute()))


def unacked_count(client: redis.Redis) -> int:
    """Messages held by workers (prefetched or running) and not yet acknowledged."""
    return int(client.hlen(UNACKED_KEY))


def live_workers(app: Celery, *, timeout: float = 1.0) -> dict[str, dict[str, Any]]:
    """Each worker that answered within ``timeout`` seconds, by node name, with its report.

    A worker that is not a cliptag worker (it does not know the command) is listed with an
    ``error`` entry instead of a report.
    """
    replies = app.control.broadcast(STATS_COMMAND, reply=True, timeout=timeout) or []
    workers: dict[str, dict[str, Any]] = {}
    for reply in replies:
        for node, report in reply.items():
            workers[node] = report if isinstance(report, dict) else {"error": str(report)}
    return dict(sorted(workers.items()))
