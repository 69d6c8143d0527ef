"""The model's forward: batched image embeddings and cached text embeddings.

Only the batcher thread calls an engine, so it holds no locks. Embeddings leave the
engine L2-normalized, in float32, on the CPU, whatever device and dtype ran them.

The image tower runs as a TorchScript trace (``trace=True``, the default): one call per
batch that releases the GIL once. Run eagerly, every one of its few hundred operations
releases the GIL and must win it back from the worker's job threads; with a busy queue
that made a forward pass wait tens of times longer than it computed. The trace is checked
against the eager tower when it is made, and the engine falls back to eager (with a
warning) if tracing fails or disagrees.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from worker.engine_log import get_logger
from worker.loading import LoadedModel

log = get_logger("cliptag.worker")

TRACE_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
"""How far below 1 the cosine between a traced and an eager embedding may fall, per dtype
(a frozen trace may fuse operations, which rounds differently in half precision)."""

TEXT_CHUNK = 256
"""Prompts encoded per text forward; bounds memory for jobs with thousands of labels."""

SHORT_PASS_MS = 20.0
"""A CPU image pass shorter than this is short: the next one runs on the cores that
decoding threads leave free (see :class:`ClipEngine`)."""


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Float32 rows of unit L2 norm."""
    embeddings = embeddings.float()
    return embeddings / embeddings.norm(p=2, dim=-1, keepdim=True)


class ImageTower(torch.nn.Module):
    """Pixels to normalized float32 image embeddings, as one module (what gets traced)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output)


ImageForward = Callable[[torch.Tensor], torch.Tensor]


def traced_image_tower(tower: ImageTower, example: torch.Tensor) -> ImageForward | None:
    """``tower`` traced and frozen on ``example``, or ``None`` if that fails or its
    embeddings of a batch of another size point elsewhere than the eager tower's."""
    check = torch.cat([example, example.flip(0), example])
    verbosity = hf_logging.get_verbosity()
    try:
        # quiet: TracerWarnings about shape checks, jit's deprecation, and transformers
        # complaining about properties (loss_function) that freezing reads
        hf_logging.set_verbosity_error()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(tower.eval(), example, check_trace=False))
            shortfall = 1.0 - float((traced(check) * tower(check)).sum(dim=-1).min())
    except Exception as exc:  # any failure just means running eagerly
        log.warning("image_tower_not_traced", error=f"{type(exc).__name__}: {exc}")
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not shortfall <= TRACE_TOLERANCE.get(example.dtype, 1e-6):
        log.warning("image_tower_not_traced", error=f"the trace's cosine to the tower is 1 - {shortfall:.2e}")
        return None
    return traced


class ClipEngine:
    """Runs CLIP's two towers.

    On the CPU, torch runs each operation on a team of OpenMP threads, one per core, that
    meet at a barrier after every operation. While other threads of the process decode
    images, a team that size keeps waiting at those barriers for a thread whose core a
    decoder holds. A long pass (ViT-B/32: seconds per batch) hardly notices; a short one
    took several times as long as it computed. So after a pass shorter than
    ``short_pass_ms``, the next pass gets only the cores ``free_cores`` reports; after a
    long one, every core torch was given.

    Args:
        loaded: the model, tokenizer and processor from :func:`worker.loading.load_clip`.
        label_cache_size: the most prompt embeddings kept (least recently used go first).
        trace: run the image tower as a TorchScript trace (see the module docstring).
        free_cores: how many cores no decoding thread holds right now; ``None`` runs
            every pass on ``cpu_threads``. A CUDA device ignores it.
        short_pass_ms: the line between a short pass and a long one (see above).
        cpu_threads: the most threads a CPU pass runs on (the cores the process may use,
            :func:`worker.cores.usable_cores`); ``None`` keeps torch's own count, which
            knows nothing of a container's CPU quota.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        label_cache_size: int = 100_000,
        trace: bool = True,
        free_cores: Callable[[], int] | None = None,
        short_pass_ms: float = SHORT_PASS_MS,
        cpu_threads: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.cache_size = label_cache_size
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self._max_text_tokens = int(self.model.config.text_config.max_position_embeddings)
        self._trace_wanted = trace
        self._image_forward: ImageForward | None = None
        self.traced: bool | None = None
        """Whether the image tower runs traced; ``None`` until the first image batch."""
        self._free_cores = free_cores
        self.cpu_threads = min(torch.get_num_threads(), cpu_threads or torch.get_num_threads())
        """The threads a long CPU pass runs on."""
        self._short_pass_ms = short_pass_ms
        self._last_pass_ms = float("inf")

    def _image_tower(self) -> ImageForward:
        """The image forward, traced on the first call: on the thread that runs the model,
        so that one OpenMP thread team serves every pass (a second team, for a thread that
        only traced, makes OpenMP stop spinning between operations: +30 ms at batch 1)."""
        if self._image_forward is None:
            tower = ImageTower(self.model)
            self._image_forward = (self._trace_wanted and self._trace(tower)) or tower
            self.traced = self._image_forward is not tower
        return self._image_forward

    def _trace(self, tower: ImageTower) -> ImageForward | None:
        size = int(self.model.config.vision_config.image_size)
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        return traced_image_tower(tower, example.to(self.device, self.dtype))

    @torch.inference_mode()
    def image_embeddings(self, pixels: np.ndarray) -> torch.Tensor:
        """Normalized embeddings of a ``(N, 3, H, W)`` float32 batch."""
        host = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            host = host.pin_memory()
        batch = host.to(self.device, non_blocking=True).to(self.dtype)
        self._size_cpu_team()
        started = time.perf_counter()
        embeddings = self._image_tower()(batch).cpu()
        self._last_pass_ms = (time.perf_counter() - started) * 1000.0
        return embeddings

    def _size_cpu_team(self) -> None:
        if self.device.type != "cpu":
            return
        threads = self.cpu_threads
        if self._free_cores is not None and self._last_pass_ms < self._short_pass_ms:
            threads = max(1, min(threads, self._free_cores()))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalized embeddings of ``prompts``, from the cache where possible."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        self.cache_misses += len(missing)
        self.cache_hits += len(prompts) - len(missing)
        fresh: dict[str, torch.Tensor] = {}
        for start in range(0, len(missing), TEXT_CHUNK):
            chunk = missing[start : start + TEXT_CHUNK]
            # a row of its own: a view would keep its whole chunk alive in the cache
            fresh.update(zip(chunk, (row.clone() for row in self._encode_texts(chunk)), strict=True))
        rows = [fresh[p] if p in fresh else self._text_cache[p] for p in prompts]
        for prompt in prompts:
            self._remember(prompt, fresh.get(prompt))
        return torch.stack(rows) if rows else torch.empty(0)

    @torch.inference_mode()
    def _encode_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.loaded.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self._max_text_tokens,
            return_tensors="pt",
        ).to(self.device)
        features = self.model.get_text_features(**tokens).pooler_output
        return normalize(features).cpu()

    def _remember(self, prompt: str, embedding: torch.Tensor | None) -> None:
        if self.cache_size == 0:
            return
        if embedding is None:
            if prompt in self._text_cache:
                self._text_cache.move_to_end(prompt)
            return
        self._text_cache[prompt] = embedding
        if len(self._text_cache) > self.cache_size:
            self._text_cache.popitem(last=False)
