"""One job from request to result: preprocess → forward (batched) → postprocess.

No Celery here: the Celery task, the benchmarks and the tests all drive this class.
A job's images go in chunks through two pools: I/O threads fetch (local files in chunks,
remote images one per thread), decode threads (one per core: more only fight over the
GIL) decode and preprocess, and hand each chunk to the batcher. So the next images are ready while the
model runs the current batch, and a slow download never holds a batch.

Images are fetched no further ahead of the model than :data:`READY_AHEAD_BATCHES`
batches, and a job keeps only its images' timings once they are in a batch, so a
10,000-image job holds a few batches of pixels, not 10,000 images' worth.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from producer.contract import DEFAULT_TEMPLATE, ErrorInfo, ItemResult, JobRequest, JobResult, ModelInfo
from producer.errors import ErrorCode, JobError, shorten
from worker.batcher import Batcher, BatchOutput, BatchStats, LabelPrompts
from worker.budget import Budget
from worker.config import WorkerSettings
from worker.cores import usable_cores
from worker.decode import decode_image
from worker.engine import ClipEngine
from worker.fetch import Fetcher, FetchPolicy, is_remote
from worker.label_set_cache import LabelSetCache, LabelSetSource
from worker.loading import LoadedModel
from worker.preprocess import ImageTransform, make_transform
from worker.prompts import label_prompts
from worker.scoring import encode_embedding, rank_labels, rank_texts
from worker.similarity import label_scores

PREPARE_CHUNK = 16
"""Local images of a job fetched, decoded and handed to the batcher together: fewer thread
hand-offs per image, and fuller batches (remote ones go alone: :func:`fetch_chunks`)."""

READY_AHEAD_BATCHES = 4
"""Images that may be fetched or decoded but not yet through the model, in batches of
``max_batch`` (and never fewer than two chunks, so that one chunk is prepared while the
model runs the other): enough to keep the model fed, while memory stays bounded (a decoded
ViT-B/32 input is 0.6 MB of float32, a fetched file up to ``CLIPTAG_MAX_IMAGE_BYTES``)."""


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
class PrepareTimings:
    """What getting one image ready for the model cost."""

    fetch_ms: float
    preprocess_ms: float


Pending = Future[tuple[PrepareTimings, Future[BatchOutput]]]
"""One image of a job: resolved once it is in the batcher's hands (or failed before)."""


def ready_ahead_limit(max_batch: int) -> int:
    """The most images fetched or decoded but not yet through the model (see
    :data:`READY_AHEAD_BATCHES`)."""
    return max(READY_AHEAD_BATCHES * max_batch, 2 * PREPARE_CHUNK)


def fetch_chunks(references: Sequence[str]) -> Iterator[slice]:
    """The slices of ``references`` fetched together, in order: local files in runs of up to
    :data:`PREPARE_CHUNK` (read in microseconds: fewer hand-offs per image), a remote image
    alone (its download may take seconds, and a chunk fetches one image after another: a
    bulk job of URLs ran as many downloads at once as the look-ahead budget held chunks,
    8 with the defaults, instead of one per I/O thread)."""
    start = 0
    while start < len(references):
        end = start + 1
        if not is_remote(references[start]):
            while end < min(start + PREPARE_CHUNK, len(references)) and not is_remote(references[end]):
                end += 1
        yield slice(start, end)
        start = end


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

    Attributes:
        cores: the CPU cores this process may use (its affinity and cgroup CPU quota).
        decode_threads: threads that decode and preprocess images.
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
        self.cores = usable_cores()
        self.decode_threads = settings.decode_threads or self.cores
        # held by each decode thread while it decodes: tells the engine how many cores that takes
        self._decoding = Budget(self.decode_threads)
        self.engine = ClipEngine(
            loaded,
            label_cache_size=settings.label_cache_size,
            trace=settings.trace,
            free_cores=lambda: self.cores - self._decoding.in_use,
            cpu_threads=self.cores,
        )
        self.batcher = Batcher(
            self.engine, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms, on_batch=on_batch
        )
        self.label_sets = None if label_sets is None else LabelSetCache(label_sets, self._encode_labels)
        self._fetchers = ThreadPoolExecutor(
            settings.io_threads or settings.worker_concurrency, thread_name_prefix="cliptag-io"
        )
        self._decoders = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="cliptag-decode")
        self._ahead = Budget(ready_ahead_limit(settings.max_batch))

    def start(self) -> Pipeline:
        self.batcher.start()
        if self.settings.warmup:
            self.warm_up()
        return self

    def stop(self) -> None:
        """Finish queued work, then release threads and connections."""
        self._fetchers.shutdown(wait=True)
        self._decoders.shutdown(wait=True)
        self.batcher.stop()
        self.fetcher.close()

    def warm_up(self) -> None:
        """One forward pass through both towers, so the first real job pays no start-up cost."""
        pixels = self.transform(Image.new("RGB", (256, 256), (127, 127, 127)))
        self.batcher.submit(pixels, [("a photo.",)]).result()

    def fetch(self, reference: str) -> tuple[bytes, float]:
        """The image's bytes, and milliseconds taken."""
        started = time.perf_counter()
        return self.fetcher.fetch(reference), _elapsed_ms(started)

    def preprocess(self, data: bytes) -> tuple[np.ndarray, float]:
        """Decoded and transformed pixels, and milliseconds taken."""
        started = time.perf_counter()
        image = decode_image(data, max_pixels=self.settings.max_pixels, draft_size=self.transform.draft_size)
        return self.transform(image), _elapsed_ms(started)

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
        # each image's batch output (and its batch's label matrix) goes once it is postprocessed
        pending = deque(self._prepare_all(job.references, vocabulary.prompts))
        items = [self._finish_item(job, ref, pending.popleft(), vocabulary) for ref in job.references]
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

    def _prepare_all(self, references: Sequence[str], prompts: Sequence[LabelPrompts]) -> list[Pending]:
        """Send the images through the I/O and decode pools in chunks (:func:`fetch_chunks`).

        A lone image goes the same way: decoding on the job's own thread measured slower,
        with dozens of job threads contending for the decode slots and the GIL.
        """
        outcomes: list[Pending] = [Future() for _ in references]
        for chunk in fetch_chunks(references):
            self._fetchers.submit(self._fetch_chunk, references[chunk], prompts, outcomes[chunk])
        return outcomes

    def _fetch_chunk(
        self, references: Sequence[str], prompts: Sequence[LabelPrompts], outcomes: Sequence[Pending]
    ) -> None:
        """Once the model is few enough images behind, fetch ``references`` and queue their
        decoding; each image's failure lands in its own outcome."""
        self._ahead.acquire(len(references))
        fetched: list[tuple[bytes, float, Pending]] = []
        for reference, outcome in zip(references, outcomes, strict=True):
            try:
                fetched.append((*self.fetch(reference), outcome))
            except Exception as exc:  # a JobError, or a bug: this image's error, not the job's
                outcome.set_exception(exc)
        self._ahead.release(len(references) - len(fetched))
        if fetched:
            self._decoders.submit(self._decode_chunk, fetched, prompts)

    def _decode_chunk(
        self, fetched: Sequence[tuple[bytes, float, Pending]], prompts: Sequence[LabelPrompts]
    ) -> None:
        """Decode and preprocess a fetched chunk and hand it to the batcher together."""
        ready: list[tuple[np.ndarray, PrepareTimings, Pending]] = []
        with self._decoding:
            for data, fetch_ms, outcome in fetched:
                try:
                    pixels, preprocess_ms = self.preprocess(data)
                except Exception as exc:  # a JobError, or a bug: this image's error, not the job's
                    outcome.set_exception(exc)
                    continue
                ready.append((pixels, PrepareTimings(fetch_ms, preprocess_ms), outcome))
        forwards = self._submit(ready, prompts)
        self._ahead.release(len(fetched) - len(forwards))
        if forwards:
            # the batcher takes images in order, so the chunk's last is through the model last;
            # the callback holds the count, not the list: a future whose callback holds it
            # would be a cycle, freeing the chunk's outputs only when the cyclic GC runs
            count = len(forwards)
            forwards[-1].add_done_callback(lambda _: self._ahead.release(count))

    def _submit(
        self, ready: Sequence[tuple[np.ndarray, PrepareTimings, Pending]], prompts: Sequence[LabelPrompts]
    ) -> list[Future[BatchOutput]]:
        """Hand prepared images to the batcher in one group; their outcomes keep only the
        timings and the forward, so the pixels are freed once batched."""
        try:
            forwards = self.batcher.submit_many([pixels for pixels, _, _ in ready], prompts)
        except Exception as exc:  # the batcher refused them: every image's error
            for _, _, outcome in ready:
                outcome.set_exception(exc)
            return []
        for (_, timings, outcome), forward in zip(ready, forwards, strict=True):
            outcome.set_result((timings, forward))
        return forwards

    def _finish_item(
        self,
        job: JobRequest,
        reference: str,
        pending: Pending,
        vocabulary: Vocabulary,
    ) -> ItemResult:
        try:
            timings, forward = pending.result()
            output = forward.result()
        except JobError as error:
            return ItemResult(image=reference, status="error", error=ErrorInfo(**error.to_dict()))
        except Exception as exc:  # a bug or a failed forward: retryable, never silent
            return ItemResult(image=reference, status="error", error=_internal_error(exc))
        return self.postprocess(job, reference, vocabulary, timings, output)

    def postprocess(
        self,
        job: JobRequest,
        reference: str,
        vocabulary: Vocabulary,
        timings: PrepareTimings,
        output: BatchOutput,
    ) -> ItemResult:
        """Scores, tags, ranks and embeddings for one image from its batch output."""
        assert output.image_embedding is not None
        item = ItemResult(
            image=reference,
            status="ok",
            batch_id=output.batch_id,
            batch_size=output.batch_size,
            timings_ms={
                "fetch": timings.fetch_ms,
                "preprocess": timings.preprocess_ms,
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
