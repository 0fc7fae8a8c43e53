# syntax=docker/dockerfile:1
# The reranking service image: no torch, non-root, CPU by default.
#
#   docker build -t dnr-rerank .                                  # CPU (onnxruntime)
#   docker build --build-arg RUNTIME=gpu -t dnr-rerank:gpu .      # CUDA 13 + cuDNN 9 (onnxruntime-gpu)
#   docker build --target baked -t dnr-rerank:baked .             # also copies ./models into /models
#   docker build --target model --build-arg MODEL_VERSION=V -t dnr-rerank-model:V .   # models/V alone, no service
#
# Without the baked target, mount a model folder read-only at /models (deploy/docker-compose.yml does), or copy one
# in from a model image before the service starts (deploy/k8s/deployment.yaml's init container does).
ARG RUNTIME=cpu
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# onnxruntime-gpu 1.31.1 from PyPI is built for CUDA 13: its CUDA provider links libcublas.so.13 and
# libcudart.so.13 (readelf), and it ran on an H200 with CUDA 13.0 and cuDNN 9 (reports/gpu.md). On a CUDA 12
# image the provider fails to load and the service runs on CPU. Needs an NVIDIA driver >= 580.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# One model version and a shell to copy it with: Kubernetes' init container copies /models/V into the pod's model
# volume, so a new version rolls out by changing this image's tag, with no service image rebuilt.
FROM busybox:1.37.0 AS model
ARG MODEL_VERSION
COPY --chown=10001:10001 models/${MODEL_VERSION}/ /models/${MODEL_VERSION}/
USER 10001

FROM ${PYTHON_IMAGE} AS cpu-base
ENV VENV=/opt/venv
RUN python -m venv "$VENV"

FROM ${CUDA_IMAGE} AS gpu-base
# cuda, not auto: the GPU's worker default (half the cores, at most 8) applies, and a missing GPU is logged.
ENV VENV=/opt/venv \
    RERANK_PROVIDERS=cuda
# Ubuntu 24.04's python3 is 3.12; only the interpreter and venv are needed.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VENV"

FROM ${RUNTIME}-base AS runtime
ARG RUNTIME
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RERANK_HOST=0.0.0.0 \
    RERANK_PORT=8000 \
    RERANK_MODEL_DIR=/models
WORKDIR /app
# Only the service package: the image never carries training/ or torch.
COPY pyproject.toml README.md pylock.toml ./
COPY service ./service
# deploy/install.sh: CPU (Python 3.11) exactly the wheels in pylock.toml, each checked against its sha256,
# then the project without dependencies; GPU (Python 3.12) the lock's versions as constraints and
# onnxruntime-gpu at the lock's onnxruntime version. `make image-check` replays it in a fresh virtualenv.
COPY deploy/install.sh ./
RUN sh install.sh "$RUNTIME" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rerank \
    && mkdir -p /models
USER 10001
EXPOSE 8000
# Ready = model validated and warmed up; a plain urllib call keeps curl out of the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
# SIGTERM (docker stop, Kubernetes) drains: in-flight requests finish, the batcher empties, Redis closes.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]

FROM runtime AS baked
COPY --chown=10001:10001 models/ /models/
