"""One job from request to result: preprocess → forward (batched) → postprocess.

No Celery here: the Celery task, the benchmarks and the tests all drive this class.
Fetch, decode and preprocess run on an I/O thread pool, so the next images are ready
while the model runs the current batch, and a slow download never holds a batch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from producer.contract import DEFAULT_TEMPLATE, ErrorInfo, ItemResult, JobRequest, JobResult, ModelInfo
from producer.errors import ErrorCode, JobError, shorten
from worker.batcher import Batcher, BatchOutput, BatchStats, LabelPrompts
from worker.config import WorkerSettings
from worker.decode import decode_image
from worker.engine import ClipEngine
from worker.fetch import Fetcher, FetchPolicy
from worker.label_set_cache import LabelSetCache, LabelSetSource
from worker.loading import LoadedModel
from worker.preprocess import ImageTransform, make_transform
from worker.prompts import label_prompts
from worker.scoring import encode_embedding, rank_labels, rank_texts
from worker.similarity import label_scores

PREPARE_CHUNK = 8
"""Images of a bulk job one I/O task prepares in turn and hands to the batcher together:
fewer thread hand-offs per image, and fuller batches."""


@dataclass(frozen=True)
class Vocabulary:
    """What a job's images are scored against.

    Attributes:
        texts: the labels (``tag``) or texts (``rank``, ``text_embed``) in order.
        prompts: per text, the prompts encoded in the batch (ensembled per text).
        embeddings: precomputed rows (a stored label set), used instead of ``prompts``.
        label_set_version: the version of the stored set, when the job named one.
    """

    texts: list[str]
    prompts: list[LabelPrompts]
    embeddings: np.ndarray | None = None
    label_set_version: int | None = None

    def rows(self, output: BatchOutput) -> np.ndarray:
        """One normalized embedding per text."""
        return output.text_embeddings if self.embeddings is None else self.embeddings


@dataclass(frozen=True)
class Prepared:
    """An image ready for the model, with what getting it cost."""

    pixels: np.ndarray
    fetch_ms: float
    preprocess_ms: float


def fetch_policy(settings: WorkerSettings) -> FetchPolicy:
    """The fetch limits ``settings`` configure."""
    return FetchPolicy(
        max_bytes=settings.max_image_bytes,
        local_roots=settings.local_root_paths,
        allowed_hosts=settings.allowed_host_set,
        allow_private=settings.allow_private_hosts,
        connect_timeout=settings.fetch_connect_timeout,
        read_timeout=settings.fetch_read_timeout,
        total_timeout=settings.fetch_total_timeout,
        s3_endpoint_url=settings.s3_endpoint_url,
    )


def _elapsed_ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000.0, 3)


class Pipeline:
    """Tags, embeds and ranks images with one loaded model.

    Args:
        loaded: the model from :func:`worker.loading.load_clip`.
        settings: batch size, wait, preprocessing mode and fetch limits.
        label_sets: the store ``label_set`` names are read from; ``None`` refuses them.
        on_batch: called after every forward pass (logging, metrics).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        settings: WorkerSettings,
        *,
        label_sets: LabelSetSource | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.settings = settings
        self.model_info = ModelInfo(id=loaded.source, revision=loaded.revision)
        self.fetcher = Fetcher(fetch_policy(settings))
        self.transform: ImageTransform = make_transform(loaded.processor, exact=settings.exact_preprocess)
        self.engine = ClipEngine(loaded, label_cache_size=settings.label_cache_size, trace=settings.trace)
        self.batcher = Batcher(
            self.engine, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms, on_batch=on_batch
        )
        self.label_sets = None if label_sets is None else LabelSetCache(label_sets, self._encode_labels)
        self._io = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="cliptag-io")
        # decoding is CPU work: more threads at it than cores only fight over the GIL,
        # while any number may wait on the network
        self._decode_slots = threading.BoundedSemaphore(settings.decode_threads or os.cpu_count() or 1)

    def start(self) -> Pipeline:
        self.batcher.start()
        if self.settings.warmup:
            self.warm_up()
        return self

    def stop(self) -> None:
        """Finish queued work, then release threads and connections."""
        self._io.shutdown(wait=True)
        self.batcher.stop()
        self.fetcher.close()

    def warm_up(self) -> None:
        """One forward pass through both towers, so the first real job pays no start-up cost."""
        pixels = self.transform(Image.new("RGB", (256, 256), (127, 127, 127)))
        self.batcher.submit(pixels, [("a photo.",)]).result()

    def prepare(self, reference: str) -> Prepared:
        """Fetch, decode and transform one image (the preprocess step)."""
        started = time.perf_counter()
        data = self.fetcher.fetch(reference)
        fetch_ms = _elapsed_ms(started)
        started = time.perf_counter()
        with self._decode_slots:
            image = decode_image(
                data, max_pixels=self.settings.max_pixels, draft_size=self.transform.draft_size
            )
            pixels = self.transform(image)
        return Prepared(pixels=pixels, fetch_ms=fetch_ms, preprocess_ms=_elapsed_ms(started))

    def run(self, job: JobRequest) -> JobResult:
        """Run ``job`` to its result; errors are results, never exceptions, except bugs."""
        started = time.time()
        queue_wait_ms = max(0.0, (started - job.submitted_at) * 1000.0) if job.submitted_at else None
        try:
            if job.expires_at is not None and started > job.expires_at:
                raise JobError(ErrorCode.EXPIRED, f"job expired at {job.expires_at:.3f} before it ran")
            vocabulary = self._vocabulary(job)
        except JobError as error:
            return JobResult(
                job_id=job.job_id,
                kind=job.kind,
                status="error",
                error=ErrorInfo(**error.to_dict()),
                model=self.model_info,
                metadata=job.metadata,
            )
        if job.kind == "text_embed":
            result = self._embed_texts(job, vocabulary, started)
            if queue_wait_ms is not None:
                result.timings_ms["queue_wait"] = round(queue_wait_ms, 3)
            return result
        pending = self._prepare_all(job.references, vocabulary.prompts)
        items = [
            self._finish_item(job, ref, future, vocabulary)
            for ref, future in zip(job.references, pending, strict=True)
        ]
        for item in items:
            if queue_wait_ms is not None:
                item.timings_ms["queue_wait"] = round(queue_wait_ms, 3)
            item.timings_ms["total"] = round((time.time() - started) * 1000.0, 3)
        common = {
            "job_id": job.job_id,
            "kind": job.kind,
            "model": self.model_info,
            "metadata": job.metadata,
            "label_set_version": vocabulary.label_set_version,
        }
        if job.is_bulk:
            status = "ok" if any(item.status == "ok" for item in items) else "error"
            return JobResult(status=status, items=items, **common)
        return JobResult(**items[0].model_dump(), **common)

    def _vocabulary(self, job: JobRequest) -> Vocabulary:
        if job.kind == "embed":
            return Vocabulary([], [])
        if job.kind in ("rank", "text_embed"):
            assert job.texts is not None
            return Vocabulary(list(job.texts), label_prompts(job.texts, job.template))
        if job.label_set is not None:
            if self.label_sets is None:
                raise JobError(ErrorCode.UNKNOWN_LABEL_SET, "this worker has no label-set store")
            stored = self.label_sets.resolve(job.label_set)
            return Vocabulary(list(stored.labels), [], stored.embeddings, stored.version)
        assert job.labels is not None
        prompts = label_prompts(job.labels, job.template or DEFAULT_TEMPLATE, job.prompts)
        return Vocabulary(list(job.labels), prompts)

    def _encode_labels(self, labels: Sequence[LabelPrompts]) -> np.ndarray:
        """Label embeddings from a text-only batch (for stored label sets)."""
        return self.batcher.submit(None, labels).result().text_embeddings

    def _embed_texts(self, job: JobRequest, vocabulary: Vocabulary, started: float) -> JobResult:
        common = {"job_id": job.job_id, "kind": job.kind, "model": self.model_info, "metadata": job.metadata}
        try:
            output = self.batcher.submit(None, vocabulary.prompts).result()
        except Exception as exc:  # a failed forward: retryable, never silent
            return JobResult(status="error", error=_internal_error(exc), **common)
        return JobResult(
            status="ok",
            text_embeddings=[encode_embedding(row, job.embedding_dtype) for row in output.text_embeddings],
            batch_id=output.batch_id,
            batch_size=output.batch_size,
            timings_ms={
                "inference": round(output.inference_ms, 3),
                "total": round((time.time() - started) * 1000.0, 3),
            },
            **common,
        )

    def _prepare_all(
        self, references: Sequence[str], prompts: Sequence[LabelPrompts]
    ) -> list[Future[tuple[Prepared, Future[BatchOutput]]]]:
        """Prepare and submit each image: a lone image on this thread (a hand-off to the I/O
        pool would only add a thread switch), a bulk job's images on the I/O pool in chunks
        of :data:`PREPARE_CHUNK`, each chunk handed to the batcher at once."""
        outcomes: list[Future[tuple[Prepared, Future[BatchOutput]]]] = [Future() for _ in references]
        if len(references) == 1:
            self._prepare_chunk(references, prompts, outcomes)
            return outcomes
        for start in range(0, len(references), PREPARE_CHUNK):
            chunk = slice(start, start + PREPARE_CHUNK)
            self._io.submit(self._prepare_chunk, references[chunk], prompts, outcomes[chunk])
        return outcomes

    def _prepare_chunk(
        self,
        references: Sequence[str],
        prompts: Sequence[LabelPrompts],
        outcomes: Sequence[Future[tuple[Prepared, Future[BatchOutput]]]],
    ) -> None:
        """Prepare ``references`` in turn and submit the ready ones together; each image's
        failure lands in its own outcome."""
        ready: list[tuple[Prepared, Future[tuple[Prepared, Future[BatchOutput]]]]] = []
        for reference, outcome in zip(references, outcomes, strict=True):
            try:
                ready.append((self.prepare(reference), outcome))
            except Exception as exc:  # a JobError, or a bug: this image's error, not the job's
                outcome.set_exception(exc)
        try:
            forwards = self.batcher.submit_many([prepared.pixels for prepared, _ in ready], prompts)
        except Exception as exc:
            for _, outcome in ready:
                outcome.set_exception(exc)
            return
        for (prepared, outcome), forward in zip(ready, forwards, strict=True):
            outcome.set_result((prepared, forward))

    def _finish_item(
        self,
        job: JobRequest,
        reference: str,
        pending: Future[tuple[Prepared, Future[BatchOutput]]],
        vocabulary: Vocabulary,
    ) -> ItemResult:
        try:
            prepared, forward = pending.result()
            output = forward.result()
        except JobError as error:
            return ItemResult(image=reference, status="error", error=ErrorInfo(**error.to_dict()))
        except Exception as exc:  # a bug or a failed forward: retryable, never silent
            return ItemResult(image=reference, status="error", error=_internal_error(exc))
        return self.postprocess(job, reference, vocabulary, prepared, output)

    def postprocess(
        self, job: JobRequest, reference: str, vocabulary: Vocabulary, prepared: Prepared, output: BatchOutput
    ) -> ItemResult:
        """Scores, tags, ranks and embeddings for one image from its batch output."""
        assert output.image_embedding is not None
        item = ItemResult(
            image=reference,
            status="ok",
            batch_id=output.batch_id,
            batch_size=output.batch_size,
            timings_ms={
                "fetch": prepared.fetch_ms,
                "preprocess": prepared.preprocess_ms,
                "inference": round(output.inference_ms, 3),
            },
        )
        if job.kind == "tag":
            scores = label_scores(
                output.image_embedding,
                vocabulary.rows(output),
                output.logit_scale,
                mode=job.mode,
                center=job.multilabel_center,
            )
            item.scores, item.tags, item.top_label = rank_labels(
                vocabulary.texts, scores, mode=job.mode, top_k=job.top_k, threshold=job.threshold
            )
        elif job.kind == "rank":
            item.texts = rank_texts(
                vocabulary.texts, output.image_embedding, vocabulary.rows(output), top_k=job.top_k
            )
        if job.kind == "embed" or job.return_embedding:
            item.embedding = encode_embedding(output.image_embedding, job.embedding_dtype)
        return item


def _internal_error(exc: Exception) -> ErrorInfo:
    """A bug or a failed forward pass, as a retryable ``internal`` error."""
    return ErrorInfo(
        code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {shorten(str(exc))}", retryable=True
    )
