"""The model's forward: batched image embeddings and cached text embeddings.

Only the batcher thread calls an engine, so it holds no locks. Embeddings leave the
engine L2-normalized, in float32, on the CPU, whatever device and dtype ran them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from worker.loading import LoadedModel

TEXT_CHUNK = 256
"""Prompts encoded per text forward; bounds memory for jobs with thousands of labels."""


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Float32 rows of unit L2 norm."""
    embeddings = embeddings.float()
    return embeddings / embeddings.norm(p=2, dim=-1, keepdim=True)


class ClipEngine:
    """Runs CLIP's two towers.

    Args:
        loaded: the model, tokenizer and processor from :func:`worker.loading.load_clip`.
        label_cache_size: the most prompt embeddings kept (least recently used go first).
    """

    def __init__(self, loaded: LoadedModel, *, label_cache_size: int = 100_000) -> None:
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

    @torch.inference_mode()
    def image_embeddings(self, pixels: np.ndarray) -> torch.Tensor:
        """Normalized embeddings of a ``(N, 3, H, W)`` float32 batch."""
        host = torch.from_numpy(pixels)
        if self.device.type == "cuda":
            host = host.pin_memory()
        batch = host.to(self.device, non_blocking=True).to(self.dtype)
        features = self.model.get_image_features(pixel_values=batch).pooler_output
        return normalize(features).cpu()

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Normalized embeddings of ``prompts``, from the cache where possible."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        self.cache_misses += len(missing)
        self.cache_hits += len(prompts) - len(missing)
        fresh: dict[str, torch.Tensor] = {}
        for start in range(0, len(missing), TEXT_CHUNK):
            chunk = missing[start : start + TEXT_CHUNK]
            fresh.update(zip(chunk, self._encode_texts(chunk), strict=True))
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
