# syntax=docker/dockerfile:1
# cliptag workers on NVIDIA GPUs: one supervised worker process per GPU (--gpus all), fp16.
# Build from the repository root:  docker build -f docker/worker.gpu.Dockerfile -t cliptag-worker-gpu .
# Run with the NVIDIA container toolkit:  docker run --gpus all -e CLIPTAG_REDIS_URL=… cliptag-worker-gpu
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/hf \
    CLIPTAG_MODEL_CACHE_DIR=/models/cliptag \
    CLIPTAG_DTYPE=float16 \
    CLIPTAG_METRICS_PORT=9100 \
    CLIPTAG_HEALTH_DIR=/tmp/cliptag-health

# Ubuntu 24.04's own Python 3.12; versions float with the (pinned) base image's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch's Linux wheels carry their own CUDA libraries; the base image brings the runtime set-up.
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /opt/cliptag
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install . \
    && useradd --create-home --uid 10001 cliptag \
    && mkdir -p /models \
    && chown cliptag /models

USER 10001
VOLUME ["/models"]
# One metrics port per GPU: 9100 for the first, 9101 for the second, …
EXPOSE 9100-9107
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["cliptag", "health"]
CMD ["cliptag", "worker", "--gpus", "all"]
