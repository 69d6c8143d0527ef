"""Every kind of bad input, end to end through one real worker: each job gets its error code,
good jobs submitted alongside still succeed, and the worker stays up and answering.

The guard is on: the test HTTP server is reached by the allowlisted name ``localhost``,
and the guard is tested with ``127.0.0.1`` (the same server, by address).
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from producer.client import Client
from producer.config import QueueSettings
from producer.contract import TASK_NAME, JobResult
from producer.dlq import DeadLetterStore
from tests.images import (
    HTML_PAGE,
    animated_gif,
    encode,
    exif_rotated_jpeg,
    halves,
    png_bomb,
    sixteen_bit_png,
)
from tests.servers import HttpServer, MotoS3Server, Reply, Request
from worker.processes import RedisServer, WorkerProcess

SAMPLES = Path(__file__).resolve().parent.parent / "worker" / "samples"
CAT = (SAMPLES / "cat.jpg").read_bytes()
CAP = 1_048_576
LABELS = ["cat", "dog", "car"]
RED, BLUE = (255, 0, 0), (0, 0, 255)
SQUARE = halves(64, 64, RED, BLUE)


def chunked(body: bytes, size: int = 65_536) -> bytes:
    """``body`` in HTTP/1.1 chunked framing (the test server writes it as is)."""
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


@pytest.fixture(scope="module")
def server() -> Iterator[HttpServer]:
    with HttpServer() as http:
        yield http


def url(server: HttpServer, path: str) -> str:
    """``path`` on the test server by its allowlisted name."""
    return server.url(path).replace("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's only local root, with a symlink out of it and a FIFO in it."""
    base = tmp_path_factory.mktemp("hostile")
    directory = base / "root"
    directory.mkdir()
    (directory / "cat.jpg").write_bytes(CAT)
    (base / "outside.jpg").write_bytes(CAT)
    (directory / "escape.jpg").symlink_to(base / "outside.jpg")
    os.mkfifo(directory / "fifo")
    return directory


@pytest.fixture(scope="module")
def bucket(s3_server: MotoS3Server) -> str:
    name = f"hostile-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="cat.jpg", Body=CAT)
    return name


@pytest.fixture(scope="module")
def queue() -> str:
    return f"hostile-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def worker(
    tiny_clip: Path,
    redis_server: RedisServer,
    s3_server: MotoS3Server,
    root: Path,
    queue: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """One worker for the whole module: guard on, 1 MiB cap, 1 s read timeout, 2 retries."""
    env = {
        "CLIPTAG_REDIS_URL": redis_server.url,
        "CLIPTAG_MODEL": str(tiny_clip),
        "CLIPTAG_QUEUE": queue,
        "CLIPTAG_DEVICE": "cpu",
        "CLIPTAG_LOCAL_ROOTS": str(root),
        "CLIPTAG_ALLOWED_HOSTS": "localhost",
        "CLIPTAG_MAX_IMAGE_BYTES": str(CAP),
        "CLIPTAG_FETCH_READ_TIMEOUT": "1",
        "CLIPTAG_MAX_RETRIES": "2",
        "CLIPTAG_MAX_BATCH": "8",
        "CLIPTAG_MAX_WAIT_MS": "200",
        **s3_server.env,
    }
    log_path = tmp_path_factory.mktemp("hostile-worker") / "worker.log"
    with WorkerProcess(env, log_path=log_path) as process:
        yield process


@pytest.fixture(scope="module")
def client(redis_server: RedisServer, queue: str) -> Iterator[Client]:
    with Client(settings=QueueSettings(redis_url=redis_server.url, queue=queue)) as producer:
        yield producer


_ids = itertools.count()


def send_raw(client: Client, document: dict[str, Any]) -> str:
    """Enqueue ``document`` as is, the way a producer in another language might: unvalidated."""
    job_id = f"hostile-{uuid.uuid4().hex[:8]}-{next(_ids)}"
    client.celery.send_task(TASK_NAME, args=[document], task_id=job_id, queue=client.settings.queue)
    return job_id


def outcome(result: JobResult) -> str:
    """``ok``, or the error code."""
    return "ok" if result.status == "ok" else str(result.error.code)  # type: ignore[union-attr]


def test_each_bad_input_gets_its_code_while_good_jobs_alongside_succeed(worker, client, server, root, bucket):
    server.routes.update(
        {
            "/cat.jpg": Reply(200, CAT, {"Content-Type": "image/jpeg"}),
            "/slow.jpg": Reply(200, CAT, delay=3.0),
            "/to-private": Reply(302, headers={"Location": f"http://127.0.0.1:{server.port}/cat.jpg"}),
            "/to-metadata": Reply(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}),
            "/huge.jpg": Reply(200, b"\xff" * (CAP + 1)),
            "/liar.jpg": Reply(
                200, chunked(b"\xff" * (CAP * 3)), {"Content-Length": "500", "Transfer-Encoding": "chunked"}
            ),
            "/page.jpg": Reply(200, HTML_PAGE, {"Content-Type": "image/jpeg"}),
            "/truncated.jpg": Reply(200, CAT[: len(CAT) // 2], {"Content-Type": "image/jpeg"}),
            "/bomb.png": Reply(200, png_bomb(8192, 8192), {"Content-Type": "image/png"}),
            "/one.gif": Reply(200, encode(Image.new("RGB", (1, 1), RED), "GIF")),
            "/animated.gif": Reply(200, animated_gif([RED, BLUE, RED])),
            "/cmyk.jpg": Reply(200, encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")),
            "/sixteen.png": Reply(200, sixteen_bit_png(40_000)),
            "/exif.jpg": Reply(200, exif_rotated_jpeg(SQUARE)),
        }
    )
    inline = "data:image/png;base64," + base64.b64encode(encode(SQUARE, "PNG")).decode()
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "404": ({"image": url(server, "/missing.jpg")}, "fetch_not_found"),
        "slow server": ({"image": url(server, "/slow.jpg")}, "fetch_timeout"),
        "redirect to 127.0.0.1": ({"image": url(server, "/to-private")}, "forbidden_host"),
        "redirect to metadata": ({"image": url(server, "/to-metadata")}, "forbidden_host"),
        "127.0.0.1, guard on": ({"image": server.url("/cat.jpg")}, "forbidden_host"),
        "body over the cap": ({"image": url(server, "/huge.jpg")}, "too_large"),
        "lying Content-Length": ({"image": url(server, "/liar.jpg")}, "too_large"),
        "HTML as image/jpeg": ({"image": url(server, "/page.jpg")}, "not_an_image"),
        "truncated JPEG": ({"image": url(server, "/truncated.jpg")}, "decode_failed"),
        "PNG bomb": ({"image": url(server, "/bomb.png")}, "too_many_pixels"),
        "1×1 GIF": ({"image": url(server, "/one.gif")}, "ok"),
        "animated GIF": ({"image": url(server, "/animated.gif")}, "ok"),
        "CMYK JPEG": ({"image": url(server, "/cmyk.jpg")}, "ok"),
        "16-bit PNG": ({"image": url(server, "/sixteen.png")}, "ok"),
        "EXIF-rotated JPEG": ({"image": url(server, "/exif.jpg")}, "ok"),
        "inline PNG": ({"image": inline}, "ok"),
        "path traversal": ({"image": f"{root}/../outside.jpg"}, "forbidden_path"),
        "symlink escape": ({"image": f"{root}/escape.jpg"}, "forbidden_path"),
        "FIFO": ({"image": f"{root}/fifo"}, "forbidden_path"),
        "file:// outside": ({"image": "file:///etc/passwd"}, "forbidden_path"),
        "missing S3 key": ({"image": f"s3://{bucket}/nope.jpg"}, "fetch_not_found"),
        "missing S3 bucket": ({"image": f"s3://{bucket}-gone/cat.jpg"}, "fetch_not_found"),
        "S3 object": ({"image": f"s3://{bucket}/cat.jpg"}, "ok"),
        "ftp://": ({"image": "ftp://example.com/cat.jpg"}, "unsupported_scheme"),
        "empty labels": ({"image": f"{root}/cat.jpg", "labels": []}, "invalid_request"),
        "10 001 labels": (
            {"image": f"{root}/cat.jpg", "labels": [f"l{i}" for i in range(10_001)]},
            "invalid_request",
        ),
        "10 000-char label": ({"image": f"{root}/cat.jpg", "labels": ["x" * 10_000]}, "invalid_request"),
        "labels of wrong type": ({"image": f"{root}/cat.jpg", "labels": "cat,dog"}, "invalid_request"),
        "duplicate labels": ({"image": f"{root}/cat.jpg", "labels": ["cat", "cat"]}, "invalid_request"),
        "unknown field": ({"image": f"{root}/cat.jpg", "colour": "red"}, "invalid_request"),
    }
    sent: dict[str, str] = {}
    good: list[str] = []
    for name, (document, _) in cases.items():
        sent[name] = send_raw(client, {"labels": LABELS, **document})
        good.append(send_raw(client, {"image": url(server, "/cat.jpg"), "labels": LABELS}))
        good.append(send_raw(client, {"image": f"{root}/cat.jpg", "labels": LABELS}))

    got = {
        name: outcome(client.job(job_id).result(timeout=120, raise_on_error=False))
        for name, job_id in sent.items()
    }
    assert got == {name: expected for name, (_, expected) in cases.items()}
    good_results = [client.job(job_id).result(timeout=120) for job_id in good]
    assert all(result.top_label in LABELS for result in good_results)
    assert max(result.batch_size for result in good_results) > 1, (
        "good jobs should have shared forward passes"
    )
    assert worker.alive()


def test_error_messages_name_the_value_but_leak_no_secret(worker, client, server, root):
    secret_url = url(server, "/missing.jpg").replace("://", "://admin:hunter2@") + "?X-Amz-Signature=s3cr3t"
    failed = client.job(send_raw(client, {"image": secret_url, "labels": LABELS})).result(
        timeout=60, raise_on_error=False
    )
    assert failed.error.code == "fetch_not_found"
    assert "/missing.jpg" in failed.error.message
    assert "hunter2" not in failed.error.message and "s3cr3t" not in failed.error.message
    escaped = client.job(send_raw(client, {"image": f"{root}/escape.jpg", "labels": LABELS})).result(
        timeout=60, raise_on_error=False
    )
    assert "escape.jpg" in escaped.error.message
    assert "outside.jpg" not in escaped.error.message


def test_transient_500_is_retried_until_it_succeeds(worker, client, server):
    calls = itertools.count()

    def fails_first(_: Request) -> Reply:
        return Reply(500, b"busy") if next(calls) == 0 else Reply(200, CAT)

    server.routes["/flaky.jpg"] = fails_first
    result = client.job(send_raw(client, {"image": url(server, "/flaky.jpg"), "labels": LABELS})).result(
        timeout=120
    )
    assert result.status == "ok"
    assert result.attempts == 2
    assert [r.path for r in server.requests].count("/flaky.jpg") == 2


def test_bulk_job_keeps_its_good_images_when_others_fail(worker, client, server, root):
    images = [f"{root}/cat.jpg", url(server, "/missing.jpg"), f"{root}/../outside.jpg", f"{root}/cat.jpg"]
    result = client.job(send_raw(client, {"images": images, "labels": LABELS})).result(timeout=120)
    assert result.status == "ok"
    assert [outcome(item) for item in result.items] == ["ok", "fetch_not_found", "forbidden_path", "ok"]  # type: ignore[union-attr]


def embedding(client: Client, image: str) -> list[float]:
    result = client.job(send_raw(client, {"kind": "embed", "image": image})).result(timeout=120)
    return result.embedding.to_list()  # type: ignore[union-attr]


def test_exif_orientation_and_sixteen_bit_samples_reach_the_model_correctly(worker, client, server):
    """The model sees the EXIF-rotated photo upright, and 16-bit gray as the same 8-bit gray."""
    rotated_jpeg = exif_rotated_jpeg(SQUARE)
    stored = Image.open(io.BytesIO(rotated_jpeg)).convert("RGB")  # its pixels, EXIF ignored
    server.routes.update(
        {
            "/exif.jpg": Reply(200, rotated_jpeg),
            "/upright.png": Reply(200, encode(stored.transpose(Image.Transpose.ROTATE_270), "PNG")),
            "/as-stored.png": Reply(200, encode(stored, "PNG")),
            "/sixteen.png": Reply(200, sixteen_bit_png(40_000)),
            "/eight.png": Reply(200, encode(Image.new("L", (16, 16), round(40_000 / 257)), "PNG")),
            "/clipped.png": Reply(200, encode(Image.new("L", (16, 16), 255), "PNG")),
        }
    )
    rotated = embedding(client, url(server, "/exif.jpg"))
    assert rotated == pytest.approx(embedding(client, url(server, "/upright.png")), abs=1e-5)
    assert rotated != pytest.approx(embedding(client, url(server, "/as-stored.png")), abs=1e-3)
    sixteen = embedding(client, url(server, "/sixteen.png"))
    assert sixteen == pytest.approx(embedding(client, url(server, "/eight.png")), abs=1e-5)
    assert sixteen != pytest.approx(embedding(client, url(server, "/clipped.png")), abs=1e-3)


# --- messages that are no valid job at all ------------------------------------------------


def real_envelope(client: Client, broker: redis.Redis, queue: str) -> dict[str, Any]:
    """A message exactly as Celery writes it into Redis (sent to a queue nobody consumes)."""
    peek = f"{queue}-peek"
    client.celery.send_task(
        TASK_NAME, args=[{"image": "/x.jpg", "labels": LABELS}], task_id="peek", queue=peek
    )
    return json.loads(broker.rpop(peek))


def with_body(envelope: dict[str, Any], task_id: str | None, body: bytes, **headers: Any) -> str:
    """``envelope`` with another body, task id (``None``: no id) and header values."""
    copy = json.loads(json.dumps(envelope))
    copy["body"] = base64.b64encode(body).decode()
    copy["headers"].update(headers)
    copy["properties"]["delivery_tag"] = uuid.uuid4().hex
    if task_id is None:
        del copy["headers"]["id"], copy["headers"]["task"]
        copy["properties"].pop("correlation_id")
    else:
        copy["headers"]["id"] = copy["properties"]["correlation_id"] = task_id
    return json.dumps(copy)


def test_malformed_queue_messages_are_answered_or_dead_lettered(worker, client, redis_server, queue, root):
    broker = redis.Redis.from_url(redis_server.url)
    envelope = real_envelope(client, broker, queue)
    job = json.dumps([[{"image": f"{root}/cat.jpg", "labels": LABELS}], {}, {}]).encode()
    prefix = uuid.uuid4().hex[:8]
    answered = {
        f"{prefix}-body": (with_body(envelope, f"{prefix}-body", b"{not json"), "cannot be decoded"),
        f"{prefix}-shape": (with_body(envelope, f"{prefix}-shape", b'{"image": "x"}'), "not a JSON list"),
        f"{prefix}-args": (with_body(envelope, f"{prefix}-args", b"[[], {}, {}]"), "one positional argument"),
        f"{prefix}-task": (with_body(envelope, f"{prefix}-task", job, task="cliptag.nope"), "does not run"),
        f"{prefix}-eta": (with_body(envelope, f"{prefix}-eta", job, eta="tomorrow"), "ETA"),
        f"{prefix}-limit": (with_body(envelope, f"{prefix}-limit", job, timelimit="abc"), "invalid"),
        f"{prefix}-retries": (with_body(envelope, f"{prefix}-retries", job, retries="x"), "retries"),
        f"{prefix}-job": (with_body(envelope, f"{prefix}-job", b'[["not a job"], {}, {}]'), "JSON object"),
        f"{prefix}-envelope": (json.dumps({"headers": {"id": f"{prefix}-envelope"}}), "no kombu message"),
    }
    dead = {
        f"garbage {prefix}": f"garbage {prefix}",
        f"[1, 2, {json.dumps(prefix)}]": f"[1, 2, {json.dumps(prefix)}]",
        "no id": with_body(envelope, None, f"no id {prefix}".encode()),
    }
    for raw, _ in answered.values():
        broker.lpush(queue, raw)
    for raw in dead.values():
        broker.lpush(queue, raw)

    for task_id, (_, reason) in answered.items():
        result = client.job(task_id).result(timeout=60, raise_on_error=False)
        assert (result.error.code, result.error.retryable) == ("invalid_request", False), task_id
        assert reason in result.error.message, (task_id, result.error.message)
    assert client.submit(f"{root}/cat.jpg", LABELS).result(timeout=60).status == "ok"
    letters = [letter for letter in DeadLetterStore(broker).list() if prefix in str(letter.job)]
    assert sorted(str(letter.job) for letter in letters) == sorted(
        [f"garbage {prefix}", f"[1, 2, {json.dumps(prefix)}]", f"no id {prefix}"]
    )
    assert {letter.error.code for letter in letters} == {"invalid_request"}
    assert all(letter.job_id.startswith("raw-") for letter in letters)
    assert worker.alive()


def test_worker_is_still_alive_and_answering(worker, client, root):
    assert worker.alive()
    assert client.submit(f"{root}/cat.jpg", LABELS).result(timeout=60).top_label in LABELS
    assert "Unrecoverable error" not in worker.log_text()
