"""The worker's result backend: Celery's documents in one round trip, a SUCCESS never overwritten."""

from __future__ import annotations

import uuid

import redis
from celery import Celery, states

from producer.celery_conf import make_celery
from producer.config import QueueSettings
from worker.processes import RedisServer
from worker.result_backend import RedisBackend, backend_for


def worker_app(url: str) -> Celery:
    app = make_celery(QueueSettings(redis_url=url), main="backend-test")
    app.conf.result_backend = backend_for(url)
    return app


def test_stored_states_read_back_through_the_stock_backend(redis_server: RedisServer):
    app = worker_app(redis_server.url)
    assert isinstance(app.backend, RedisBackend)
    stock = make_celery(QueueSettings(redis_url=redis_server.url)).backend
    task_id = uuid.uuid4().hex

    app.backend.store_result(task_id, {"pid": 1}, states.STARTED)
    assert stock.get_task_meta(task_id, cache=False)["status"] == states.STARTED

    app.backend.store_result(task_id, {"status": "ok"}, states.SUCCESS)
    meta = stock.get_task_meta(task_id, cache=False)
    assert (meta["status"], meta["result"], meta["task_id"]) == (states.SUCCESS, {"status": "ok"}, task_id)
    assert 0 < stock.client.ttl(stock.get_key_for_task(task_id)) <= app.backend.expires


def test_a_late_write_never_replaces_a_success(redis_server: RedisServer):
    app = worker_app(redis_server.url)
    task_id = uuid.uuid4().hex
    app.backend.store_result(task_id, {"status": "ok", "run": 1}, states.SUCCESS)

    app.backend.store_result(task_id, {"pid": 2}, states.STARTED)
    app.backend.store_result(task_id, {"status": "ok", "run": 2}, states.SUCCESS)

    meta = app.backend.get_task_meta(task_id, cache=False)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"status": "ok", "run": 1})


def test_waiters_are_told_through_pubsub(redis_server: RedisServer):
    app = worker_app(redis_server.url)
    task_id = uuid.uuid4().hex
    key = app.backend.get_key_for_task(task_id)
    subscriber = redis.Redis.from_url(redis_server.url).pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(key)
    subscriber.get_message(timeout=1)

    app.backend.store_result(task_id, {"status": "ok"}, states.SUCCESS)

    message = subscriber.get_message(timeout=5)
    assert message is not None, "the stored document is published on the task's key"
    assert app.backend.decode_result(message["data"])["result"] == {"status": "ok"}
    subscriber.close()


def test_other_backends_are_left_alone():
    assert backend_for("redis://h:1/0") == "worker.result_backend:RedisBackend+redis://h:1/0"
    assert backend_for("rediss://h:1/0").endswith("+rediss://h:1/0")
    assert backend_for("sentinel://h:26379") == "sentinel://h:26379"
