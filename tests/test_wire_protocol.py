"""The any-language producer: a job enqueued and its result read with plain Redis commands.

``producer.wire.task_message`` builds exactly the message docs/operations.md ("Producing
from any language") tells a producer to LPUSH, and the Python client pushes it too; no
Celery client is involved on this side. A second test holds it against what Celery's own
``send_task`` writes, so neither the client nor the documentation can drift from Celery.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import redis

from producer.client import Client
from producer.config import QueueSettings
from producer.contract import TASK_NAME
from producer.wire import task_message
from tests.waiting import wait_until
from worker.processes import RedisServer

RESULT_KEY = "celery-task-meta-{job_id}"


def finished_result(r: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """Celery's result document of ``job_id`` once the task is done (``GET`` of the backend key)."""
    raw = r.get(RESULT_KEY.format(job_id=job_id))
    document = None if raw is None else json.loads(raw)
    return document if document is not None and document["status"] in ("SUCCESS", "FAILURE") else None


def read_result(r: redis.Redis, job_id: str) -> dict[str, Any]:
    """Poll until the result is there (a producer may also SUBSCRIBE to the key's channel)."""
    return wait_until(lambda: finished_result(r, job_id), timeout=60, what=f"the result of {job_id}")


def test_plain_redis_producer_enqueues_and_reads_results(
    start_worker, redis_server: RedisServer, queue_name: str, image_dir: Path
):
    start_worker()
    r = redis.Redis.from_url(redis_server.url)
    good = {
        "job_id": "wire-ok-1",
        "image": str(image_dir / "cat.jpg"),
        "labels": ["cat", "dog", "car"],
        "metadata": {"correlation_id": "upload-77"},
        "submitted_at": time.time(),
    }
    missing = {"job_id": "wire-missing-1", "image": str(image_dir / "nope.jpg"), "labels": ["cat"]}
    invalid = {"job_id": "wire-bad-1", "image": str(image_dir / "cat.jpg"), "labels": "cat"}
    for job in (good, missing, invalid):
        assert r.lpush(queue_name, task_message(job, queue=queue_name)) >= 1

    document = read_result(r, "wire-ok-1")
    assert document["status"] == "SUCCESS" and document["task_id"] == "wire-ok-1"
    result = document["result"]
    assert result["status"] == "ok" and result["job_id"] == "wire-ok-1"
    assert sorted(score["label"] for score in result["scores"]) == ["car", "cat", "dog"]
    assert result["top_label"] == result["scores"][0]["label"]
    assert result["metadata"] == {"correlation_id": "upload-77"}
    assert result["timings_ms"]["queue_wait"] >= 0

    failed = read_result(r, "wire-missing-1")["result"]
    assert failed["status"] == "error" and failed["error"]["code"] == "fetch_not_found"
    rejected = read_result(r, "wire-bad-1")["result"]
    assert rejected["status"] == "error" and rejected["error"]["code"] == "invalid_request"
    assert "labels" in rejected["error"]["message"]
    assert r.llen(queue_name) == 0


def test_the_documented_message_the_client_writes_is_what_celery_writes(
    redis_server: RedisServer, queue_name: str
):
    with Client(settings=QueueSettings(redis_url=redis_server.url, queue=queue_name)) as client:
        job = client.submit("/img/cat.jpg", ["cat", "dog"], job_id="client-written-1")
        assert job.request is not None
        sent = job.request.model_dump(mode="json", exclude_none=True)
        client.celery.send_task(TASK_NAME, args=[sent], task_id=sent["job_id"], queue=queue_name)
    r = redis.Redis.from_url(redis_server.url)
    celery_raw, client_raw = r.lrange(queue_name, 0, -1)  # LPUSH: the newest first
    r.delete(queue_name)
    written, documented = json.loads(celery_raw), json.loads(client_raw)
    expected = json.loads(task_message(sent, queue=queue_name))
    assert documented["properties"].pop("delivery_tag") != expected["properties"].pop("delivery_tag")
    assert documented == expected, "the client pushes the documented message (a fresh delivery tag)"
    documented = json.loads(client_raw)

    assert json.loads(base64.b64decode(written["body"])) == json.loads(base64.b64decode(documented["body"]))
    assert documented.keys() == written.keys()
    for key in ("content-encoding", "content-type"):
        assert documented[key] == written[key]
    for name, value in documented["headers"].items():
        assert written["headers"][name] == value, name
    assert documented["properties"].keys() <= written["properties"].keys()
    for name in ("correlation_id", "delivery_mode", "delivery_info", "priority", "body_encoding"):
        assert written["properties"][name] == documented["properties"][name], name
