"""``cliptag demo``: the whole flow on one machine, starting only what is missing."""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

import redis
from rich.console import Console

from producer.cli import print_results, wait_for
from producer.client import Client
from worker.config import DEFAULT_MODEL
from worker.loading import ModelUnavailable, load_clip, locate_checkpoint
from worker.processes import RedisServer, WorkerProcess
from worker.random_clip import build_full_size_clip

SAMPLES = Path(__file__).parent / "samples"
DEMO_LABELS = ["cat", "dog", "cup of coffee", "astronaut", "rocket launch", "city street"]
console = Console(stderr=True)


def redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def demo_model(model: str, workdir: Path) -> str:
    """``model`` if it loads here; otherwise a random-weight ViT-B/32, said out loud."""
    try:
        load_clip(model, device="cpu")
        return model
    except ModelUnavailable as exc:
        _, tried = locate_checkpoint(model, cache_dir=workdir, s3_endpoint_url=None)
        console.print(f"[yellow]{exc}")
        console.print(
            f"[yellow]The demo goes on with a ViT-B/32 of RANDOM weights (tried {tried}): the flow is "
            "real, the scores are meaningless. Set CLIPTAG_MODEL to a real checkpoint for real tags."
        )
        return str(build_full_size_clip(workdir / "random-vit-b-32"))


def run_demo(*, redis_url: str | None = None, model: str | None = None) -> None:
    """Tag the bundled photos end to end and print the results; stop what was started."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cliptag-demo-")))
        url = redis_url or os.environ.get("CLIPTAG_REDIS_URL", "redis://127.0.0.1:6379/0")
        if not redis_reachable(url):
            console.print(f"No Redis at {url}: starting a private redis-server.")
            url = stack.enter_context(RedisServer(data_dir=workdir)).url
        queue = f"cliptag-demo-{os.getpid()}"
        checkpoint = demo_model(model or DEFAULT_MODEL, workdir)
        env = {
            "CLIPTAG_REDIS_URL": url,
            "CLIPTAG_MODEL": checkpoint,
            "CLIPTAG_QUEUE": queue,
            "CLIPTAG_LOCAL_ROOTS": str(SAMPLES),
            "CLIPTAG_MAX_BATCH": "8",
        }
        console.print(f"Starting a worker on queue {queue} with model {checkpoint} …")
        stack.enter_context(WorkerProcess(env, log_path=workdir / "worker.log"))
        images = sorted(str(path) for path in SAMPLES.glob("*.jpg"))
        with Client(url, queue=queue) as client:
            jobs = list(client.submit_many(images, DEMO_LABELS))
            console.print(f"Submitted {len(jobs)} images with labels {', '.join(DEMO_LABELS)}.")
            print_results(wait_for(jobs, timeout=300), as_json=False)
