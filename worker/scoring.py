"""Postprocessing: embeddings and logits into the result's scores, tags, ranks."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from producer.contract import EncodedEmbedding, LabelScore, RankedText, ScoringMode

MULTILABEL_BIAS = -25.0
"""Multilabel scores are ``sigmoid(logit_scale × cosine + MULTILABEL_BIAS)``: with CLIP's
logit scale of 100 a label scores 0.5 at cosine 0.25, near where ViT-B/32 separates
matching from non-matching captions."""
MULTILABEL_DEFAULT_THRESHOLD = 0.5


def label_probabilities(
    image_embedding: torch.Tensor, label_embeddings: torch.Tensor, logit_scale: float, mode: ScoringMode
) -> torch.Tensor:
    """Per-label scores: softmax over ``logit_scale × cosine`` (as CLIP defines) or sigmoids."""
    logits = logit_scale * (label_embeddings @ image_embedding)
    if mode == "softmax":
        return logits.softmax(dim=-1)
    return torch.sigmoid(logits + MULTILABEL_BIAS)


def rank_labels(
    labels: Sequence[str],
    probabilities: torch.Tensor,
    *,
    mode: ScoringMode,
    top_k: int | None,
    threshold: float | None,
) -> tuple[list[LabelScore], list[str], str]:
    """(scores sorted best first and cut to ``top_k``, tags, top label).

    Tags are the labels scoring at least ``threshold``; without one, the top label in
    softmax mode and labels at or above 0.5 in multilabel mode.
    """
    order = torch.argsort(probabilities, descending=True, stable=True).tolist()
    ranked = [LabelScore(label=labels[i], score=float(probabilities[i])) for i in order]
    if threshold is None and mode == "softmax":
        tags = [ranked[0].label]
    else:
        cut = MULTILABEL_DEFAULT_THRESHOLD if threshold is None else threshold
        tags = [entry.label for entry in ranked if entry.score >= cut]
    return ranked[:top_k] if top_k else ranked, tags, ranked[0].label


def rank_texts(
    texts: Sequence[str], image_embedding: torch.Tensor, text_embeddings: torch.Tensor
) -> list[RankedText]:
    """Candidate texts by cosine similarity to the image, best first, ranks from 1."""
    similarities = (text_embeddings @ image_embedding).tolist()
    order = sorted(range(len(texts)), key=lambda i: -similarities[i])
    return [
        RankedText(text=texts[i], similarity=similarities[i], rank=rank)
        for rank, i in enumerate(order, start=1)
    ]


def encode_embedding(
    embedding: torch.Tensor, dtype: Literal["float32", "float16"] = "float32"
) -> EncodedEmbedding:
    """A normalized embedding as base64 of little-endian ``dtype`` values."""
    values = embedding.detach().cpu().numpy().astype(np.dtype(dtype).newbyteorder("<"))
    return EncodedEmbedding(
        dtype=dtype, dim=int(values.shape[0]), b64=base64.b64encode(values.tobytes()).decode()
    )
