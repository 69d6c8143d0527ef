"""Worker readiness as files on the worker's host: the heartbeat format and its verdict.

Every worker process writes ``<health dir>/<node name>.json`` every few seconds once its
model is loaded and it consumes (:mod:`worker.health`); ``cliptag health`` reads them here,
without importing the worker, so a container healthcheck stays light.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError

DEFAULT_HEALTH_DIR = Path(tempfile.gettempdir()) / "cliptag-health"
STALE_AFTER_INTERVALS = 3
"""A heartbeat older than this many of its own intervals means the worker is stuck or gone."""


class Heartbeat(BaseModel):
    """One worker process's last report about itself.

    Attributes:
        node: the Celery node name (``gpu0@host``).
        pid: the worker's process id.
        model: the checkpoint it serves.
        device: where the model runs (``cuda:0``, ``cpu``).
        model_loaded: whether its model is loaded and its batcher runs.
        broker_ok: whether its last ping of the broker was answered.
        broker_error: why the ping failed, when it did.
        interval_s: seconds between heartbeats.
        updated_at: unix time of this heartbeat.
    """

    node: str
    pid: int
    model: str
    device: str
    model_loaded: bool
    broker_ok: bool
    broker_error: str | None = None
    interval_s: float
    updated_at: float

    def problem(self, *, now: float | None = None) -> str | None:
        """Why this worker is not ready, or ``None`` when it is."""
        age = (time.time() if now is None else now) - self.updated_at
        if age > STALE_AFTER_INTERVALS * self.interval_s:
            return f"no heartbeat for {age:.1f} s (process {self.pid} stuck or gone)"
        if not self.model_loaded:
            return "model not loaded"
        if not self.broker_ok:
            return f"broker unreachable: {self.broker_error}"
        return None


def heartbeat_path(directory: Path, node: str) -> Path:
    """Where node ``node`` writes its heartbeat."""
    return directory / f"{node.replace('/', '_')}.json"


def write_heartbeat(directory: Path, heartbeat: Heartbeat) -> Path:
    """Write ``heartbeat`` atomically (a reader never sees half a file); its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = heartbeat_path(directory, heartbeat.node)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(heartbeat.model_dump_json(), encoding="utf-8")
    os.replace(partial, path)
    return path


def check_workers(directory: Path, *, now: float | None = None) -> dict[str, str | None]:
    """Each worker that wrote a heartbeat in ``directory``: its problem, or ``None`` when ready.

    An unreadable heartbeat file is reported under its file name.
    """
    verdicts: dict[str, str | None] = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            heartbeat = Heartbeat.model_validate_json(path.read_bytes())
        except FileNotFoundError:  # its worker stopped (and removed it) meanwhile
            continue
        except (OSError, ValidationError) as exc:
            verdicts[path.name] = f"unreadable heartbeat: {type(exc).__name__}"
            continue
        verdicts[heartbeat.node] = heartbeat.problem(now=now)
    return verdicts
