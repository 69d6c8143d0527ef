"""``bench/gpu.sh`` runs on a bare CUDA host with only torch, transformers, pillow and numpy
(and their dependencies): the benchmark's in-process parts, and the engine modules they
drive, must work without cliptag's other dependencies. Here they run with those hidden."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_ON_THE_GPU_HOST = (
    "boto3",
    "botocore",
    "celery",
    "httpx",
    "kombu",
    "prometheus_client",
    "pydantic",
    "redis",
    "structlog",
    "typer",
)

IN_PROCESS_RUN = """
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())

from pathlib import Path
import bench.throughput as bench
from worker.batcher import Batcher
from worker.engine import ClipEngine
from worker.loading import load_clip
from worker.preprocess import make_transform

loaded = load_clip(sys.argv[1], device="cpu")
engine = ClipEngine(loaded)
transform = make_transform(loaded.processor, exact=False)
files = bench.make_images(Path(sys.argv[2]), 4)
assert bench.bench_decode(transform, files, threads=2) > 0
assert bench.bench_inprocess(engine, transform, files, batch=2, threads=2) > 0

def broken_report(stats):
    raise BrokenPipeError("a log sink went away")

batcher = Batcher(engine, max_batch=2, max_wait_ms=0, on_batch=broken_report).start()
pixels = bench.preparer(transform)(files[0].read_bytes())
assert batcher.submit(pixels, [("a cat.",)]).result(timeout=60).image_embedding is not None
batcher.stop()
print("ran without", ", ".join(sorted(HIDDEN)))
"""


def test_the_in_process_benchmark_runs_with_only_what_the_gpu_host_has(tiny_clip: Path, tmp_path: Path):
    script = f"HIDDEN = {set(NOT_ON_THE_GPU_HOST)!r}\n" + IN_PROCESS_RUN
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_clip), str(tmp_path / "images")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ran without" in done.stdout
    assert "batch_report_failed" in done.stderr, "the stand-in logger wrote the failure"
