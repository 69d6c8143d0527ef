"""The dead-letter store and ``cliptag dlq``, run as the real command against a real worker."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from producer.contract import ErrorInfo
from producer.delivery import claim_key, deliveries_key
from producer.dlq import DeadLetter, DeadLetterStore
from producer.errors import ErrorCode, JobFailed


def cliptag(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env={**os.environ, "CLIPTAG_REDIS_URL": redis_url, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dlq_retry_brings_a_job_back_under_its_id_once_the_cause_is_fixed(
    start_worker, client, image_dir: Path, queue_name: str
):
    start_worker()
    url = client.settings.redis_url
    late, later = image_dir / "late.jpg", image_dir / "later.jpg"
    first = client.submit(str(late), ["cat", "dog"], job_id=f"late-{queue_name}")
    second = client.submit(str(later), ["cat", "dog"], job_id=f"later-{queue_name}")
    for job in (first, second):
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=60)
        assert failed.value.code is ErrorCode.FETCH_NOT_FOUND

    listed = cliptag(url, "dlq", "list", "--queue", queue_name, "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(line)["job_id"] for line in listed.stdout.splitlines()) == [first.id, second.id]
    table = cliptag(url, "dlq", "list", "--code", "fetch_not_found", "--queue", queue_name)
    assert first.id in table.stdout and second.id in table.stdout and "2 dead letter(s)" in table.stderr
    shown = cliptag(url, "dlq", "show", first.id)
    assert shown.returncode == 0, shown.stderr
    letter = json.loads(shown.stdout)
    assert letter["job"]["image"] == str(late) and letter["error"]["code"] == "fetch_not_found"
    assert letter["attempts"] == 1 and letter["queue"] == queue_name

    assert cliptag(url, "dlq", "retry").returncode == 2, "a selection is required"
    unknown = cliptag(url, "dlq", "retry", f"nope-{queue_name}")
    assert unknown.returncode == 2 and "no dead letter" in unknown.stderr
    assert cliptag(url, "dlq", "list", "--code", "no_such_code").returncode == 2

    shutil.copy(image_dir / "cat.jpg", late)  # the cause, fixed
    retried = cliptag(url, "dlq", "retry", first.id)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"requeued job {first.id}"
    result = client.job(first.id).result(timeout=60)
    assert result.status == "ok" and result.job_id == first.id and result.image == str(late)
    assert client.redis.hgetall(deliveries_key(first.id)) == {"0": "1"}, "counts start afresh"
    assert client.dead_letters.get(first.id) is None

    again = cliptag(url, "dlq", "retry", second.id)  # its cause is not fixed: it fails again
    assert again.returncode == 0, again.stderr
    with pytest.raises(JobFailed):
        client.job(second.id).result(timeout=60)
    assert client.dead_letters.get(second.id) is not None, "the new failure's letter, not removed"

    purged = cliptag(url, "dlq", "purge", "--all", "--queue", queue_name)
    assert purged.returncode == 0 and purged.stdout.strip() == f"purged job {second.id}"
    assert client.dead_letters.count(queue=queue_name) == 0
    assert client.job(second.id).result(timeout=5, raise_on_error=False).status == "error"


def letter(job_id: str, code: ErrorCode, *, kind: str = "job", queue: str = "a", at: float) -> DeadLetter:
    return DeadLetter(
        job_id=job_id,
        kind=kind,
        job={"job_id": job_id},
        error=ErrorInfo(code=code, message=f"{code.value} for {job_id}", retryable=code.retryable),
        queue=queue,
        first_failed_at=at,
        last_failed_at=at,
    )


def test_store_filters_by_code_kind_and_queue_and_keeps_the_first_failure_time(redis_server, queue_name):
    import redis

    store = DeadLetterStore(redis.Redis.from_url(redis_server.url), prefix=f"test:{queue_name}")
    store.add(letter("a1", ErrorCode.FETCH_FAILED, at=100.0))
    store.add(letter("a2", ErrorCode.POISON_MESSAGE, at=200.0))
    store.add(letter("a1", ErrorCode.WEBHOOK_FAILED, kind="webhook", at=300.0))
    store.add(letter("b1", ErrorCode.FETCH_FAILED, queue="b", at=400.0))
    assert [x.job_id for x in store.list()] == ["a1", "a2", "a1", "b1"]
    assert [x.job_id for x in store.list(code="fetch_failed")] == ["a1", "b1"]
    assert [(x.kind, x.job_id) for x in store.list(kind="webhook")] == [("webhook", "a1")]
    assert store.count() == 4 and store.count(queue="a") == 3 and store.count(queue="b") == 1

    store.add(letter("a1", ErrorCode.FETCH_FAILED, at=500.0))
    again = store.get("a1")
    assert again is not None and again.first_failed_at == 100.0 and again.last_failed_at == 500.0
    assert [x.job_id for x in store.list(kind="job")] == ["a2", "b1", "a1"], "ordered by last failure"
    assert store.remove("a1") and not store.remove("a1")
    assert store.get("a1", kind="webhook") is not None, "kinds are separate entries"


def test_requeue_runs_the_letter_under_its_own_id_once_and_drops_its_deadline(client, queue_name):
    """A letter whose document has no ``job_id`` (a producer in another language may leave it
    to the worker) goes back under the letter's id; an ``expires_at`` long past is dropped;
    the earlier run's result and delivery counts go in the same atomic step; a letter that is
    gone by the time it is sent (a concurrent retry) is not sent twice."""
    job_id = f"orig-{queue_name}"
    document = {"image": "/data/cat.jpg", "labels": ["cat", "dog"], "expires_at": 1.0}
    stale = DeadLetter(
        job_id=job_id,
        job=document,
        error=ErrorInfo(code=ErrorCode.EXPIRED, message="expired", retryable=False),
        queue=queue_name,
        first_failed_at=1.0,
        last_failed_at=1.0,
    )
    client.dead_letters.add(stale)
    broker = client.redis
    client.celery.backend.store_result(job_id, {"job_id": job_id, "status": "error"}, "SUCCESS")
    broker.hset(deliveries_key(job_id), "0", "1")

    assert client.requeue(stale) is True
    assert broker.llen(queue_name) == 1
    entry = json.loads(broker.lindex(queue_name, 0))
    assert entry["headers"]["id"] == job_id
    (sent,), _, _ = json.loads(base64.b64decode(entry["body"]))
    assert sent["job_id"] == job_id and "expires_at" not in sent and sent["image"] == "/data/cat.jpg"
    assert broker.get(claim_key(job_id)) == queue_name
    assert client.job(job_id).ready() is False, "the earlier result is gone"
    assert broker.exists(deliveries_key(job_id)) == 0
    assert client.dead_letters.get(job_id) is None

    assert client.requeue(stale) is False, "the same letter, sent again by a second operator"
    assert broker.llen(queue_name) == 1
