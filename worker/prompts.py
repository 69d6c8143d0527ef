"""Labels to prompts: templates, built-in ensembles and per-label overrides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from producer.errors import ErrorCode, JobError
from worker.batcher import LabelPrompts

ENSEMBLES: Mapping[str, tuple[str, ...]] = {
    "photo": (
        "a photo of a {}.",
        "a close-up photo of a {}.",
        "a photo of the {}.",
        "a blurry photo of a {}.",
        "a bright photo of a {}.",
        "a dark photo of a {}.",
        "a cropped photo of a {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
        "a good photo of a {}.",
        "a low resolution photo of a {}.",
        "a picture of a {}.",
    ),
}
"""Named template ensembles, selected with ``template: "ensemble:NAME"``; written for cliptag."""


def expand_templates(template: str | Sequence[str]) -> tuple[str, ...]:
    """The flat list of templates a job's ``template`` field stands for."""
    expanded: list[str] = []
    for item in [template] if isinstance(template, str) else template:
        if item.startswith("ensemble:"):
            name = item.removeprefix("ensemble:")
            if name not in ENSEMBLES:
                raise JobError(
                    ErrorCode.INVALID_REQUEST,
                    f"template: unknown ensemble {name!r} (known: {', '.join(sorted(ENSEMBLES))})",
                )
            expanded.extend(ENSEMBLES[name])
        else:
            expanded.append(item)
    return tuple(dict.fromkeys(expanded))


def label_prompts(
    labels: Sequence[str],
    template: str | Sequence[str],
    overrides: Mapping[str, Sequence[str]] | None = None,
) -> list[LabelPrompts]:
    """For each label, the prompts whose mean embedding represents it."""
    templates = expand_templates(template)
    overrides = overrides or {}
    return [
        tuple(overrides[label]) if label in overrides else tuple(t.format(label) for t in templates)
        for label in labels
    ]


def verbatim(texts: Sequence[str]) -> list[LabelPrompts]:
    """Each text as its own single prompt (caption ranking, text embeddings)."""
    return [(text,) for text in texts]
