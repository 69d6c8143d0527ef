"""Gathers work from many jobs into shared forward passes, on one dedicated thread.

A job thread submits its preprocessed pixels and the prompts it needs and waits on a
future. The batcher thread takes everything waiting (up to ``max_batch`` images, and
for at most ``max_wait_ms`` after the first one arrived), encodes the prompts it has not
cached in one text forward, the images in one image forward, and resolves each future
with that job's own slice. A failed forward fails only the futures of that batch.

The slices are NumPy arrays on the host, made once per batch: one device-to-host copy
per tower, and a label set shared by several jobs in the batch is averaged once. Per-job
work on torch tensors would cost a dispatch per operation on this one thread, each of
which releases the GIL and, with many job threads busy, waits to get it back.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from worker.engine import ClipEngine
from worker.engine_log import get_logger

log = get_logger("cliptag.worker")

LabelPrompts = tuple[str, ...]
"""The prompts whose mean embedding stands for one label (one prompt without ensembling)."""


@dataclass(frozen=True)
class BatchOutput:
    """One work item's share of a batch.

    Attributes:
        image_embedding: the normalized image embedding, or ``None`` for text-only work.
        text_embeddings: one normalized row per requested label (ensembles averaged).
            Both are read-only float32 arrays, possibly shared with other items.
        logit_scale: CLIP's learned temperature, ``exp(logit_scale)``.
        batch_id, batch_size: which forward pass served it and how many images it held.
        inference_ms: the batch's wall time on the model.
    """

    image_embedding: np.ndarray | None
    text_embeddings: np.ndarray
    logit_scale: float
    batch_id: str
    batch_size: int
    inference_ms: float


@dataclass
class WorkItem:
    pixels: np.ndarray | None
    labels: Sequence[LabelPrompts]
    future: Future[BatchOutput] = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchStats:
    """What the batcher reports after each forward pass (for logs and metrics)."""

    batch_id: str
    images: int
    items: int
    new_prompts: int
    inference_ms: float
    oldest_wait_ms: float


class Batcher:
    """Runs ``engine`` on batches assembled from :meth:`submit` calls.

    Args:
        engine: the model to run; only the batcher thread touches it.
        max_batch: the most images in one forward pass.
        max_wait_ms: after the first item arrives, how long to wait for more before
            running a partial batch. Work that queued up while the model was busy is
            always taken at once, so this only matters on an idle model.
        on_batch: called on the batcher thread after every batch.
    """

    def __init__(
        self,
        engine: ClipEngine,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[list[WorkItem] | None] = queue.Queue()
        self._backlog: deque[WorkItem] = deque()  # taken from the queue, not yet batched
        self._thread = threading.Thread(target=self._run, name="cliptag-batcher", daemon=True)
        self.batches_run = 0

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, pixels: np.ndarray | None, labels: Sequence[LabelPrompts] = ()) -> Future[BatchOutput]:
        """Queue one image (or none, for text-only work) with the labels it is scored against."""
        return self.submit_many([pixels], labels)[0]

    def submit_many(
        self, pixels: Sequence[np.ndarray | None], labels: Sequence[LabelPrompts] = ()
    ) -> list[Future[BatchOutput]]:
        """Queue several images scored against the same labels, in one hand-off."""
        items = [WorkItem(pixels=one, labels=labels) for one in pixels]
        if items:
            self._queue.put(items)
        return [item.future for item in items]

    def _run(self) -> None:
        while True:
            batch, stopping = self._collect()
            if batch:
                self._execute(batch)
            if stopping:
                return

    def _collect(self) -> tuple[list[WorkItem], bool]:
        """The next batch, and whether ``stop`` was called (after everything before it)."""
        if not self._backlog:
            group = self._queue.get()
            if group is None:
                return [], True
            self._backlog.extend(group)
        batch: list[WorkItem] = []
        images = 0
        deadline = self._backlog[0].arrived + self.max_wait
        while True:
            while self._backlog and images < self.max_batch:
                item = self._backlog.popleft()
                batch.append(item)
                images += item.pixels is not None
            if images >= self.max_batch:
                return batch, False
            try:
                group = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, False
            if group is None:
                return batch, True
            self._backlog.extend(group)

    def _execute(self, batch: list[WorkItem]) -> None:
        batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
        started = time.monotonic()
        batch_id = uuid.uuid4().hex[:12]
        misses_before = self.engine.cache_misses
        try:
            outputs = self._forward(batch)
        except Exception as exc:  # one failed pass must fail only its own futures
            for item in batch:
                item.future.set_exception(exc)
            return
        elapsed_ms = (time.monotonic() - started) * 1000.0
        images = sum(item.pixels is not None for item in batch)
        for item, (image_embedding, text_embeddings) in zip(batch, outputs, strict=True):
            item.future.set_result(
                BatchOutput(
                    image_embedding=image_embedding,
                    text_embeddings=text_embeddings,
                    logit_scale=self.engine.logit_scale,
                    batch_id=batch_id,
                    batch_size=images,
                    inference_ms=elapsed_ms,
                )
            )
        self.batches_run += 1
        self._report(
            BatchStats(
                batch_id=batch_id,
                images=images,
                items=len(batch),
                new_prompts=self.engine.cache_misses - misses_before,
                inference_ms=elapsed_ms,
                oldest_wait_ms=(started - min(item.arrived for item in batch)) * 1000.0,
            )
        )

    def _report(self, stats: BatchStats) -> None:
        """Hand ``stats`` to ``on_batch``; a failure there (a broken log sink, say) is logged,
        never raised: it would end the batcher thread, and every job after it would wait forever."""
        if self.on_batch is None:
            return
        try:
            self.on_batch(stats)
        except Exception:
            log.exception("batch_report_failed", batch_id=stats.batch_id)

    def _forward(self, batch: list[WorkItem]) -> list[tuple[np.ndarray | None, np.ndarray]]:
        prompts = list(dict.fromkeys(p for item in batch for label in item.labels for p in label))
        prompt_rows = self.engine.text_embeddings(prompts).numpy()  # stays here: jobs get averaged copies
        prompt_index = {prompt: row for row, prompt in enumerate(prompts)}
        with_pixels = [item.pixels for item in batch if item.pixels is not None]
        image_rows = iter(
            _read_only(self.engine.image_embeddings(np.stack(with_pixels)).numpy()) if with_pixels else []
        )
        matrices: dict[tuple[LabelPrompts, ...], np.ndarray] = {}
        outputs = []
        for item in batch:
            image_embedding = next(image_rows) if item.pixels is not None else None
            labels = tuple(item.labels)
            if labels not in matrices:
                matrices[labels] = _label_matrix(labels, prompt_rows, prompt_index)
            outputs.append((image_embedding, matrices[labels]))
        return outputs


def _label_matrix(
    labels: Sequence[LabelPrompts], prompt_rows: np.ndarray, prompt_index: dict[str, int]
) -> np.ndarray:
    """One normalized row per label: the mean of its prompts' embeddings, renormalized."""
    if not labels:
        return _read_only(np.empty((0, prompt_rows.shape[-1]), dtype=np.float32))
    matrix = np.stack([prompt_rows[[prompt_index[p] for p in label]].mean(axis=0) for label in labels])
    return _read_only(matrix / np.linalg.norm(matrix, axis=-1, keepdims=True))


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
