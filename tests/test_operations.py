"""Operating cliptag: metrics, `cliptag status`, `cliptag health`, deadlines, `--gpus`, the supervisor.

Everything runs against real ``cliptag worker`` processes, a real redis-server, and the
metrics endpoint over HTTP; only the supervisor's GPU arithmetic is checked in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.client import Client
from producer.config import QueueSettings
from producer.errors import ErrorCode, JobFailed
from producer.readiness import Heartbeat
from tests.test_backfill import run_cli
from tests.waiting import wait_until
from worker.metrics import RateWindow
from worker.processes import RedisServer, WorkerProcess, free_port
from worker.supervisor import Supervisor, child_specs, cuda_device_count, parse_gpus

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of the worker's ``/metrics``, by name and sorted labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def heartbeats(directory: Path) -> dict[str, Heartbeat]:
    return {
        beat.node: beat
        for beat in (Heartbeat.model_validate_json(p.read_bytes()) for p in directory.glob("*.json"))
    }


def log_events(worker: WorkerProcess, event: str) -> list[dict]:
    lines = [json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def health(directory: Path) -> subprocess.CompletedProcess:
    return run_cli("health", redis_url="", queue="", env={"CLIPTAG_HEALTH_DIR": str(directory)})


def test_metrics_status_health_and_deadlines_from_one_worker(
    start_worker, client: Client, image_dir: Path, tmp_path: Path, redis_server: RedisServer, queue_name: str
):
    health_dir, port = tmp_path / "health", free_port()
    assert health(health_dir).returncode == 1, "no worker yet: not ready"
    # Jobs that waited in the queue past their deadline are answered `expired`, not computed.
    expires_at = time.time() + 0.2
    expired = client.submit(str(image_dir / "cat.jpg"), ["cat", "dog"], expires_at=expires_at)
    timely = client.submit(str(image_dir / "cat.jpg"), ["cat", "dog"], expires_at=time.time() + 3600)
    wait_until(lambda: time.time() > expires_at, timeout=60, what="the deadline passes")
    worker = start_worker(
        metrics_port=port, health_dir=health_dir, health_interval=0.5, max_batch=4, max_wait_ms=300
    )
    with pytest.raises(JobFailed) as failed:
        expired.result(timeout=60)
    assert failed.value.code is ErrorCode.EXPIRED
    assert timely.result(timeout=60).status == "ok"

    jobs = [
        client.submit(str(image_dir / name), ["cat", "dog", "car"], metadata={"correlation_id": f"corr-{i}"})
        for i, name in enumerate(["cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg"])
    ]
    missing = client.submit(str(image_dir / "missing.jpg"), ["cat"])
    bulk = client.submit_job(
        {"images": [str(image_dir / "cat.jpg"), str(image_dir / "nope.jpg")], "labels": ["x"]}
    )
    all_missing = client.submit_job(
        {"images": [str(image_dir / "gone-1.jpg"), str(image_dir / "gone-2.jpg")], "labels": ["x"]}
    )
    results = [job.result(timeout=60) for job in jobs]
    with pytest.raises(JobFailed) as not_found:
        missing.result(timeout=60)
    assert all_missing.result(timeout=60, raise_on_error=False).status == "error"
    bulk_result = bulk.result(timeout=60)
    assert bulk_result.status == "ok" and bulk_result.items[1].error is not None
    bulk_code = bulk_result.items[1].error.code.value

    metrics = scrape(port)
    assert metrics[("cliptag_jobs_done_total", (("kind", "tag"),))] == 6  # 4 + timely + bulk
    assert metrics[("cliptag_jobs_failed_total", (("code", "expired"),))] == 1
    assert metrics[("cliptag_jobs_failed_total", (("code", not_found.value.code.value),))] == 2
    assert bulk_code == not_found.value.code.value
    assert metrics[("cliptag_images_failed_total", (("code", bulk_code),))] == 3, "all-failed bulk jobs too"
    assert metrics[("cliptag_batch_size_count", ())] >= 1
    assert metrics[("cliptag_batch_size_sum", ())] == metrics[("cliptag_images_total", ())] >= 6
    assert (
        metrics[("cliptag_batch_size_bucket", (("le", "+Inf"),))] == metrics[("cliptag_batch_size_count", ())]
    )
    assert metrics[("cliptag_inference_seconds_count", ())] == metrics[("cliptag_batch_size_count", ())]
    for stage in ("queue_wait", "fetch", "preprocess", "total"):
        assert metrics[("cliptag_stage_seconds_count", (("stage", stage),))] >= 6, stage
    assert metrics[("cliptag_model_load_seconds", ())] > 0
    assert metrics[("cliptag_images_per_second", ())] > 0
    assert metrics[("cliptag_label_cache_hits_total", ())] > 0  # the same prompts, job after job
    assert metrics[("cliptag_label_cache_misses_total", ())] > 0
    assert metrics[("cliptag_broker_up", ())] == 1
    assert metrics[("cliptag_queue_depth", (("queue", queue_name),))] == 0
    assert metrics[("cliptag_dead_letters", ())] >= 0

    # One log line per job carries its id, batch id, timings and the correlation id of its metadata.
    done = {line["job_id"]: line for line in log_events(worker, "job_done")}
    for i, (job, result) in enumerate(zip(jobs, results, strict=True)):
        line = done[job.id]
        assert line["correlation_id"] == f"corr-{i}"
        assert line["batch_id"] == result.batch_id
        assert line["timings_ms"]["inference"] == result.timings_ms["inference"]
    assert "correlation_id" not in done[missing.id]
    assert {line["batch_id"] for line in log_events(worker, "batch")} >= {r.batch_id for r in results}

    # `cliptag status` sees the queue, the live worker, its recent throughput and the dead letters.
    status = run_cli("status", "--json", redis_url=redis_server.url, queue=queue_name)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["queues"][queue_name] == 0
    (node, info), *others = report["workers"].items()
    assert not others
    assert info["ready"] is True and info["device"] == "cpu" and queue_name in info["queues"]
    assert info["jobs_recent"] >= 1 and info["batches"] >= 1
    assert report["throughput"]["jobs"] == info["jobs_recent"]
    assert report["throughput"]["images_per_second"] > 0
    assert isinstance(report["dead_letters"], int)
    table = run_cli("status", redis_url=redis_server.url, queue=queue_name)
    assert table.returncode == 0 and node in table.stdout and "dead letters:" in table.stdout

    # `cliptag health`: ready while it runs; a stopped worker removes its heartbeat.
    ready = health(health_dir)
    assert ready.returncode == 0, ready.stdout
    assert ready.stdout.strip() == f"{node}: ready"
    assert worker.stop() == 0
    gone = health(health_dir)
    assert gone.returncode == 1 and "no worker heartbeat" in gone.stdout


def test_health_fails_when_the_broker_goes_away_and_when_the_worker_dies(start_worker, tmp_path: Path):
    health_dir = tmp_path / "health"
    with RedisServer() as private:
        worker = start_worker(redis_url=private.url, health_dir=health_dir, health_interval=0.3)
        assert health(health_dir).returncode == 0
        private.stop()
        wait_until(lambda: health(health_dir).returncode == 1, timeout=60, what="health sees the broker gone")
        assert "broker unreachable" in health(health_dir).stdout
    worker.kill()
    wait_until(
        lambda: "no heartbeat for" in health(health_dir).stdout, timeout=60, what="the heartbeat goes stale"
    )
    assert health(health_dir).returncode == 1


def test_status_fails_with_one_line_when_the_broker_is_down():
    done = run_cli("status", redis_url=f"redis://127.0.0.1:{free_port()}/0", queue="q")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "does not answer" in done.stderr


@pytest.mark.skipif(cuda_device_count() > 0, reason="this host has CUDA")
def test_gpus_without_cuda_fails_with_one_clear_line():
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "worker", "--gpus", "0,1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--gpus 0,1 needs CUDA GPUs" in lines[0] and "--device cpu" in lines[0]


def test_gpu_children_are_pinned_with_distinct_names_and_ports():
    assert parse_gpus("all", available=4) == [0, 1, 2, 3]
    assert parse_gpus("0, 3,1", available=4) == [0, 3, 1]
    for spec, message in [("0,0", "listed twice"), ("4", "does not exist"), ("a", "not a GPU index")]:
        with pytest.raises(Exception, match=message):
            parse_gpus(spec, available=4)
    specs = child_specs(gpus=[0, 3], processes=1, worker_args=["-Q", "cliptag-bulk"], metrics_port=9100)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "3"]
    assert [s.env["CLIPTAG_METRICS_PORT"] for s in specs] == ["9100", "9101"]
    assert all(s.env["CLIPTAG_DEVICE"] == "cuda" for s in specs)
    assert [s.argv[-4:] for s in specs] == [
        ["--hostname", "gpu0@%h", "-Q", "cliptag-bulk"],
        ["--hostname", "gpu3@%h", "-Q", "cliptag-bulk"],
    ]
    supervisor = Supervisor(specs, backoff_base_s=1.0, backoff_cap_s=10.0)
    assert [supervisor.backoff(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_supervisor_restarts_a_killed_child_and_stops_all_on_sigterm(
    start_worker, client: Client, image_dir: Path, tmp_path: Path, redis_server: RedisServer, queue_name: str
):
    """The same supervision as ``--gpus``, over CPU children; they consume two queues (``-Q``)."""
    health_dir, port, bulk_queue = tmp_path / "health", free_port(), f"{queue_name}-bulk"
    supervisor = start_worker(
        args=("--device", "cpu", "--processes", "2", "-Q", f"{queue_name},{bulk_queue}"),
        health_dir=health_dir,
        health_interval=0.3,
        metrics_port=port,
    )
    wait_until(lambda: len(heartbeats(health_dir)) == 2, timeout=60, what="both children report ready")
    beats = heartbeats(health_dir)
    assert sorted(node.split("@")[0] for node in beats) == ["cpu0", "cpu1"]
    assert {("cliptag_broker_up", ()) in scrape(p) for p in (port, port + 1)} == {True}

    victim = next(beat for node, beat in beats.items() if node.startswith("cpu0@"))
    os.kill(victim.pid, signal.SIGKILL)

    def restarted() -> bool:
        beat = heartbeats(health_dir).get(victim.node)
        return beat is not None and beat.pid != victim.pid and beat.problem() is None

    wait_until(restarted, timeout=120, what="the supervisor restarts the killed child")
    exits = [line for line in log_events(supervisor, "child_exited") if line["child"] == "cpu0"]
    assert exits and exits[0]["returncode"] == -signal.SIGKILL and exits[0]["restart_in_s"] == 1.0
    assert client.submit(str(image_dir / "cat.jpg"), ["cat", "dog"]).result(timeout=60).status == "ok"
    with Client(settings=QueueSettings(redis_url=redis_server.url, queue=bulk_queue)) as backfill:
        bulk = backfill.submit_job({"images": [str(image_dir / "cat.jpg")], "labels": ["cat", "dog"]})
        assert bulk.result(timeout=60).items[0].status == "ok"

    children = [beat.pid for beat in heartbeats(health_dir).values()]
    assert supervisor.stop(timeout=60) == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list(health_dir.glob("*.json")), "children stopped warm and removed their heartbeats"
    assert log_events(supervisor, "supervisor_stopped")


def test_rate_window_counts_only_recent_events():
    now = [100.0]
    window = RateWindow(window_s=60.0, clock=lambda: now[0])
    now[0] = 130.0
    window.add(30)
    assert window.per_second() == 1.0  # 30 events over the 30 s it has existed
    now[0] = 160.0
    window.add(12)
    assert window.count() == 42 and window.per_second() == 42 / 60
    now[0] = 195.0
    assert window.count() == 12  # the first 30 are older than 60 s
