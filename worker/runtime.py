"""The per-process state of a worker: one model, one pipeline, one batcher.

Created once in the worker's main process before it consumes (see :mod:`worker.app`)
and shared by every job thread.
"""

from __future__ import annotations

import time
from typing import ClassVar

import structlog

from producer.labelsets import LabelSetStore
from worker import observe
from worker.batcher import BatchStats
from worker.config import WorkerSettings
from worker.loading import load_clip
from worker.metrics import METRICS
from worker.pipeline import Pipeline

log = structlog.get_logger("cliptag.worker")


def log_batch(stats: BatchStats) -> None:
    log.info(
        "batch",
        batch_id=stats.batch_id,
        images=stats.images,
        items=stats.items,
        new_prompts=stats.new_prompts,
        inference_ms=round(stats.inference_ms, 2),
        oldest_wait_ms=round(stats.oldest_wait_ms, 2),
    )


def on_batch(stats: BatchStats) -> None:
    """After every forward pass: one log line, and the metrics."""
    log_batch(stats)
    METRICS.observe_batch(stats)


class Runtime:
    """Holder of the process's pipeline; :meth:`current` is what tasks use."""

    _pipeline: ClassVar[Pipeline | None] = None

    @classmethod
    def start(cls, settings: WorkerSettings) -> Pipeline:
        """Load the model and start the batcher (with a warm-up pass)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        started = time.perf_counter()
        loaded = load_clip(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.model_cache_dir,
            s3_endpoint_url=settings.s3_endpoint_url,
        )
        load_s = time.perf_counter() - started
        label_sets = LabelSetStore.from_url(settings.redis_url)
        pipeline = Pipeline(loaded, settings, label_sets=label_sets, on_batch=on_batch).start()
        log.info(
            "model_ready",
            model=settings.model,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            load_s=round(load_s, 3),
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            preprocess="exact" if settings.exact_preprocess else "fast",
            cpu_cores=pipeline.cores,
            decode_threads=pipeline.decode_threads,
            torch_threads=pipeline.engine.cpu_threads,
            image_tower={True: "traced", False: "eager", None: "on the first batch"}[pipeline.engine.traced],
        )
        cls._pipeline = pipeline
        observe.start(settings, pipeline, model_load_s=load_s, model_loaded=cls.loaded)
        return pipeline

    @classmethod
    def loaded(cls) -> bool:
        """Whether the model is loaded and not yet stopped."""
        return cls._pipeline is not None

    @classmethod
    def current(cls) -> Pipeline:
        if cls._pipeline is None:
            raise RuntimeError("the worker's model is not loaded (worker_init did not run)")
        return cls._pipeline

    @classmethod
    def stop(cls) -> None:
        if cls._pipeline is not None:
            cls._pipeline.stop()
            cls._pipeline = None
