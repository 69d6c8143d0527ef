"""Labels to prompts: templates, built-in ensembles and per-label overrides.

A label stands for one or more prompts; the batcher averages their normalized text
embeddings and renormalizes the mean (the CLIP paper's prompt ensembling). The ensembles
themselves are part of the contract: :data:`producer.templates.ENSEMBLES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from producer.templates import PLACEHOLDER, expand_templates, fill
from worker.batcher import LabelPrompts


def label_prompts(
    labels: Sequence[str],
    template: str | Sequence[str] | None,
    overrides: Mapping[str, Sequence[str]] | None = None,
) -> list[LabelPrompts]:
    """For each label, the prompts whose mean embedding represents it.

    Args:
        labels: the labels (or texts) in order.
        template: one template, ``"ensemble:NAME"``, or a list of either; ``None`` uses
            each label as its own prompt, unchanged (captions, search queries).
        overrides: per-label prompts used instead of the templates, verbatim.
    """
    templates = (PLACEHOLDER,) if template is None else expand_templates(template)
    overrides = overrides or {}
    return [
        tuple(overrides[label]) if label in overrides else tuple(fill(t, label) for t in templates)
        for label in labels
    ]
