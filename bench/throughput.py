"""Throughput of cliptag, measured side by side in one run (see docs/benchmarks.md).

Parts (``--parts``, comma-separated; default all):

* ``tower``     the image tower alone on ready tensors at the worker's batch size;
* ``decode``    JPEG decode + preprocess alone on ``--threads`` threads, no model: the
                ceiling of ``inprocess`` from the CPU side (what binds it on a GPU);
* ``inprocess`` decode + preprocess + forward + scoring in one process, no queue
                (JPEG draft decode on a thread pool, labels encoded once);
* ``naive``     per image: reference preprocessing, a batch-1 forward of both towers,
                the labels re-encoded every time;
* ``e2e``       N single-image jobs through the producer client, a real Redis and a real
                ``cliptag worker`` subprocess, first submit to last result;
* ``overhead``  the same with the tiny test model (inference nearly free) against a bare
                Celery no-op task on the same Redis, in jobs/s; bulk against single jobs;
                three rounds in turn (``--overhead-rounds``), medians reported;
* ``latency``   p50/p95 of one job at a time on an idle worker.

The full-size parts (``tower`` to ``e2e``) run in turn for ``--rounds`` rounds (default 3)
and their medians are reported, so that the ratios compare figures taken minutes, not a
whole run, apart; each ratio's per-round values are printed beside it.

The model is a full-size ViT-B/32 (the default ``CLIPConfig``) with random weights, saved to
``--workdir`` and loaded through the production path: it costs what the real one costs.

``tower``, ``decode``, ``inprocess`` and ``naive`` import only torch, transformers, pillow, numpy and
cliptag's engine modules, so they run on a bare GPU host with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.decode import decode_image
from worker.engine import ClipEngine
from worker.loading import LoadedModel, load_clip
from worker.preprocess import ImageTransform, make_transform
from worker.random_clip import build_full_size_clip, build_tiny_clip

SAMPLES = Path(__file__).resolve().parent.parent / "worker" / "samples"
SIZES = ((640, 480), (1920, 1080))
LABEL_SETS = (
    ("cat", "dog", "car", "cup", "rocket"),
    ("person", "a photo", "the dog", "cup", "cat"),
    ("rocket", "car", "dog", "person", "cup"),
)
IDLE_GAPS_S = (0.2, 0.35, 0.5)
"""The pauses before idle-latency measurements, in turn, worker and in process alike: varied,
so that no delay of the worker's idle polling can hide behind one phase (one gap of 0.2 s,
the length of one blocking wait, hid waits of up to 0.3 s on the webhook queue)."""
OVERHEAD_SIZE = (128, 96)
"""Overhead runs use thumbnails, so neither decode nor inference hides the framework's cost."""
ALL_PARTS = ("tower", "decode", "inprocess", "naive", "e2e", "overhead", "latency")
QUEUE_PARTS = frozenset({"e2e", "overhead", "latency"})
JOBS_PER_SECOND = frozenset({"5 tiny model e2e", "5 bare Celery no-op"})


def prompts(labels: Sequence[str]) -> list[str]:
    return [f"a photo of a {label}." for label in labels]


def idle_pause(number: int) -> None:
    """The pause before idle-latency measurement ``number`` (see :data:`IDLE_GAPS_S`)."""
    time.sleep(IDLE_GAPS_S[number % len(IDLE_GAPS_S)])


def make_images(directory: Path, count: int, sizes: Sequence[tuple[int, int]] = SIZES) -> list[Path]:
    """``count`` JPEGs of the sample photos scaled to ``sizes`` in turn (default 640×480, 1920×1080)."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = sorted(SAMPLES.glob("*.jpg"))
    paths = []
    for index in range(count):
        size = sizes[index % len(sizes)]
        path = directory / f"img-{index:05d}-{size[0]}x{size[1]}.jpg"
        if not path.exists():
            Image.open(sources[index % len(sources)]).convert("RGB").resize(size).save(path, quality=90)
        paths.append(path)
    return paths


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.perf_counter()
    finished: list[float] = []
    yield lambda: finished[0] - started
    finished.append(time.perf_counter())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_tower(engine: ClipEngine, *, batch: int, batches: int) -> float:
    """Images/s of the image tower alone on ready, normalized tensors."""
    height = width = engine.model.config.vision_config.image_size
    pixels = np.random.default_rng(0).standard_normal((batch, 3, height, width)).astype(np.float32)
    engine.image_embeddings(pixels)
    sync(engine.device)
    with timed() as elapsed:
        for _ in range(batches):
            engine.image_embeddings(pixels)
        sync(engine.device)
    return batch * batches / elapsed()


def preparer(transform: ImageTransform) -> Callable[[bytes], np.ndarray]:
    """JPEG bytes to the model's input, as the worker's fast path does it."""

    def prepare(data: bytes) -> np.ndarray:
        return transform(decode_image(data, max_pixels=10**9, draft_size=transform.draft_size))

    return prepare


def bench_decode(transform: ImageTransform, files: Sequence[Path], *, threads: int) -> float:
    """Images/s of decode + preprocess alone on ``threads`` threads: the most in-process
    batched can reach from JPEG bytes however fast the model is (what bounds it on a GPU)."""
    encoded = [path.read_bytes() for path in files]
    with ThreadPoolExecutor(threads) as pool, timed() as elapsed:
        for _ in pool.map(preparer(transform), encoded):
            pass
    return len(files) / elapsed()


def bench_inprocess(
    engine: ClipEngine, transform: ImageTransform, files: Sequence[Path], *, batch: int, threads: int
) -> float:
    """Images/s from JPEG bytes to per-image label scores, decode overlapped with the model."""
    from worker.similarity import label_scores

    encoded = [path.read_bytes() for path in files]
    label_rows = [engine.text_embeddings(prompts(labels)).numpy() for labels in LABEL_SETS]
    prepare = preparer(transform)

    with ThreadPoolExecutor(threads) as pool, timed() as elapsed:
        pending = [pool.submit(prepare, data) for data in encoded]
        for start in range(0, len(pending), batch):
            pixels = np.stack([future.result() for future in pending[start : start + batch]])
            embeddings = engine.image_embeddings(pixels).numpy()
            for offset, embedding in enumerate(embeddings):
                rows = label_rows[(start + offset) % len(label_rows)]
                label_scores(embedding, rows, engine.logit_scale, mode="softmax").argmax()
    return len(files) / elapsed()


def bench_naive(checkpoint: str, files: Sequence[Path], *, device: torch.device, dtype: torch.dtype) -> float:
    """Images/s of the textbook loop: one image, both towers, labels re-encoded each time."""
    model = CLIPModel.from_pretrained(checkpoint, dtype=dtype).eval().to(device)
    processor = CLIPImageProcessorPil.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.inference_mode(), timed() as elapsed:
        for index, path in enumerate(files):
            pixels = processor(images=[Image.open(path)], return_tensors="pt")["pixel_values"]
            tokens = tokenizer(
                prompts(LABEL_SETS[index % len(LABEL_SETS)]), padding=True, return_tensors="pt"
            )
            output = model(pixel_values=pixels.to(device, dtype), **tokens.to(device))
            output.logits_per_image.softmax(dim=-1).argmax().item()
    return len(files) / elapsed()


def idle_forward_ms(engine: ClipEngine, transform: ImageTransform, path: Path, *, repeats: int = 6) -> float:
    """Median ms of fetch + decode + preprocess + a batch-1 forward, in process, each run
    after the same pauses as the latency part's jobs (an idle CPU runs the first
    forward after a pause about 20 ms slower than one right after another)."""
    times = []
    for number in range(repeats):
        idle_pause(number)
        with timed() as elapsed:
            data = path.read_bytes()
            pixels = transform(decode_image(data, max_pixels=10**9, draft_size=transform.draft_size))
            engine.image_embeddings(pixels[None])
        times.append(elapsed() * 1000)
    return statistics.median(times)


class QueueBench:
    """The parts that need Redis and worker subprocesses (imports Celery lazily)."""

    def __init__(self, workdir: Path, *, batch: int) -> None:
        from worker.processes import RedisServer

        self.workdir = workdir
        self.batch = batch
        self.redis = RedisServer(data_dir=Path(tempfile.mkdtemp(prefix="redis-", dir=workdir))).start()

    def close(self) -> None:
        self.redis.close()

    @contextmanager
    def worker(self, model: str, queue: str, images: Path) -> Iterator[None]:
        from worker.processes import WorkerProcess

        env = {
            "CLIPTAG_REDIS_URL": self.redis.url,
            "CLIPTAG_MODEL": model,
            "CLIPTAG_QUEUE": queue,
            "CLIPTAG_LOCAL_ROOTS": str(images),
            "CLIPTAG_MAX_BATCH": str(self.batch),
            "CLIPTAG_DEVICE": "cpu",
        }
        with WorkerProcess(env, log_path=self.workdir / f"worker-{queue}.log"):
            yield

    def client(self, queue: str):
        from producer.client import Client

        return Client(self.redis.url, queue=queue)

    def jobs_per_second(self, model: str, queue: str, files: Sequence[Path]) -> float:
        """Single-image jobs/s, from the first submit to the last result."""
        with self.worker(model, queue, files[0].parent), self.client(queue) as client:
            with timed() as elapsed:
                jobs = [client.submit(str(p), list(LABEL_SETS[i % 3])) for i, p in enumerate(files)]
                for job in jobs:
                    job.result(timeout=600)
            return len(files) / elapsed()

    def bulk_images_per_second(self, model: str, queue: str, files: Sequence[Path], *, bulk: int) -> float:
        with self.worker(model, queue, files[0].parent), self.client(queue) as client:
            with timed() as elapsed:
                jobs = list(client.submit_many([str(p) for p in files], list(LABEL_SETS[0]), bulk_size=bulk))
                for job in jobs:
                    job.result(timeout=600)
            return len(files) / elapsed()

    def noop_per_second(self, queue: str, count: int) -> float:
        """A bare Celery task on the same Redis, pool and concurrency: the framework's ceiling."""
        from worker.processes import WorkerProcess

        env = {"CLIPTAG_REDIS_URL": self.redis.url, "CLIPTAG_QUEUE": queue, "PYTHONPATH": str(Path.cwd())}
        command = (
            "-m",
            "celery",
            "-A",
            "bench.noop_app",
            "worker",
            "--pool=threads",
            f"--concurrency={2 * self.batch}",
            f"--queues={queue}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        )
        with (
            WorkerProcess(env, log_path=self.workdir / "noop.log", command=command),
            self.client(queue) as client,
        ):
            with timed() as elapsed:
                results = [
                    client.celery.send_task("bench.noop", args=[{"job_id": f"n{i}"}], queue=queue)
                    for i in range(count)
                ]
                for result in results:
                    result.get(timeout=600)
            return count / elapsed()

    def latencies_ms(self, model: str, queue: str, path: Path, *, count: int) -> list[float]:
        """One job at a time on an idle worker, submit to result."""
        with self.worker(model, queue, path.parent), self.client(queue) as client:
            client.submit(str(path), list(LABEL_SETS[0])).result(timeout=600)
            latencies = []
            for number in range(count):
                idle_pause(number)
                with timed() as elapsed:
                    client.submit(str(path), list(LABEL_SETS[0])).result(timeout=600)
                latencies.append(elapsed() * 1000)
            return latencies


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default=",".join(ALL_PARTS), help="comma-separated parts to run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", default="", help="float32, float16 or bfloat16 (default: fp16 on CUDA)")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--images", type=int, default=128, help="images for inprocess and e2e (default 128)")
    parser.add_argument("--naive-images", type=int, default=32, help="images for the naive loop (default 32)")
    parser.add_argument("--tower-batches", type=int, default=4, help="timed batches for tower (default 4)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the full-size parts, run in turn; medians are reported (default 3)",
    )
    parser.add_argument(
        "--overhead-jobs", type=int, default=600, help="jobs for the overhead part (default 600)"
    )
    parser.add_argument("--bulk-size", type=int, default=100, help="images per bulk job (default 100)")
    parser.add_argument(
        "--overhead-rounds",
        type=int,
        default=3,
        help="rounds of the overhead part, run in turn; medians are reported (default 3)",
    )
    parser.add_argument("--latency-jobs", type=int, default=15, help="jobs for the latency part (default 15)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 2, help="decode threads (default: cores)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(__file__).parent / ".cache", help="models, images"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - set(ALL_PARTS)
    if unknown:
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))} (known: {', '.join(ALL_PARTS)})")
    args.workdir.mkdir(parents=True, exist_ok=True)
    full = args.workdir / "vit-b-32-random"
    if not (full / "config.json").exists():
        build_full_size_clip(full)
    files = make_images(args.workdir / "images", args.images)
    figures: dict[str, float] = {}
    loaded: LoadedModel = load_clip(str(full), device=args.device, dtype=args.dtype)
    engine = ClipEngine(loaded)
    transform = make_transform(loaded.processor, exact=False)
    dtype_name = str(loaded.dtype).removeprefix("torch.")
    print(
        f"# cliptag throughput — {loaded.device} {dtype_name}, batch {args.batch}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU threads",
        flush=True,
    )

    def report(name: str, value: float, unit: str = "img/s") -> None:
        figures[name] = value
        print(f"{name:<34} {value:10.2f} {unit}", flush=True)

    queue_bench = QueueBench(args.workdir, batch=args.batch) if parts & QUEUE_PARTS else None
    try:
        measures = full_size_measures(
            args,
            parts,
            checkpoint=full,
            loaded=loaded,
            engine=engine,
            transform=transform,
            files=files,
            queue_bench=queue_bench,
        )
        per_round = rates_of_rounds("full-size", args.rounds, measures)
        for name, values in per_round.items():
            report(name, statistics.median(values))
        if queue_bench is not None and "overhead" in parts:
            tiny = args.workdir / "tiny-clip"
            if not (tiny / "config.json").exists():
                build_tiny_clip(tiny)
            small = make_images(args.workdir / "small", args.overhead_jobs, sizes=[OVERHEAD_SIZE])
            overhead = rates_of_rounds(
                "overhead",
                args.overhead_rounds,
                {
                    "5 tiny model e2e": lambda: queue_bench.jobs_per_second(str(tiny), "tiny", small),
                    "5 bare Celery no-op": lambda: queue_bench.noop_per_second("noop", args.overhead_jobs),
                    "5 tiny bulk jobs": lambda: queue_bench.bulk_images_per_second(
                        str(tiny), "bulk", small, bulk=args.bulk_size
                    ),
                },
            )
            overhead["5 tiny single jobs"] = overhead["5 tiny model e2e"]  # one image per job
            per_round |= overhead
            for name, values in overhead.items():
                report(name, statistics.median(values), "jobs/s" if name in JOBS_PER_SECOND else "img/s")
        if queue_bench is not None and "latency" in parts:
            latencies = queue_bench.latencies_ms(str(full), "latency", files[0], count=args.latency_jobs)
            report("6 idle latency p50", percentile(latencies, 0.5), "ms")
            report("6 idle latency p95", percentile(latencies, 0.95), "ms")
            report("6 in-process batch-1 path", idle_forward_ms(engine, transform, files[0]), "ms")
    finally:
        if queue_bench is not None:
            queue_bench.close()
    print_ratios(figures, per_round)


def full_size_measures(
    args: argparse.Namespace,
    parts: set[str],
    *,
    checkpoint: Path,
    loaded: LoadedModel,
    engine: ClipEngine,
    transform: ImageTransform,
    files: Sequence[Path],
    queue_bench: QueueBench | None,
) -> dict[str, Callable[[], float]]:
    """Parts 1–4 of ``parts``, by the name they are reported under, each measuring once."""
    measures: dict[str, Callable[[], float]] = {}
    if "tower" in parts:
        measures["1 tower ceiling"] = lambda: bench_tower(
            engine, batch=args.batch, batches=args.tower_batches
        )
    if "decode" in parts:
        measures["1 decode + preprocess"] = lambda: bench_decode(transform, files, threads=args.threads)
    if "inprocess" in parts:
        measures["2 in-process batched"] = lambda: bench_inprocess(
            engine, transform, files, batch=args.batch, threads=args.threads
        )
    if "naive" in parts:
        measures["3 naive per-image"] = lambda: bench_naive(
            str(checkpoint), files[: args.naive_images], device=loaded.device, dtype=loaded.dtype
        )
    if "e2e" in parts and queue_bench is not None:
        measures["4 end to end (worker)"] = lambda: queue_bench.jobs_per_second(str(checkpoint), "e2e", files)
    return measures


def rates_of_rounds(
    label: str, rounds: int, measures: dict[str, Callable[[], float]]
) -> dict[str, list[float]]:
    """Every measure in turn, ``rounds`` times (the host drifts); each round's figures are
    printed, and each measure's figures returned in round order."""
    rates: dict[str, list[float]] = {name: [] for name in measures}
    for number in range(1, rounds + 1):
        for name, measure in measures.items():
            rates[name].append(measure())
        if rounds > 1 and measures:
            figures_of_round = ", ".join(f"{name} {values[-1]:.2f}" for name, values in rates.items())
            print(f"  {label} round {number}: {figures_of_round}", flush=True)
    return rates


def print_ratios(figures: dict[str, float], per_round: dict[str, list[float]]) -> None:
    """The issue's ratios of the medians in ``figures``; where both sides ran in several
    rounds, also each round's ratio (figures taken minutes, not a whole run, apart)."""
    ratios = (
        ("e2e / in-process", "4 end to end (worker)", "2 in-process batched", 0.90),
        ("e2e / naive", "4 end to end (worker)", "3 naive per-image", 2.0),
        ("in-process / tower", "2 in-process batched", "1 tower ceiling", None),
        ("in-process / decode", "2 in-process batched", "1 decode + preprocess", None),
        ("tiny e2e / Celery no-op", "5 tiny model e2e", "5 bare Celery no-op", 0.6),
        ("bulk / single (tiny)", "5 tiny bulk jobs", "5 tiny single jobs", 5.0),
        ("idle p50 - batch-1 path (ms)", "6 idle latency p50", "6 in-process batch-1 path", None),
    )
    print("# ratios", flush=True)
    for name, top, bottom, target in ratios:
        if top in figures and bottom in figures:
            value = (
                figures[top] - figures[bottom] if name.endswith("(ms)") else figures[top] / figures[bottom]
            )
            goal = "" if target is None else f"  (target ≥ {target})"
            rounds = zip(per_round.get(top, []), per_round.get(bottom, []), strict=False)
            paired = [f"{a / b:.2f}" for a, b in rounds]
            within = f"  per round: {', '.join(paired)}" if len(paired) > 1 else ""
            print(f"{name:<34} {value:10.2f}{goal}{within}", flush=True)


if __name__ == "__main__":
    main()
