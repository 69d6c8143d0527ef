"""Label scores from normalized embeddings: CLIP's softmax, or independent multilabel sigmoids.

NumPy on the host: the batcher hands every job its rows as NumPy arrays, so scoring one
job is a handful of microsecond operations that never wait for a device or for the GIL.
No contract models here, so the benchmarks run it on a bare GPU host.
"""

from __future__ import annotations

import numpy as np

MULTILABEL_CENTER = 0.25
"""The cosine at which a multilabel score is 0.5 unless a job sets ``multilabel_center``.

For ViT-B/32 with "a photo of a {}." a matching label typically reaches a cosine around
0.3 with its image and an unrelated one stays near 0.2 or below; 0.25 sits between. It is a
property of the model and the prompts, not a universal constant: calibrate it (or the
threshold) on your own images."""


def label_scores(
    image_embedding: np.ndarray,
    label_embeddings: np.ndarray,
    logit_scale: float,
    *,
    mode: str,
    center: float | None = None,
) -> np.ndarray:
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
        logits = logit_scale * cosines
        exponentials = np.exp(logits - logits.max())
        return exponentials / exponentials.sum()
    center = MULTILABEL_CENTER if center is None else center
    return 1.0 / (1.0 + np.exp(-logit_scale * (cosines - center)))
