"""Shared fixtures: a tiny CLIP checkpoint, private redis-servers and real worker processes.

Nothing here fakes a part: every test that says "worker" talks to a ``cliptag worker``
subprocess through its own ``redis-server``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from producer.client import Client
from producer.config import QueueSettings
from tests.servers import HttpServer, MotoS3Server
from worker.processes import RedisServer, WorkerProcess
from worker.random_clip import build_tiny_clip

SAMPLES = Path(__file__).resolve().parent.parent / "worker" / "samples"
_queue_numbers = itertools.count()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP with tiny towers and a tiny tokenizer, saved with save_pretrained."""
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session; tests isolate themselves by queue name."""
    with RedisServer(data_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def queue_name(request: pytest.FixtureRequest) -> str:
    """A queue of this test's own, so tests sharing a redis-server never see each other's jobs."""
    return f"t{next(_queue_numbers)}-{request.node.name[:40]}"


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A directory of test images (the bundled samples plus sizes of our own), a local root."""
    directory = tmp_path / "images"
    directory.mkdir()
    for sample in SAMPLES.glob("*.jpg"):
        (directory / sample.name).write_bytes(sample.read_bytes())
    Image.new("RGB", (37, 91), (200, 30, 30)).save(directory / "red-tall.png")
    Image.new("RGB", (640, 480), (20, 160, 40)).save(directory / "green-wide.jpg")
    return directory


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(
    tiny_clip: Path, redis_server: RedisServer, queue_name: str, image_dir: Path, tmp_path: Path
) -> Iterator[WorkerFactory]:
    """Start ``cliptag worker`` subprocesses on this test's queue; all are stopped afterwards.

    Keyword arguments become ``CLIPTAG_*`` variables (``max_batch=4`` → ``CLIPTAG_MAX_BATCH=4``);
    ``env`` holds other variables verbatim (``s3_server.env``, say); ``args`` are extra
    ``cliptag worker`` arguments.
    """
    started: list[WorkerProcess] = []

    def start(
        *,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
        **settings: object,
    ) -> WorkerProcess:
        variables = {
            "CLIPTAG_REDIS_URL": redis_server.url,
            "CLIPTAG_MODEL": str(tiny_clip),
            "CLIPTAG_QUEUE": queue_name,
            "CLIPTAG_LOCAL_ROOTS": str(image_dir),
            "CLIPTAG_DEVICE": "cpu",
            "CLIPTAG_MAX_BATCH": "8",
            "CLIPTAG_EXACT_PREPROCESS": "1",
        }
        variables.update({f"CLIPTAG_{key.upper()}": str(value) for key, value in settings.items()})
        variables.update(env or {})
        log_path = tmp_path / f"worker-{len(started)}.log"
        process = WorkerProcess(variables, log_path=log_path, args=args)
        started.append(process)
        return process.start() if wait else process

    yield start
    for process in started:
        if process.process is not None:
            process.stop(timeout=10)


@pytest.fixture
def client(redis_server: RedisServer, queue_name: str) -> Iterator[Client]:
    with Client(settings=QueueSettings(redis_url=redis_server.url, queue=queue_name)) as producer:
        yield producer


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    """moto's S3 API over real HTTP, shared by the session; tests use buckets of their own."""
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    """A real HTTP server on 127.0.0.1 whose ``routes`` each test sets."""
    with HttpServer() as server:
        yield server
