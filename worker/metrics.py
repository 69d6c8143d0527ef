"""Prometheus metrics of one worker process, served over HTTP on ``CLIPTAG_METRICS_PORT``.

Fed by the batcher (every forward pass, :meth:`WorkerMetrics.observe_batch`) and by the
Celery task signals (every finished job, :meth:`WorkerMetrics.observe_job`, see
:mod:`worker.observe`); label-cache counters, queue depths and the dead-letter count are
read when Prometheus scrapes. Every process has its own registry and port (the
``--gpus`` supervisor gives each child ``port + index``), so no multiprocess mode is needed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import redis
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from producer.dlq import DeadLetterStore
from producer.errors import ConfigError
from producer.ops import queue_depth
from worker.batcher import BatchStats
from worker.engine import ClipEngine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
JOB_STAGES = ("queue_wait", "fetch", "preprocess", "total")
"""Per-image timings of a job result that become ``cliptag_stage_seconds{stage=…}``."""


class RateWindow:
    """Counts of events over the last ``window_s`` seconds (thread-safe).

    Args:
        window_s: how far back :meth:`per_second` and :meth:`count` look.
        clock: the monotonic clock (injectable for unit tests).
    """

    def __init__(self, *, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, count: int = 1) -> None:
        with self._lock:
            self._events.append((self._clock(), count))
            self._expire()

    def count(self) -> int:
        """Events within the window."""
        with self._lock:
            self._expire()
            return sum(n for _, n in self._events)

    def per_second(self) -> float:
        """Events per second over the window (over the uptime while it is shorter)."""
        span = min(self.window_s, max(self._clock() - self._started, 1e-3))
        return self.count() / span

    def _expire(self) -> None:
        horizon = self._clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()


class WorkerMetrics:
    """The worker's metrics in a registry of their own.

    Args:
        registry: where they are registered; a fresh one with the process, platform and
            GC collectors when ``None``.
        window_s: the window of the ``images_per_second`` gauge and of the recent
            throughput ``cliptag status`` shows.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None, window_s: float = 60.0) -> None:
        if registry is None:
            registry = CollectorRegistry()
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                registry.register(collector)
        self.registry = registry
        self.images_recent = RateWindow(window_s=window_s)
        self.jobs_recent = RateWindow(window_s=window_s)
        self.jobs_done = Counter("cliptag_jobs_done", "Jobs answered ok.", ["kind"], registry=registry)
        self.jobs_failed = Counter(
            "cliptag_jobs_failed", "Jobs answered with an error, by error code.", ["code"], registry=registry
        )
        self.images_failed = Counter(
            "cliptag_images_failed",
            "Images of bulk jobs that failed, by error code.",
            ["code"],
            registry=registry,
        )
        self.images = Counter("cliptag_images", "Images through the model.", registry=registry)
        self.batch_size = Histogram(
            "cliptag_batch_size", "Images per forward pass.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.inference = Histogram(
            "cliptag_inference_seconds",
            "Wall time of one forward pass (both towers).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage = Histogram(
            "cliptag_stage_seconds",
            "Per-image time of a job's stages: queue_wait, fetch, preprocess, total.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.model_load = Gauge(
            "cliptag_model_load_seconds", "Seconds the model took to load.", registry=registry
        )
        Gauge(
            "cliptag_images_per_second", "Images through the model per second, recently.", registry=registry
        ).set_function(self.images_recent.per_second)

    def observe_batch(self, stats: BatchStats) -> None:
        """Count one forward pass of the batcher."""
        if stats.images:
            self.batch_size.observe(stats.images)
            self.images.inc(stats.images)
            self.images_recent.add(stats.images)
        self.inference.observe(stats.inference_ms / 1000.0)

    def observe_job(self, result: Mapping[str, Any]) -> None:
        """Count one finished job from its JSON result document."""
        self.jobs_recent.add()
        items: Sequence[Mapping[str, Any]] = result.get("items") or [result]
        for item in items:
            for stage, value in (item.get("timings_ms") or {}).items():
                if stage in JOB_STAGES:
                    self.stage.labels(stage=stage).observe(value / 1000.0)
        for item in result.get("items") or []:  # a bulk job's, whether some images succeeded or none
            if item.get("error"):
                self.images_failed.labels(code=item["error"]["code"]).inc()
        if result.get("status") == "ok":
            self.jobs_done.labels(kind=result.get("kind", "tag")).inc()
        else:
            self.jobs_failed.labels(code=_error_code(result, items)).inc()

    def watch(
        self,
        *,
        engine: ClipEngine,
        broker: redis.Redis,
        queues: Callable[[], Sequence[str]],
    ) -> None:
        """Also report, at each scrape, the label cache of ``engine`` and from ``broker`` the
        depth of the ``queues()`` this worker consumes and the dead-letter count."""
        self.registry.register(_ScrapeCollector(engine=engine, broker=broker, queues=queues))

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on ``port`` (all interfaces) from a daemon thread."""
        try:
            start_http_server(port, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"CLIPTAG_METRICS_PORT={port}: cannot listen ({exc.strerror})") from None


def _error_code(result: Mapping[str, Any], items: Sequence[Mapping[str, Any]]) -> str:
    """The job's error code; a failed bulk job has none of its own and takes its first image's."""
    for candidate in (result, *items):
        error = candidate.get("error")
        if error:
            return str(error["code"])
    return "unknown"


class _ScrapeCollector(Collector):
    """Metrics read when Prometheus scrapes: the engine's cache counters and Redis state."""

    def __init__(
        self, *, engine: ClipEngine, broker: redis.Redis, queues: Callable[[], Sequence[str]]
    ) -> None:
        self.engine = engine
        self.broker = broker
        self.queues = queues
        self.dead_letters = DeadLetterStore(broker)

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "cliptag_label_cache_hits", "Prompt embeddings served from the cache.", self.engine.cache_hits
        )
        yield CounterMetricFamily(
            "cliptag_label_cache_misses", "Prompt embeddings computed.", self.engine.cache_misses
        )
        up = GaugeMetricFamily("cliptag_broker_up", "Whether the broker answered this scrape.")
        try:
            depths = {queue: queue_depth(self.broker, queue) for queue in self.queues()}
            dead = self.dead_letters.count()
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily(
            "cliptag_queue_depth", "Messages waiting in a queue this worker consumes.", labels=["queue"]
        )
        for queue, value in depths.items():
            depth.add_metric([queue], value)
        yield depth
        yield GaugeMetricFamily("cliptag_dead_letters", "Entries in the dead-letter store.", dead)


METRICS = WorkerMetrics()
"""This process's metrics (one worker process, one model, one registry)."""
