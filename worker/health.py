"""The worker's side of readiness: a heartbeat file rewritten every few seconds.

A heartbeat says the model is loaded (the worker writes none before), whether the broker
answered a ping just now, and when; ``cliptag health`` (:mod:`producer.readiness`) turns the
files of a host into exit code 0 or 1 for a container healthcheck. A worker that stops
removes its file; one that dies leaves a file that goes stale.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
import structlog

from producer.errors import shorten
from producer.readiness import Heartbeat, heartbeat_path, write_heartbeat

log = structlog.get_logger("cliptag.worker")


class HeartbeatWriter:
    """Writes one worker's heartbeat from a daemon thread.

    Args:
        directory: the health directory (``CLIPTAG_HEALTH_DIR``).
        node: the Celery node name; the file is ``<directory>/<node>.json``.
        model: the checkpoint served.
        device: where it runs.
        broker: a client of the broker, pinged at each beat.
        model_loaded: says whether the model is (still) loaded.
        interval_s: seconds between beats (``CLIPTAG_HEALTH_INTERVAL``).
    """

    def __init__(
        self,
        *,
        directory: Path,
        node: str,
        model: str,
        device: str,
        broker: redis.Redis,
        model_loaded: Callable[[], bool],
        interval_s: float = 10.0,
    ) -> None:
        self.directory = directory
        self.node = node
        self.model = model
        self.device = device
        self.broker = broker
        self.model_loaded = model_loaded
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cliptag-heartbeat", daemon=True)

    def start(self) -> HeartbeatWriter:
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and remove the file: a stopped worker is not a stuck one."""
        self._stop.set()
        self._thread.join(self.interval_s + 5)
        heartbeat_path(self.directory, self.node).unlink(missing_ok=True)

    def beat(self) -> Heartbeat:
        """Ping the broker and write one heartbeat."""
        try:
            broker_ok, broker_error = bool(self.broker.ping()), None
        except redis.RedisError as exc:
            broker_ok, broker_error = False, shorten(f"{type(exc).__name__}: {exc}")
        heartbeat = Heartbeat(
            node=self.node,
            pid=os.getpid(),
            model=self.model,
            device=self.device,
            model_loaded=self.model_loaded(),
            broker_ok=broker_ok,
            broker_error=broker_error,
            interval_s=self.interval_s,
            updated_at=time.time(),
        )
        write_heartbeat(self.directory, heartbeat)
        return heartbeat

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OSError as exc:  # a full or read-only disk must not kill the worker
                log.warning("heartbeat_failed", error=shorten(str(exc)))
