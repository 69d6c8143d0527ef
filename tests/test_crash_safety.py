"""Crash safety with real processes and real signals: SIGKILL, SIGTERM, a Redis restart, poison jobs.

The crash tests use a short visibility timeout so that a dead worker's messages come
back within seconds; the production default is checked separately.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import redis

from producer.celery_conf import redis_transport_options
from producer.client import Client
from producer.config import QueueSettings
from producer.delivery import deliveries_key
from producer.errors import ErrorCode, JobFailed
from tests.servers import Reply
from tests.waiting import wait_until
from worker.processes import ProcessError, RedisServer

LABELS = ["cat", "dog", "cup", "rocket"]


def stored_results(broker: redis.Redis, job_ids: list[str]) -> dict[str, dict]:
    """The finished results among ``job_ids``, read straight from the backend's keys."""
    raw = broker.mget([f"celery-task-meta-{job_id}" for job_id in job_ids])
    metas = [json.loads(entry) for entry in raw if entry]
    return {meta["task_id"]: meta["result"] for meta in metas if meta["status"] == "SUCCESS"}


def held_messages(broker: redis.Redis, queue: str) -> list[str]:
    """Task ids of the messages of ``queue`` that are taken but not acknowledged (kombu's record)."""
    held = []
    for entry in broker.hvals("unacked"):
        payload, _exchange, routing_key = json.loads(entry)
        if routing_key == queue:
            held.append(payload["headers"]["id"])
    return held


def deliveries(broker: redis.Redis, job_id: str) -> int:
    """Deliveries of every attempt of the job (not the finishes recorded beside them)."""
    counts = broker.hgetall(deliveries_key(job_id))
    return sum(int(count) for field, count in counts.items() if not field.endswith(":finished"))


def log_events(worker, event: str) -> list[dict]:
    lines = (line for line in worker.log_text().splitlines() if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


def test_sigkill_mid_batch_then_new_worker_delivers_all_200_exactly_once(
    start_worker, client, image_dir: Path, queue_name: str
):
    first = start_worker(visibility_timeout=10)
    images = sorted(image_dir.iterdir())
    jobs = {
        client.submit(str(images[i % len(images)]), LABELS).id: str(images[i % len(images)])
        for i in range(200)
    }
    ids = list(jobs)
    broker = client.redis
    wait_until(
        lambda: len(stored_results(broker, ids)) >= 20 and held_messages(broker, queue_name),
        timeout=120,
        what="20 results and batches in flight",
        interval=0.02,
    )
    first.kill()
    done_before_kill = stored_results(broker, ids)
    in_flight = held_messages(broker, queue_name)
    assert len(done_before_kill) < 200 and in_flight

    second = start_worker(visibility_timeout=10)
    wait_until(lambda: len(stored_results(broker, ids)) == 200, timeout=180, what="all 200 results")
    results = {job_id: client.job(job_id).result(timeout=10) for job_id in ids}
    assert all(r.status == "ok" and r.job_id == i and r.image == jobs[i] for i, r in results.items())
    assert client.dead_letters.count(queue=queue_name) == 0
    assert held_messages(broker, queue_name) == [] and broker.llen(queue_name) == 0

    counts = {job_id: deliveries(broker, job_id) for job_id in ids}
    redelivered = {job_id for job_id, count in counts.items() if count > 1}
    assert all(1 <= count <= 2 for count in counts.values())
    assert redelivered <= set(in_flight), "only what the dead worker held came back"
    final = stored_results(broker, ids)
    for job_id, before in done_before_kill.items():
        assert final[job_id] == before, f"{job_id} was finished before the kill and must not run again"
    answered_from_backend = {e["job_id"] for e in log_events(second, "job_duplicate")}
    assert answered_from_backend <= set(in_flight), "finished but unacknowledged: answered, not rerun"


def test_sigterm_during_a_batch_publishes_its_results_before_exit(
    start_worker, client, image_dir: Path, queue_name: str
):
    worker = start_worker(max_batch=8, max_wait_ms=5000)
    jobs = [client.submit(str(image_dir / "cat.jpg"), LABELS) for _ in range(5)]
    broker = client.redis
    wait_until(
        lambda: len(held_messages(broker, queue_name)) == 5 and all(job.state() == "STARTED" for job in jobs),
        timeout=30,
        what="all five jobs taken and waiting for their batch",
        interval=0.02,
    )
    assert stored_results(broker, [job.id for job in jobs]) == {}, "the batch is still forming"
    worker.signal(signal.SIGTERM)
    assert worker.process.wait(60) == 0
    results = [job.result(timeout=1) for job in jobs]
    assert all(result.status == "ok" for result in results)
    assert len({result.batch_id for result in results}) == 1, "the batch in flight ran as one"
    log = worker.log_text()
    assert '"event": "batch"' in log[log.index("Warm shutdown") :], "the batch ran after SIGTERM"
    assert held_messages(broker, queue_name) == [] and broker.llen(queue_name) == 0, "all acknowledged"
    assert all(deliveries(broker, job.id) == 1 for job in jobs)


def test_redis_restart_with_persistence_worker_reconnects_and_every_job_finishes(
    start_worker, image_dir: Path, queue_name: str, tmp_path: Path
):
    data_dir = tmp_path / "redis-data"
    data_dir.mkdir()
    server = RedisServer(data_dir=data_dir, persistent=True).start()
    try:
        worker = start_worker(redis_url=server.url, visibility_timeout=5, max_wait_ms=100)
        settings = QueueSettings(redis_url=server.url, queue=queue_name)
        with Client(settings=settings) as client:
            ids = [client.submit(str(image_dir / "coffee.jpg"), LABELS).id for _ in range(80)]
            wait_until(
                lambda: len(stored_results(client.redis, ids)) >= 10,
                timeout=60,
                what="the first results",
                interval=0.02,
            )
        server.stop()
        time.sleep(1.0)
        server = RedisServer(data_dir=data_dir, persistent=True, port=server.port).start()
        with Client(settings=settings) as client:
            assert len(stored_results(client.redis, ids)) < 80, "the restart came while jobs were in flight"
            wait_until(
                lambda: len(stored_results(client.redis, ids)) == 80,
                timeout=120,
                what="every job after the restart",
            )
            assert all(client.job(job_id).result(timeout=10).status == "ok" for job_id in ids)
            assert client.dead_letters.count(queue=queue_name) == 0
        assert worker.alive(), "the same worker process reconnected on its own"
        assert "Connection to broker lost" in worker.log_text()
        worker.stop()
    finally:
        server.close()


def test_a_retry_sent_while_redis_restarts_is_not_lost(
    start_worker, http_server, image_dir: Path, queue_name: str, tmp_path: Path
):
    """A transient failure whose retry message meets a Redis restart: the send waits Redis out
    (Celery's default policy gave up after 0.6 s and then rejected the job's message: no
    result, no dead letter, no second run)."""
    data_dir = tmp_path / "redis-data"
    data_dir.mkdir()
    server = RedisServer(data_dir=data_dir, persistent=True).start()
    first_try = threading.Event()
    jpeg = (image_dir / "cat.jpg").read_bytes()

    def flaky(_request) -> Reply:
        if first_try.is_set():
            return Reply(200, jpeg, {"Content-Type": "image/jpeg"})
        first_try.set()
        return Reply(503, b"busy", delay=1.0)  # Redis is down by the time this answer is in

    http_server.routes["/cat.jpg"] = flaky
    try:
        start_worker(redis_url=server.url, allow_private_hosts=1, visibility_timeout=30)
        settings = QueueSettings(redis_url=server.url, queue=queue_name)
        with Client(settings=settings) as client:
            job_id = client.submit(http_server.url("/cat.jpg"), LABELS).id
        assert first_try.wait(60)
        server.stop()
        time.sleep(3.0)
        server = RedisServer(data_dir=data_dir, persistent=True, port=server.port).start()
        with Client(settings=settings) as client:
            result = client.job(job_id).result(timeout=120)
            assert result.status == "ok" and result.attempts == 2
            assert client.dead_letters.count(queue=queue_name) == 0
    finally:
        server.close()


def test_poison_job_is_dead_lettered_after_max_deliveries_and_the_others_finish(
    start_worker, client, image_dir: Path, queue_name: str
):
    images = sorted(image_dir.iterdir())
    poison_image = image_dir / "poison.jpg"
    shutil.copy(image_dir / "cat.jpg", poison_image)
    settings = {"visibility_timeout": 3, "max_deliveries": 2, "test_crash_on": str(poison_image)}
    poison = client.submit(str(poison_image), LABELS, job_id=f"poison-{queue_name}")
    others = [client.submit(str(path), LABELS) for path in images * 2]
    workers = []
    deadline = time.monotonic() + 240
    while client.dead_letters.get(poison.id) is None:
        assert time.monotonic() < deadline, "the poison job was never dead-lettered"
        if not workers or not workers[-1].alive():
            workers.append(start_worker(wait=False, **settings))
            with contextlib.suppress(ProcessError):  # it died on the poison job before "ready"
                workers[-1].start()
        time.sleep(0.2)

    crashed = [w for w in workers if not w.alive()]
    assert len(crashed) == 2, "one crash per allowed delivery, then no more: " + "\n".join(
        f"exit {w.process.returncode if w.process else None}: {w.log_tail(8)}" for w in crashed
    )
    assert all(w.process.returncode == 86 and log_events(w, "test_crash") for w in crashed)
    with pytest.raises(JobFailed) as failed:
        poison.result(timeout=30)
    assert failed.value.code is ErrorCode.POISON_MESSAGE and failed.value.result["attempts"] == 2
    letter = client.dead_letters.get(poison.id)
    assert letter.error.code is ErrorCode.POISON_MESSAGE and letter.attempts == 2
    assert letter.job["image"] == str(poison_image) and letter.queue == queue_name
    assert all(job.result(timeout=60).status == "ok" for job in others)
    assert [x.job_id for x in client.dead_letters.list(queue=queue_name)] == [poison.id]

    # The cause is fixed (a worker that does not crash on it): `dlq retry` runs it afresh.
    workers[-1].stop()
    start_worker(visibility_timeout=3, max_deliveries=2)
    client.requeue(letter)
    assert client.job(poison.id).result(timeout=60).status == "ok"
    assert deliveries(client.redis, poison.id) == 1, "the retry starts with fresh delivery counts"


def test_live_worker_keeps_its_messages_past_the_visibility_timeout_and_prefetches_little(
    start_worker, client, image_dir: Path, queue_name: str
):
    """Messages a live worker holds longer than the timeout are not redelivered; it holds few."""
    worker = start_worker(visibility_timeout=3, concurrency=2, max_batch=8, max_wait_ms=4500)
    ids = [client.submit(str(image_dir / "rocket.jpg"), LABELS).id for _ in range(4)]
    broker = client.redis
    most_held, saw_queued = 0, False
    while len(stored_results(broker, ids)) < len(ids):
        most_held = max(most_held, len(held_messages(broker, queue_name)))
        saw_queued = saw_queued or broker.llen(queue_name) > 0
        assert worker.alive()
        time.sleep(0.05)
    assert most_held == 2, "the prefetch is bounded by the job threads"
    assert saw_queued, "the rest waited in Redis, where another worker could take them"
    results = [client.job(job_id).result(timeout=5) for job_id in ids]
    assert all(r.status == "ok" and r.timings_ms["total"] > 3000 for r in results), "held past the timeout"
    assert all(deliveries(broker, job_id) == 1 for job_id in ids), "never delivered twice"
    assert log_events(worker, "job_duplicate") == []


def test_default_settings_recover_a_dead_workers_messages_within_two_minutes():
    options = redis_transport_options(QueueSettings().visibility_timeout)
    assert options["visibility_timeout"] + options["unacked_restore_interval"] <= 120
    assert options["unacked_restore_throttle"] == 1, "every sweep tick scans"
