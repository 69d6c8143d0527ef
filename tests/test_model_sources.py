"""Model sources through the production loading path: local directory, s3:// prefix, unavailable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.loading import ModelUnavailable, download_s3_prefix, load_clip


def test_s3_prefix_is_downloaded_once_and_served(
    start_worker, client, s3_server, tiny_clip, image_dir, tmp_path
):
    s3 = s3_server.client()
    s3.create_bucket(Bucket="models")
    for path in tiny_clip.iterdir():
        s3.upload_file(str(path), "models", f"clip/tiny/{path.name}")
    cache = tmp_path / "model-cache"
    start_worker(model="s3://models/clip/tiny", model_cache_dir=cache, env=s3_server.env)
    result = client.submit(str(image_dir / "cat.jpg"), ["cat", "dog"]).result(timeout=60)
    assert result.status == "ok"
    assert result.model.id == "s3://models/clip/tiny"
    downloaded = cache / "models" / "clip" / "tiny"
    assert {p.name for p in tiny_clip.iterdir()} <= {p.name for p in downloaded.iterdir()}
    assert (downloaded / ".cliptag-complete").exists()


def test_a_model_at_a_bucket_root_loads_and_a_key_with_dots_is_refused(
    s3_server, tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    s3 = s3_server.client()
    s3.create_bucket(Bucket="root-model")
    for path in tiny_clip.iterdir():
        s3.upload_file(str(path), "root-model", path.name)
    cache = tmp_path / "cache"
    downloaded = download_s3_prefix("s3://root-model", cache_dir=cache, endpoint_url=s3_server.endpoint_url)
    assert {p.name for p in tiny_clip.iterdir()} <= {p.name for p in downloaded.iterdir()}
    assert load_clip(str(downloaded), device="cpu").model.config.vision_config.image_size == 64

    s3.create_bucket(Bucket="hostile")
    s3.put_object(Bucket="hostile", Key="clip/../../../escaped.txt", Body=b"x")
    with pytest.raises(ModelUnavailable, match="leads out of its directory"):
        download_s3_prefix("s3://hostile/clip", cache_dir=cache, endpoint_url=s3_server.endpoint_url)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_a_processor_without_a_fixed_input_size_is_refused(tiny_clip: Path, tmp_path: Path):
    """Images of different shapes could not share a batch: every job of it would fail."""
    checkpoint = tmp_path / "no-crop"
    shutil.copytree(tiny_clip, checkpoint)
    config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({**config, "do_center_crop": False}))
    with pytest.raises(ModelUnavailable, match="neither center-crops nor resizes to a fixed"):
        load_clip(str(checkpoint), device="cpu")


def test_input_size_comes_from_the_checkpoint(tiny_clip: Path):
    loaded = load_clip(str(tiny_clip), device="cpu")
    assert loaded.processor.crop_size.height == loaded.model.config.vision_config.image_size == 64


def test_unavailable_model_stops_worker_with_one_clear_line(redis_server, tmp_path):
    env = {
        "CLIPTAG_REDIS_URL": redis_server.url,
        "CLIPTAG_MODEL": "openai/clip-vit-base-patch32",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
        "CLIPTAG_DEVICE": "cpu",
    }
    finished = subprocess.run(
        [sys.executable, "-m", "producer.cli", "worker"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode != 0
    lines = [line for line in finished.stderr.splitlines() if line.startswith("cliptag worker:")]
    assert len(lines) == 1
    assert "openai/clip-vit-base-patch32" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]
    assert "Fix:" in lines[0]


def test_missing_local_directory_is_named():
    with pytest.raises(ModelUnavailable, match="/no/such/model"):
        load_clip("/no/such/model", device="cpu")
