"""Producer → Redis → batching Celery worker → result, through real processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from producer.client import Client
from producer.config import QueueSettings
from producer.errors import ErrorCode, JobError, JobFailed
from tests.reference import ReferenceClip
from worker.cores import usable_cores

LABEL_SETS = [["cat", "dog", "car"], ["cup", "rocket"], ["person", "a photo", "cat", "the dog"]]


def test_scores_match_reference_in_one_mixed_batch(start_worker, client, image_dir: Path, tiny_clip: Path):
    """Mixed sizes and mixed label sets, gathered into shared forward passes, equal the reference."""
    start_worker(max_wait_ms=1500, max_batch=16)
    images = sorted(image_dir.iterdir())
    jobs = [
        (path, labels, client.submit(str(path), labels, metadata={"n": i}))
        for i, (path, labels) in enumerate((p, LABEL_SETS[i % 3]) for i, p in enumerate(images))
    ]
    reference = ReferenceClip(tiny_clip)
    batch_ids = set()
    for path, labels, job in jobs:
        result = job.result(timeout=120)
        assert result.status == "ok"
        assert result.image == str(path)
        assert result.metadata == {"n": jobs.index((path, labels, job))}
        probabilities = reference.probabilities(path, [f"a photo of a {x}." for x in labels])
        expected = dict(zip(labels, probabilities, strict=True))
        got = {entry.label: entry.score for entry in result.scores}
        assert got.keys() == expected.keys()
        for label, score in expected.items():
            assert got[label] == pytest.approx(score, abs=1e-5)
        assert [s.score for s in result.scores] == sorted(got.values(), reverse=True)
        assert result.top_label == result.scores[0].label
        assert result.tags == [result.top_label]
        assert result.model.id == str(tiny_clip)
        assert {"queue_wait", "fetch", "preprocess", "inference"} <= result.timings_ms.keys()
        batch_ids.add(result.batch_id)
    assert len(batch_ids) < len(jobs), "jobs submitted together must share forward passes"


def test_fast_preprocessing_through_a_worker_stays_close_to_the_reference(
    start_worker, client, image_dir: Path, tiny_clip: Path
):
    """The production default (``CLIPTAG_EXACT_PREPROCESS=0``, which the other tests turn off):
    the column resize on landscape and portrait photos, and JPEG draft decode, give scores
    close to the reference's. The tiny model's 64-pixel input lets every photo here be
    draft-decoded at ½ or less (its pixels stray up to 0.28 in normalized units, against
    0.06 at ViT-B/32's 224: docs/benchmarks.md), hence a bound of 0.01 on scores."""
    cat = Image.open(image_dir / "cat.jpg")
    cat.transpose(Image.Transpose.ROTATE_90).save(image_dir / "cat-portrait.jpg", quality=95)
    cat.resize((1920, 1080)).save(image_dir / "cat-1080p.jpg", quality=90)
    worker = start_worker(exact_preprocess=0)
    logged = [json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{")]
    assert next(line for line in logged if line.get("event") == "model_ready")["preprocess"] == "fast"
    reference = ReferenceClip(tiny_clip)
    labels = LABEL_SETS[0]
    for name in ("cat.jpg", "coffee.jpg", "cat-portrait.jpg", "cat-1080p.jpg"):
        result = client.submit(str(image_dir / name), labels).result(timeout=120)
        expected = reference.probabilities(image_dir / name, [f"a photo of a {x}." for x in labels])
        got = {entry.label: entry.score for entry in result.scores}
        for label, score in zip(labels, expected, strict=True):
            assert got[label] == pytest.approx(score, abs=1e-2), name


def test_batching_uses_fewer_forward_passes_than_jobs(start_worker, client, image_dir: Path):
    worker = start_worker(max_wait_ms=2000, max_batch=32)
    path = str(image_dir / "cat.jpg")
    jobs = [client.submit(path, ["cat", "dog"]) for _ in range(24)]
    results = [job.result(timeout=120) for job in jobs]
    batches = {r.batch_id: r.batch_size for r in results}
    assert len(batches) < len(jobs)
    assert max(batches.values()) > 1
    logged = [json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{")]
    batch_lines = [line for line in logged if line.get("event") == "batch"]
    assert {line["batch_id"] for line in batch_lines} >= batches.keys()
    frozen = [line["objects"] for line in logged if line.get("event") == "startup_objects_frozen"]
    assert frozen and frozen[0] > 100_000, "the model and libraries are exempt from garbage collection"
    ready = next(line for line in logged if line.get("event") == "model_ready")
    assert ready["cpu_cores"] == ready["decode_threads"] == usable_cores(), "one decoder per usable core"
    assert 1 <= ready["torch_threads"] <= usable_cores()


def test_invalid_job_is_answered_with_code_and_worker_keeps_going(start_worker, client, image_dir: Path):
    worker = start_worker()
    bad = client.celery.send_task(
        "cliptag.tag",
        args=[{"job_id": "bad-1", "image": "x", "labels": "cat"}],
        task_id="bad-1",
        queue=client.settings.queue,
    )
    with pytest.raises(JobFailed) as failed:
        client.job(bad.id).result(timeout=60)
    assert failed.value.code is ErrorCode.INVALID_REQUEST
    assert "labels" in failed.value.message
    good = client.submit(str(image_dir / "cat.jpg"), ["cat", "dog"]).result(timeout=60)
    assert good.status == "ok"
    assert worker.alive()


def test_producer_rejects_bad_job_before_enqueueing(client):
    with pytest.raises(JobError) as rejected:
        client.submit("/img.jpg", [])
    assert rejected.value.code is ErrorCode.INVALID_REQUEST
    assert "labels" in rejected.value.message


def test_result_readable_from_another_client_after_worker_stopped(
    start_worker, client, image_dir, redis_server
):
    worker = start_worker()
    job = client.submit(str(image_dir / "coffee.jpg"), ["cup", "cat"], job_id="upload-42")
    first = job.result(timeout=60)
    worker.stop()
    with Client(settings=QueueSettings(redis_url=redis_server.url)) as other:
        again = other.job("upload-42").result(timeout=5)
    assert again.scores == first.scores


def test_missing_file_fails_with_code_while_batch_mates_succeed(start_worker, client, image_dir: Path):
    start_worker(max_wait_ms=1000)
    missing = client.submit(str(image_dir / "nope.jpg"), ["cat", "dog"])
    good = client.submit(str(image_dir / "cat.jpg"), ["cat", "dog"])
    with pytest.raises(JobFailed) as failed:
        missing.result(timeout=60)
    assert failed.value.code is ErrorCode.FETCH_NOT_FOUND
    assert good.result(timeout=60).status == "ok"
