"""Worker configuration, read from ``CLIPTAG_*`` environment variables (see the README table)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from producer.config import QueueSettings
from producer.readiness import DEFAULT_HEALTH_DIR
from worker.loading import DEFAULT_CACHE_DIR

DEFAULT_MODEL = "openai/clip-vit-base-patch32"


class WorkerSettings(QueueSettings):
    """Everything a worker process needs, on top of :class:`producer.config.QueueSettings`.

    Attributes:
        model: HF hub id, local directory, or ``s3://bucket/prefix`` of a CLIP checkpoint.
        model_cache_dir: where ``s3://`` checkpoints are downloaded to (once).
        device: ``cpu``, ``cuda`` or ``cuda:N``; empty means CUDA when available.
        dtype: ``float32``, ``float16`` or ``bfloat16``; empty means fp16 on CUDA, fp32 on CPU.
        max_batch: the most images in one forward pass.
        max_wait_ms: how long the batcher may wait for a fuller batch once the first job
            is in (a lone job on an idle model runs at once when this is 0).
        concurrency: Celery worker threads, i.e. jobs in progress at once; 0 means
            ``2 × max_batch`` so that one batch fills while the previous one runs.
        exact_preprocess: use ``CLIPImageProcessorPil`` itself (bit-for-bit reference)
            instead of the faster draft-decode path.
        label_cache_size: text embeddings kept in the LRU cache.
        trace: run the image tower as a TorchScript trace, which releases the GIL once per
            batch instead of once per operation (``worker.engine``); off runs it eagerly.
        io_threads: threads that fetch images ahead of the model (any number may wait on
            the network); 0 means one per job thread, as many as ``concurrency`` gives.
        decode_threads: threads that decode and preprocess the fetched images; 0 means
            one per CPU core the process may use (more only fight over the GIL), counted
            from its CPU affinity and cgroup quota (:func:`worker.cores.usable_cores`).
        local_roots: directories local image paths may be read from (``:``-separated).
        max_image_bytes: the largest image download or file accepted.
        max_pixels: the largest decoded image (width × height) accepted.
        fetch_connect_timeout, fetch_read_timeout: seconds for http(s) and S3 image fetches
            to connect, and to wait for each read.
        fetch_total_timeout: seconds one http(s) image download may take in all.
        allowed_hosts: hosts exempt from the private-address guard (comma-separated).
        allow_private_hosts: turn the private-address guard off (development only).
        s3_endpoint_url: an S3-compatible endpoint instead of AWS.
        max_retries: retries of a job that failed with a transient error.
        max_deliveries: deliveries of one message before it is dead-lettered as poison.
        webhook_secret: default HMAC secret for webhook signatures.
        webhook_keys: more secrets by key id, ``id1=secret1,id2=secret2``.
        webhook_max_attempts: attempts of one webhook POST before it is dead-lettered.
        webhook_timeout: seconds one webhook POST may take (connect, send, read).
        metrics_port: port of the Prometheus endpoint; 0 turns it off. Under ``--gpus`` the
            i-th process serves on ``metrics_port + i``.
        health_dir: where the worker writes its heartbeat file for ``cliptag health``.
        health_interval: seconds between heartbeats; one older than three is stale.
        warmup: run one forward pass before consuming.
        test_crash_on: TEST-ONLY fault injection: the worker process dies (``os._exit``)
            when a job names exactly this image reference; empty (the default) is off.
    """

    model_config = SettingsConfigDict(env_prefix="CLIPTAG_", extra="ignore")

    model: str = DEFAULT_MODEL
    model_cache_dir: Path = DEFAULT_CACHE_DIR
    device: str = ""
    dtype: str = ""
    max_batch: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=0.0, ge=0)
    concurrency: int = Field(default=0, ge=0)
    exact_preprocess: bool = False
    label_cache_size: int = Field(default=100_000, ge=0)
    trace: bool = True
    io_threads: int = Field(default=0, ge=0)
    decode_threads: int = Field(default=0, ge=0)
    local_roots: str = ""
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=64_000_000, ge=1)
    fetch_connect_timeout: float = Field(default=5.0, gt=0)
    fetch_read_timeout: float = Field(default=15.0, gt=0)
    fetch_total_timeout: float = Field(default=60.0, gt=0)
    allowed_hosts: str = ""
    allow_private_hosts: bool = False
    s3_endpoint_url: str | None = None
    max_retries: int = Field(default=3, ge=0)
    max_deliveries: int = Field(default=3, ge=1)
    webhook_secret: str = ""
    webhook_keys: str = ""
    webhook_max_attempts: int = Field(default=6, ge=1)
    webhook_timeout: float = Field(default=10.0, gt=0)
    metrics_port: int = Field(default=0, ge=0)
    health_dir: Path = DEFAULT_HEALTH_DIR
    health_interval: float = Field(default=10.0, gt=0)
    warmup: bool = True
    test_crash_on: str = ""

    @property
    def worker_concurrency(self) -> int:
        return self.concurrency or 2 * self.max_batch

    @property
    def local_root_paths(self) -> tuple[Path, ...]:
        return tuple(Path(p).resolve() for p in self.local_roots.split(":") if p.strip())

    @property
    def allowed_host_set(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())
