"""Every job kind through a real worker, against plain ``transformers`` (the exact path).

tag (softmax, multilabel, ensembles, per-label prompts), embed, rank and text_embed each
match the reference; a batch mixing all of them gives what each job gives alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from producer.contract import DEFAULT_TEMPLATE, JobResult
from producer.labelsets import LabelSetDefinition, LabelSetStore
from producer.templates import ENSEMBLES, fill
from tests.reference import ReferenceClip

LABELS = ["cat", "dog", "car", "rocket"]
TEXTS = ["a cat on a sofa", "a rocket launch", "a cup of coffee", "an astronaut"]


def ensembled(reference: ReferenceClip, prompts_per_label: list[list[str]]) -> torch.Tensor:
    """The CLIP paper's ensembling: per label, the normalized mean of its normalized prompt embeddings."""
    rows = [reference.text_embeddings(prompts).mean(dim=0) for prompts in prompts_per_label]
    matrix = torch.stack(rows)
    return matrix / matrix.norm(dim=-1, keepdim=True)


def vector(encoded: Any) -> torch.Tensor:
    return torch.tensor(encoded.to_list())


def scores_of(result: JobResult) -> dict[str, float]:
    return {entry.label: entry.score for entry in result.scores}


def assert_close(got: torch.Tensor, expected: torch.Tensor, *, tolerance: float = 1e-5) -> None:
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= tolerance


def test_each_kind_matches_the_reference(start_worker, client, image_dir: Path, tiny_clip: Path):
    start_worker(max_batch=16)
    reference = ReferenceClip(tiny_clip)
    cat, rocket = image_dir / "cat.jpg", image_dir / "rocket.jpg"
    own_prompts = {"cat": ["a photo of a cat, a type of pet", "a cat"]}
    extra_template = "a {} in space."
    jobs = {
        "softmax": {"image": str(cat), "labels": LABELS, "return_embedding": True, "top_k": 2},
        "multilabel": {"image": str(cat), "labels": LABELS, "mode": "multilabel"},
        "centered": {
            "image": str(cat),
            "labels": LABELS,
            "mode": "multilabel",
            "multilabel_center": 0.45,
            "threshold": 0.3,
        },
        "ensemble": {"image": str(rocket), "labels": LABELS, "template": ["ensemble:photo", extra_template]},
        "overrides": {"image": str(cat), "labels": ["cat", "dog"], "prompts": own_prompts},
        "embed": {"kind": "embed", "images": [str(cat), str(rocket)]},
        "embed16": {"kind": "embed", "image": str(rocket), "embedding_dtype": "float16"},
        "rank": {"kind": "rank", "image": str(rocket), "texts": TEXTS, "top_k": 3},
        "rank_templated": {
            "kind": "rank",
            "image": str(cat),
            "texts": LABELS,
            "template": "a photo of a {}.",
        },
        "text_embed": {"kind": "text_embed", "texts": TEXTS},
        "text_ensemble": {"kind": "text_embed", "texts": ["cat", "dog"], "template": "ensemble:photo"},
    }
    submitted = {name: client.submit_job(document) for name, document in jobs.items()}
    results = {name: job.result(timeout=120) for name, job in submitted.items()}
    scale = reference.logit_scale
    cat_image, rocket_image = reference.image_embedding(cat), reference.image_embedding(rocket)
    default_prompts = [fill(DEFAULT_TEMPLATE, label) for label in LABELS]
    cosines = reference.text_embeddings(default_prompts) @ cat_image

    softmax = results["softmax"]
    expected = dict(zip(LABELS, reference.probabilities(cat, default_prompts), strict=True))
    assert [entry.label for entry in softmax.scores] == sorted(expected, key=expected.get, reverse=True)[:2]
    for label, score in scores_of(softmax).items():
        assert score == pytest.approx(expected[label], abs=1e-5)
    assert softmax.tags == [softmax.top_label] == [softmax.scores[0].label]
    assert softmax.embedding.dtype == "float32" and softmax.embedding.dim == cat_image.shape[0]
    assert_close(vector(softmax.embedding), cat_image)

    multilabel = results["multilabel"]
    expected = dict(zip(LABELS, torch.sigmoid(scale * (cosines - 0.25)).tolist(), strict=True))
    assert scores_of(multilabel) == pytest.approx(expected, abs=1e-5)
    assert multilabel.tags == [label for label, score in scores_of(multilabel).items() if score >= 0.5]

    centered = results["centered"]
    expected = dict(zip(LABELS, torch.sigmoid(scale * (cosines - 0.45)).tolist(), strict=True))
    assert scores_of(centered) == pytest.approx(expected, abs=1e-5)
    assert centered.tags == [label for label, score in scores_of(centered).items() if score >= 0.3]
    assert scores_of(centered) != pytest.approx(scores_of(multilabel), abs=1e-3)

    templates = [*ENSEMBLES["photo"], extra_template]
    labels = ensembled(reference, [[fill(t, label) for t in templates] for label in LABELS])
    expected = dict(zip(LABELS, (scale * labels @ rocket_image).softmax(dim=-1).tolist(), strict=True))
    assert scores_of(results["ensemble"]) == pytest.approx(expected, abs=1e-5)

    labels = ensembled(reference, [own_prompts["cat"], [fill(DEFAULT_TEMPLATE, "dog")]])
    expected = dict(zip(["cat", "dog"], (scale * labels @ cat_image).softmax(dim=-1).tolist(), strict=True))
    assert scores_of(results["overrides"]) == pytest.approx(expected, abs=1e-5)

    embed = results["embed"]
    assert embed.scores is None and [item.image for item in embed.items] == [str(cat), str(rocket)]
    for item, expected_vector in zip(embed.items, [cat_image, rocket_image], strict=True):
        assert item.status == "ok" and item.embedding.dtype == "float32"
        assert_close(vector(item.embedding), expected_vector)
    half = results["embed16"].embedding
    assert half.dtype == "float16" and len(half.b64) < len(embed.items[1].embedding.b64)
    assert_close(vector(half), rocket_image, tolerance=1e-3)

    rank = results["rank"]
    similarities = (reference.text_embeddings(TEXTS) @ rocket_image).tolist()
    best_first = sorted(range(len(TEXTS)), key=lambda i: -similarities[i])[:3]
    assert [entry.text for entry in rank.texts] == [TEXTS[i] for i in best_first]
    assert [entry.rank for entry in rank.texts] == [1, 2, 3]
    for entry, i in zip(rank.texts, best_first, strict=True):
        assert entry.similarity == pytest.approx(similarities[i], abs=1e-5)

    templated = {entry.text: entry.similarity for entry in results["rank_templated"].texts}
    expected = dict(zip(LABELS, cosines.tolist(), strict=True))
    assert templated == pytest.approx(expected, abs=1e-5)

    text_embed = results["text_embed"]
    assert text_embed.image is None and len(text_embed.text_embeddings) == len(TEXTS)
    assert {"queue_wait", "inference", "total"} <= text_embed.timings_ms.keys()
    assert_close(
        torch.stack([vector(e) for e in text_embed.text_embeddings]), reference.text_embeddings(TEXTS)
    )
    expected_rows = ensembled(
        reference, [[fill(t, text) for t in ENSEMBLES["photo"]] for text in ["cat", "dog"]]
    )
    got_rows = torch.stack([vector(e) for e in results["text_ensemble"].text_embeddings])
    assert_close(got_rows, expected_rows)


def test_mixed_batch_gives_the_same_answers_as_each_job_alone(
    start_worker, client, redis_server, queue_name: str, image_dir: Path
):
    start_worker(max_wait_ms=2000, max_batch=16)
    label_set = f"{queue_name}-vehicles"
    LabelSetStore.from_url(redis_server.url).put(
        label_set, LabelSetDefinition(labels=["car", "rocket", "cup"], template="ensemble:photo")
    )
    cat, rocket, coffee = (str(image_dir / name) for name in ("cat.jpg", "rocket.jpg", "coffee.jpg"))
    jobs = {
        "tag": {"image": cat, "labels": ["cat", "dog"]},
        "tag_set": {"image": rocket, "label_set": label_set},
        "multilabel": {"image": coffee, "labels": LABELS, "mode": "multilabel", "return_embedding": True},
        "embed": {"kind": "embed", "image": coffee},
        "rank": {"kind": "rank", "image": cat, "texts": TEXTS},
        "text_embed": {"kind": "text_embed", "texts": TEXTS[:2]},
    }
    alone = {name: client.submit_job(document).result(timeout=120) for name, document in jobs.items()}
    for name, result in alone.items():
        assert result.batch_size == (0 if name == "text_embed" else 1), name
    assert alone["tag_set"].label_set_version == 1

    mixed_jobs = {name: client.submit_job(document) for name, document in jobs.items()}
    mixed = {name: job.result(timeout=120) for name, job in mixed_jobs.items()}
    assert len({result.batch_id for result in mixed.values()}) == 1, "all kinds share one forward pass"
    assert {result.batch_size for result in mixed.values()} == {5}

    for name, result in mixed.items():
        single = alone[name]
        assert result.status == single.status == "ok", name
        if single.scores is not None:
            assert [e.label for e in result.scores] == [e.label for e in single.scores], name
            assert scores_of(result) == pytest.approx(scores_of(single), abs=1e-6), name
            assert result.tags == single.tags, name
        if single.texts is not None:
            assert [(e.text, e.rank) for e in result.texts] == [(e.text, e.rank) for e in single.texts]
            assert [e.similarity for e in result.texts] == pytest.approx([e.similarity for e in single.texts])
        if single.embedding is not None:
            assert_close(vector(result.embedding), vector(single.embedding), tolerance=1e-6)
        if single.text_embeddings is not None:
            for got, expected in zip(result.text_embeddings, single.text_embeddings, strict=True):
                assert_close(vector(got), vector(expected), tolerance=1e-6)
    assert mixed["tag_set"].label_set_version == 1
    assert {entry.label for entry in mixed["tag_set"].scores} == {"car", "rocket", "cup"}
