"""``cliptag submit`` as a user runs it: single images, directories, s3:// prefixes, bulk jobs, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from PIL import Image

from producer.backfill import expand_sources
from producer.client import Client


def run_cli(
    *args: str, redis_url: str, queue: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    variables = {**os.environ, "CLIPTAG_REDIS_URL": redis_url, "CLIPTAG_QUEUE": queue, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=variables,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def nested_dir(image_dir: Path) -> Path:
    """image_dir plus a sub-directory with two more images and a non-image file."""
    sub = image_dir / "sub"
    sub.mkdir()
    Image.new("RGB", (120, 80), (0, 0, 255)).save(sub / "blue.png")
    Image.new("L", (50, 50), 128).save(sub / "gray.jpg")
    (sub / "notes.txt").write_text("not an image")
    return image_dir


def test_submit_wait_json_prints_one_result_per_image(
    start_worker, redis_server, queue_name, image_dir: Path
):
    start_worker()
    images = [str(image_dir / "cat.jpg"), str(image_dir / "rocket.jpg")]
    done = run_cli(
        "submit",
        *images,
        "--labels",
        "cat,rocket",
        "--wait",
        "--json",
        redis_url=redis_server.url,
        queue=queue_name,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["image"] for r in results] == images
    assert all(
        r["status"] == "ok" and {s["label"] for s in r["scores"]} == {"cat", "rocket"} for r in results
    )


def test_directory_backfill_in_bulk_jobs_resumes_from_its_record(
    start_worker, redis_server, queue_name, nested_dir: Path, tmp_path: Path
):
    start_worker()
    record = tmp_path / "submitted.jsonl"
    common = ("--labels", "cat,dog", "--bulk-size", "3", "--record", str(record), "--wait", "--json")
    first = run_cli("submit", str(nested_dir), *common, redis_url=redis_server.url, queue=queue_name)
    assert first.returncode == 0, first.stderr
    top_level = sorted(str(p.resolve()) for p in nested_dir.iterdir() if p.is_file())
    results = [json.loads(line) for line in first.stdout.splitlines()]
    items = [item for result in results for item in result["items"]]
    assert sorted(item["image"] for item in items) == top_level
    assert all(item["status"] == "ok" for item in items)
    assert len(results) == -(-len(top_level) // 3)

    everything = run_cli(
        "submit", str(nested_dir), "--recursive", *common, redis_url=redis_server.url, queue=queue_name
    )
    assert everything.returncode == 0, everything.stderr
    new_items = [item for line in everything.stdout.splitlines() for item in json.loads(line)["items"]]
    assert sorted(item["image"] for item in new_items) == sorted(
        str((nested_dir / "sub" / name).resolve()) for name in ("blue.png", "gray.jpg")
    )
    assert f"skipped {len(top_level)} images" in everything.stderr
    recorded = [json.loads(line) for line in record.read_text().splitlines()]
    assert sum(len(entry["images"]) for entry in recorded) == len(top_level) + 2


def test_submit_prints_ids_as_it_goes_and_resumes_past_a_torn_record(
    redis_server, queue_name, image_dir: Path, tmp_path: Path
):
    """No worker: what ``cliptag submit`` itself does. A record whose last line a crash cut
    short is mended (that image is sent again); a file named relative to the working
    directory is the same reference as the directory listing's; without ``--wait`` each job
    id is printed; ``--wait`` past its timeout and an unreachable Redis are one-line errors."""
    images = sorted(str(p.resolve()) for p in image_dir.iterdir() if p.is_file())
    record = tmp_path / "record.jsonl"
    record.write_text(json.dumps({"job_id": "a", "images": images[:1]}) + '\n{"job_id": "b", "ima')
    relative = Path(images[1]).relative_to(image_dir.parent)

    first = run_cli(
        "submit", str(relative), "--labels", "cat", "--record", str(record),
        redis_url=redis_server.url, queue=queue_name, cwd=image_dir.parent,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.split()) == 1 and redis.Redis.from_url(redis_server.url).llen(queue_name) == 1
    rest = run_cli(
        "submit", str(image_dir), "--labels", "cat", "--record", str(record),
        redis_url=redis_server.url, queue=queue_name,
    )  # fmt: skip
    assert rest.returncode == 0, rest.stderr
    assert "skipped 2 images" in rest.stderr and len(rest.stdout.split()) == len(images) - 2
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(image for entry in entries for image in entry["images"]) == images

    waited = run_cli(
        "submit", images[0], "--labels", "cat", "--wait", "--timeout", "0.5",
        redis_url=redis_server.url, queue=queue_name,
    )  # fmt: skip
    assert waited.returncode == 2 and "has no result after 0.5 s" in waited.stderr
    assert "Traceback" not in waited.stderr
    unreachable = "redis://127.0.0.1:1/0"
    down = run_cli("submit", images[0], "--labels", "cat", redis_url=unreachable, queue=queue_name)
    assert down.returncode == 1 and "Redis did not answer" in down.stderr and "Traceback" not in down.stderr
    both = run_cli(
        "submit", images[0], "--labels", "cat", "--label-set", "s", redis_url=unreachable, queue=queue_name
    )
    assert both.returncode == 1 and "--label-set replaces --labels" in both.stderr
    record.write_text('[1]\n{"job_id": "a", "images": []}\n')
    corrupt = run_cli(
        "submit",
        images[0],
        "--labels",
        "cat",
        "--record",
        str(record),
        redis_url=unreachable,
        queue=queue_name,
    )
    assert corrupt.returncode == 1 and "line 1 is not a submission record" in corrupt.stderr
    sentinel = run_cli("submit", images[0], "--labels", "cat", redis_url="sentinel://h:1", queue=queue_name)
    assert sentinel.returncode == 1 and "CLIPTAG_REDIS_URL: Value error, 'sentinel' URLs" in sentinel.stderr


def test_s3_prefix_backfill_lists_with_the_paginator(
    start_worker, redis_server, queue_name, s3_server, image_dir, monkeypatch
):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3 = s3_server.client()
    s3.create_bucket(Bucket="uploads")
    for index in range(5):
        s3.upload_file(str(image_dir / "cat.jpg"), "uploads", f"2024/06/img-{index}.jpg")
    s3.upload_file(str(image_dir / "coffee.jpg"), "uploads", "2024/06/deeper/coffee.jpg")
    s3.put_object(Bucket="uploads", Key="2024/06/readme.txt", Body=b"text")
    listed = list(
        expand_sources(["s3://uploads/2024/06/"], recursive=False, s3_endpoint_url=s3_server.endpoint_url)
    )
    assert listed == [f"s3://uploads/2024/06/img-{i}.jpg" for i in range(5)]

    start_worker(env=s3_server.env)
    done = run_cli(
        "submit",
        "s3://uploads/2024/06/",
        "--recursive",
        "--labels",
        "cat,cup",
        "--wait",
        "--json",
        redis_url=redis_server.url,
        queue=queue_name,
        env=s3_server.env,
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 6
    assert all(r["status"] == "ok" for r in results)
    assert "s3://uploads/2024/06/deeper/coffee.jpg" in {r["image"] for r in results}

    missing = run_cli(
        "submit", "s3://no-such-bucket/x/", "--labels", "cat",
        redis_url=redis_server.url, queue=queue_name, env=s3_server.env,
    )  # fmt: skip
    assert missing.returncode == 1 and "listing s3://no-such-bucket/x/ failed" in missing.stderr
    assert "NoSuchBucket" in missing.stderr and "Traceback" not in missing.stderr


def test_bulk_job_scores_equal_single_jobs(start_worker, client: Client, image_dir: Path):
    start_worker(max_wait_ms=500)
    images = [str(image_dir / name) for name in ("cat.jpg", "coffee.jpg", "red-tall.png")]
    bulk = next(client.submit_many(images, ["cat", "cup"], bulk_size=10)).result(timeout=60)
    singles = [job.result(timeout=60) for job in client.submit_many(images, ["cat", "cup"])]
    assert [item.image for item in bulk.items] == images
    for item, single in zip(bulk.items, singles, strict=True):
        for mine, theirs in zip(item.scores, single.scores, strict=True):
            assert mine.label == theirs.label
            assert mine.score == pytest.approx(theirs.score, abs=1e-6)
