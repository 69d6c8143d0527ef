"""Postprocessing: embeddings into the result's scores, tags, ranks and encoded vectors.

Every input here is L2-normalized, so a dot product is a cosine similarity.
See ``docs/jobs.md`` for what the scores mean and how to choose a threshold.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import torch

from producer.contract import EmbeddingDtype, EncodedEmbedding, LabelScore, RankedText, ScoringMode

MULTILABEL_CENTER = 0.25
"""The cosine at which a multilabel score is 0.5 unless a job sets ``multilabel_center``.

For ViT-B/32 with "a photo of a {}." a matching label typically reaches a cosine around
0.3 with its image and an unrelated one stays near 0.2 or below; 0.25 sits between. It is a
property of the model and the prompts, not a universal constant: calibrate it (or the
threshold) on your own images."""

DEFAULT_MULTILABEL_THRESHOLD = 0.5
"""Without a job ``threshold``, multilabel ``tags`` are the labels whose cosine reached the center."""


def label_scores(
    image_embedding: torch.Tensor,
    label_embeddings: torch.Tensor,
    logit_scale: float,
    *,
    mode: ScoringMode,
    center: float | None = None,
) -> torch.Tensor:
    """One score per label row.

    Args:
        image_embedding: the image's normalized embedding, shape ``(D,)``.
        label_embeddings: one normalized row per label, shape ``(L, D)``.
        logit_scale: CLIP's learned temperature (``exp(logit_scale)``, 100 for ViT-B/32).
        mode: ``softmax``: CLIP's softmax over ``logit_scale × cosine`` (scores sum to 1).
            ``multilabel``: ``sigmoid(logit_scale × (cosine − center))`` per label, i.e.
            the softmax between the label and a virtual "none of these" prompt whose
            cosine is ``center``; each label's score is independent of the others.
        center: the multilabel center; ``None`` is :data:`MULTILABEL_CENTER`.
    """
    cosines = label_embeddings @ image_embedding
    if mode == "softmax":
        return (logit_scale * cosines).softmax(dim=-1)
    center = MULTILABEL_CENTER if center is None else center
    return torch.sigmoid(logit_scale * (cosines - center))


def rank_labels(
    labels: Sequence[str],
    scores: torch.Tensor,
    *,
    mode: ScoringMode,
    top_k: int | None,
    threshold: float | None,
) -> tuple[list[LabelScore], list[str], str]:
    """(scores sorted best first and cut to ``top_k``, tags, top label).

    Args:
        labels: the label of each score.
        scores: from :func:`label_scores`.
        mode: the scoring mode, which decides the tags without a threshold.
        top_k: keep the best ``top_k`` scores; ``None`` keeps all (tags are never cut).
        threshold: the tags are the labels scoring at least this; ``None`` means the top
            label in softmax mode and :data:`DEFAULT_MULTILABEL_THRESHOLD` in multilabel mode.
    """
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    ranked = [LabelScore(label=labels[i], score=float(scores[i])) for i in order]
    if threshold is None and mode == "softmax":
        tags = [ranked[0].label]
    else:
        cut = DEFAULT_MULTILABEL_THRESHOLD if threshold is None else threshold
        tags = [entry.label for entry in ranked if entry.score >= cut]
    return ranked[:top_k] if top_k else ranked, tags, ranked[0].label


def rank_texts(
    texts: Sequence[str],
    image_embedding: torch.Tensor,
    text_embeddings: torch.Tensor,
    *,
    top_k: int | None = None,
) -> list[RankedText]:
    """Candidate texts by cosine similarity to the image, best first, ranks from 1.

    Args:
        texts: the candidates, in the job's order.
        image_embedding: the image's normalized embedding.
        text_embeddings: one normalized row per candidate.
        top_k: keep the best ``top_k``; ``None`` keeps all.
    """
    similarities = text_embeddings @ image_embedding
    order = torch.argsort(similarities, descending=True, stable=True).tolist()
    ranked = [
        RankedText(text=texts[i], similarity=float(similarities[i]), rank=rank)
        for rank, i in enumerate(order, start=1)
    ]
    return ranked[:top_k] if top_k else ranked


def encode_embedding(embedding: torch.Tensor, dtype: EmbeddingDtype = "float32") -> EncodedEmbedding:
    """A normalized embedding as base64 of its little-endian ``dtype`` values.

    Args:
        embedding: a 1-D float tensor.
        dtype: ``float32`` (exact) or ``float16`` (half the size; each value within
            about 5e-4 of the float32 one, ample for nearest-neighbour search).
    """
    values = embedding.detach().cpu().numpy().astype(np.dtype(dtype).newbyteorder("<"))
    return EncodedEmbedding(
        dtype=dtype, dim=int(values.shape[0]), b64=base64.b64encode(values.tobytes()).decode()
    )
