# syntax=docker/dockerfile:1
# cliptag worker on CPU (and the `cliptag` CLI for producers): float32, one worker process.
# Build from the repository root:  docker build -f docker/worker.cpu.Dockerfile -t cliptag-worker-cpu .
FROM python:3.11.13-slim-bookworm

# An index serving torch's CPU-only wheels keeps the image small; empty uses the default index.
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf \
    CLIPTAG_MODEL_CACHE_DIR=/models/cliptag \
    CLIPTAG_DEVICE=cpu \
    CLIPTAG_DTYPE=float32 \
    CLIPTAG_HEALTH_DIR=/tmp/cliptag-health

# torch is pinned; hadolint takes the optional --index-url value for an unpinned package.
# hadolint ignore=DL3013
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

WORKDIR /opt/cliptag
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install . \
    && cp -r worker/samples /opt/cliptag/samples \
    && useradd --create-home --uid 10001 cliptag \
    && mkdir -p /models \
    && chown cliptag /models

USER 10001
VOLUME ["/models"]
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["cliptag", "health"]
CMD ["cliptag", "worker"]
