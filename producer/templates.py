"""Prompt templates: the built-in ensembles and the rules every template follows.

Ensemble names are part of the wire contract (a job says ``template: "ensemble:photo"``),
so they live on the producer side: a job naming an unknown ensemble is rejected before
it is enqueued. See ``docs/jobs.md`` for how a label's embedding is built from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from producer.errors import shorten

ENSEMBLE_PREFIX = "ensemble:"
PLACEHOLDER = "{}"
MAX_TEMPLATES = 100

ENSEMBLES: Mapping[str, tuple[str, ...]] = {
    "photo": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo showing a {}.",
        "a picture of a {}.",
        "a snapshot with a {} in it.",
        "a close-up photo of a {}.",
        "a photo of a {}, seen from a distance.",
        "a well-lit photo of a {}.",
        "a dim photo of a {}.",
        "a blurry photo of a {}.",
        "a cropped photo of a {}.",
        "a phone photo of a {}.",
    ),
    "illustration": (
        "a drawing of a {}.",
        "a painting of a {}.",
        "an illustration of a {}.",
        "a sketch of a {}.",
        "a cartoon of a {}.",
        "a 3D render of a {}.",
        "a digital artwork of a {}.",
        "a pixel-art image of a {}.",
    ),
}
"""Named template ensembles, written for cliptag, selected with ``"ensemble:NAME"``.

``photo`` varies framing, distance, light and quality the way uploaded photos vary;
``illustration`` covers drawn and rendered images. A template list may name both
(``["ensemble:photo", "ensemble:illustration"]``) to be robust to the medium.
"""


def expand_templates(template: str | Sequence[str]) -> tuple[str, ...]:
    """The flat, de-duplicated templates a ``template`` field stands for, ensembles expanded.

    Args:
        template: one template, ``"ensemble:NAME"``, or a list of either (1 to
            ``MAX_TEMPLATES`` entries).

    Raises:
        ValueError: an empty or too long list, an unknown ensemble, or a template without
            exactly one ``{}``; the message names the bad value.
    """
    items = [template] if isinstance(template, str) else list(template)
    if not items or len(items) > MAX_TEMPLATES:
        raise ValueError(f"template must be one template or a list of 1 to {MAX_TEMPLATES} templates")
    expanded: list[str] = []
    for item in items:
        if item.startswith(ENSEMBLE_PREFIX):
            name = item.removeprefix(ENSEMBLE_PREFIX)
            if name not in ENSEMBLES:
                raise ValueError(
                    f"unknown ensemble {shorten(name, 40)!r} (known: {', '.join(sorted(ENSEMBLES))})"
                )
            expanded.extend(ENSEMBLES[name])
        elif item.count(PLACEHOLDER) != 1:
            raise ValueError(f"template {shorten(item, 60)!r} must contain exactly one '{{}}'")
        else:
            expanded.append(item)
    return tuple(dict.fromkeys(expanded))


def fill(template: str, text: str) -> str:
    """``template`` with ``text`` in place of its ``{}`` (other braces are kept as they are)."""
    return template.replace(PLACEHOLDER, text)
