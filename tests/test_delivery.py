"""Results, idempotent submission, retries and dead letters, through a real worker and Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.contract import TASK_NAME, JobResult
from producer.delivery import claim_key, deliveries_key
from producer.errors import ErrorCode, JobFailed
from tests.servers import Reply, Request
from worker.backoff import backoff_delay, countdown_cap

READ_IN_ANOTHER_PROCESS = """
import sys
from producer.client import Client
with Client(sys.argv[1]) as client:
    print(client.job(sys.argv[2]).result(timeout=10).model_dump_json())
"""


def log_events(worker, event: str) -> list[dict]:
    lines = (line for line in worker.log_text().splitlines() if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


def test_same_job_id_pending_or_done_runs_once_and_result_outlives_worker(
    start_worker, client, image_dir: Path, queue_name: str
):
    cat = str(image_dir / "cat.jpg")
    job_id = f"upload-{queue_name}"
    first = client.submit(cat, ["cat", "dog"], job_id=job_id, metadata={"n": 1})
    pending_again = client.submit(cat, ["cat", "dog"], job_id=job_id, metadata={"n": 2})
    assert pending_again.id == first.id == job_id
    assert client.redis.llen(queue_name) == 1, "a pending job id is enqueued once"
    assert first.request is not None and pending_again.request is None, "not the document that runs"

    worker = start_worker(result_ttl=600)
    result = first.result(timeout=60)
    assert result.status == "ok" and result.metadata == {"n": 1}, "the first submission is what runs"
    done_again = client.submit(cat, ["cat", "dog"], job_id=job_id, metadata={"n": 3})
    assert done_again.result(timeout=5) == result
    assert client.redis.llen(queue_name) == 0, "a done job id is not enqueued again"
    assert client.redis.hgetall(deliveries_key(job_id)) == {"0": "1"}, "delivered and run exactly once"

    assert 0 < client.redis.ttl(f"celery-task-meta-{job_id}") <= 600, "results expire (CLIPTAG_RESULT_TTL)"
    assert 0 < client.redis.ttl(claim_key(job_id)) <= client.settings.result_ttl

    worker.stop()
    read = subprocess.run(
        [sys.executable, "-c", READ_IN_ANOTHER_PROCESS, client.settings.redis_url, job_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert read.returncode == 0, read.stderr
    assert JobResult.model_validate_json(read.stdout) == result


def test_transient_errors_retried_with_backoff_permanent_ones_dead_lettered_at_once(
    start_worker, client, http_server, image_dir: Path, queue_name: str
):
    gets: list[float] = []

    def unavailable(request: Request) -> Reply:
        gets.append(time.monotonic())
        return Reply(503, b"try later")

    http_server.routes["/flaky.jpg"] = unavailable
    worker = start_worker(max_retries=2, allowed_hosts="127.0.0.1")
    flaky = client.submit(http_server.url("/flaky.jpg"), ["cat", "dog"], job_id=f"flaky-{queue_name}")
    missing = client.submit(str(image_dir / "nope.jpg"), ["cat", "dog"], job_id=f"missing-{queue_name}")
    bulk_partial = client.submit_job(
        {"images": [str(image_dir / "cat.jpg"), str(image_dir / "gone.jpg")], "labels": ["cat", "dog"]}
    )
    bulk_failed = client.submit_job(
        {"images": [str(image_dir / "gone.jpg"), str(image_dir / "gone2.jpg")], "labels": ["cat", "dog"]}
    )
    raw = {"job_id": f"raw-{queue_name}", "image": "x", "labels": "cat"}
    client.celery.send_task(TASK_NAME, args=[raw], task_id=raw["job_id"], queue=queue_name)

    with pytest.raises(JobFailed) as transient:
        flaky.result(timeout=90)
    assert transient.value.code is ErrorCode.FETCH_FAILED and transient.value.retryable
    assert transient.value.result["attempts"] == 3
    assert len(gets) == 3, "the first attempt and CLIPTAG_MAX_RETRIES=2 retries"
    first_gap, second_gap = gets[1] - gets[0], gets[2] - gets[1]
    assert first_gap >= 0.5 and second_gap >= 1.0, "exponential backoff: at least 0.5 s, then 1 s"
    assert [e["attempt"] for e in log_events(worker, "job_retry") if e["job_id"] == flaky.id] == [1, 2]

    with pytest.raises(JobFailed) as permanent:
        missing.result(timeout=60)
    assert permanent.value.code is ErrorCode.FETCH_NOT_FOUND and permanent.value.result["attempts"] == 1
    assert bulk_partial.result(timeout=60).status == "ok"
    assert bulk_failed.result(timeout=60, raise_on_error=False).status == "error"
    with pytest.raises(JobFailed) as invalid:
        client.job(raw["job_id"]).result(timeout=60)
    assert invalid.value.code is ErrorCode.INVALID_REQUEST

    letters = {letter.job_id: letter for letter in client.dead_letters.list(queue=queue_name)}
    assert letters.keys() == {flaky.id, missing.id, bulk_failed.id, raw["job_id"]}
    assert all(letter.kind == "job" for letter in letters.values())
    assert letters[flaky.id].attempts == 3 and letters[flaky.id].error.code is ErrorCode.FETCH_FAILED
    assert letters[flaky.id].error.retryable
    assert letters[flaky.id].job == flaky.request.model_dump(mode="json", exclude_none=True)
    assert letters[missing.id].attempts == 1 and not letters[missing.id].error.retryable
    assert letters[bulk_failed.id].error.code is ErrorCode.FETCH_NOT_FOUND
    assert letters[raw["job_id"]].job == raw, "the original document, as received"
    assert letters[flaky.id].first_failed_at <= letters[flaky.id].last_failed_at <= time.time()


def test_backoff_grows_exponentially_with_jitter_and_stays_inside_the_visibility_timeout():
    for retries in range(8):
        ceiling = min(30.0, 2.0**retries)
        delays = [backoff_delay(retries, base=1.0, cap=30.0) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1, "jittered"
    assert countdown_cap(90, 30.0) == 30.0
    assert countdown_cap(10, 30.0) == pytest.approx(10 / 3)
