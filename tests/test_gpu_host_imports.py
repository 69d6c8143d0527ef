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

import runpy
import shutil
from pathlib import Path

# what bench/gpu.sh runs, on the CPU: the in-process parts, one small round
model_dir, workdir = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(model_dir, workdir / "vit-b-32-random")  # the benchmark's model, here tiny
sys.argv = [
    "bench/throughput.py", "--workdir", str(workdir), "--parts", "tower,decode,inprocess,naive",
    "--rounds", "1", "--images", "4", "--naive-images", "2", "--tower-batches", "1",
    "--batch", "2", "--threads", "2",
]
runpy.run_path("bench/throughput.py", run_name="__main__")

from worker.batcher import Batcher
from worker.engine import ClipEngine
from worker.loading import load_clip

def broken_report(stats):
    raise BrokenPipeError("a log sink went away")

engine = ClipEngine(load_clip(str(model_dir), device="cpu"))
size = engine.model.config.vision_config.image_size
batcher = Batcher(engine, max_batch=2, max_wait_ms=0, on_batch=broken_report).start()
pixels = __import__("numpy").zeros((3, size, size), dtype="float32")
assert batcher.submit(pixels, [("a cat.",)]).result(timeout=60).image_embedding is not None
batcher.stop()
print("ran without", ", ".join(sorted(HIDDEN)))
"""


def test_the_in_process_benchmark_runs_with_only_what_the_gpu_host_has(tiny_clip: Path, tmp_path: Path):
    script = f"HIDDEN = {set(NOT_ON_THE_GPU_HOST)!r}\n" + IN_PROCESS_RUN
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_clip), str(tmp_path / "bench")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ran without" in done.stdout
    assert "in-process batched" in done.stdout and "naive per-image" in done.stdout
    assert "batch_report_failed" in done.stderr, "the stand-in logger wrote the failure"
