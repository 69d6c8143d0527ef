"""Postprocessing: embeddings into the result's scores, tags, ranks and encoded vectors.

Every input here is L2-normalized, so a dot product is a cosine similarity.
See ``docs/jobs.md`` for what the scores mean and how to choose a threshold.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np

from producer.contract import EmbeddingDtype, EncodedEmbedding, LabelScore, RankedText, ScoringMode

DEFAULT_MULTILABEL_THRESHOLD = 0.5
"""Without a job ``threshold``, multilabel ``tags`` are the labels whose cosine reached the center."""


def rank_labels(
    labels: Sequence[str],
    scores: np.ndarray,
    *,
    mode: ScoringMode,
    top_k: int | None,
    threshold: float | None,
) -> tuple[list[LabelScore], list[str], str]:
    """(scores sorted best first and cut to ``top_k``, tags, top label).

    Args:
        labels: the label of each score.
        scores: from :func:`worker.similarity.label_scores`.
        mode: the scoring mode, which decides the tags without a threshold.
        top_k: keep the best ``top_k`` scores; ``None`` keeps all (tags are never cut).
        threshold: the tags are the labels scoring at least this; ``None`` means the top
            label in softmax mode and :data:`DEFAULT_MULTILABEL_THRESHOLD` in multilabel mode.
    """
    order = _best_first(scores)
    ranked = [LabelScore(label=labels[i], score=float(scores[i])) for i in order]
    if threshold is None and mode == "softmax":
        tags = [ranked[0].label]
    else:
        cut = DEFAULT_MULTILABEL_THRESHOLD if threshold is None else threshold
        tags = [entry.label for entry in ranked if entry.score >= cut]
    return ranked[:top_k] if top_k else ranked, tags, ranked[0].label


def rank_texts(
    texts: Sequence[str],
    image_embedding: np.ndarray,
    text_embeddings: np.ndarray,
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
    order = _best_first(similarities)
    ranked = [
        RankedText(text=texts[i], similarity=float(similarities[i]), rank=rank)
        for rank, i in enumerate(order, start=1)
    ]
    return ranked[:top_k] if top_k else ranked


def _best_first(values: np.ndarray) -> list[int]:
    """Indices from the highest value to the lowest; ties keep their order."""
    return np.argsort(-values, kind="stable").tolist()


def encode_embedding(embedding: np.ndarray, dtype: EmbeddingDtype = "float32") -> EncodedEmbedding:
    """A normalized embedding as base64 of its little-endian ``dtype`` values.

    Args:
        embedding: a 1-D float array.
        dtype: ``float32`` (exact) or ``float16`` (half the size; each value within
            about 5e-4 of the float32 one, ample for nearest-neighbour search).
    """
    values = embedding.astype(np.dtype(dtype).newbyteorder("<"))
    return EncodedEmbedding(
        dtype=dtype, dim=int(values.shape[0]), b64=base64.b64encode(values.tobytes()).decode()
    )
