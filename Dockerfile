# syntax=docker/dockerfile:1
# megatron-speed GPU image: CUDA 13.0, Python 3.12, torch 2.11.0, vLLM 0.25.1, megatron-core 0.16.1, the project.
#
# NOT BUILT HERE: the project's development machines have no Docker daemon, no GPU and no outside
# network, so this file is only linted (hadolint, tests/unit/test_dockerfile.py). The versions are the
# ones checked on the H100 host (ARCHITECTURE.md): torch 2.11.0+cu130 with vllm 0.25.1.
#
#   docker build -t megatron-speed:latest .
#   docker build --build-arg TE_VERSION=2.20.2 -t megatron-speed:te .   # with TransformerEngine
#
# Build arguments (pins; the torch/vLLM/megatron-core ones must match pyproject's `gpu` extra):
#   CUDA_IMAGE             CUDA 13.0 devel image (nvcc is needed to build TransformerEngine's extension)
#   TORCH_VERSION          2.11.0
#   TORCH_INDEX_URL        empty = PyPI's torch wheel; set it to PyTorch's cu130 wheel index to get the
#                          exact 2.11.0+cu130 build of the H100 host (vLLM 0.25.1 then installs beside it)
#   VLLM_VERSION           0.25.1 (requires exactly torch 2.11.0)
#   MEGATRON_CORE_VERSION  0.16.1
#   TE_VERSION             empty = no TransformerEngine (default). The code uses TE when it imports and
#                          megatron's local layers otherwise; no TE release has been verified against
#                          torch 2.11.0 here, so it is opt-in (2.20.2 is the newest on PyPI).
# NVIDIA apex is left out: it is not on PyPI (the PyPI package named "apex" is an unrelated web
# toolkit) and only builds from its source tree; nothing in megatron-speed requires it.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=
ARG VLLM_VERSION=0.25.1
ARG MEGATRON_CORE_VERSION=0.16.1
ARG TE_VERSION=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's python3 is 3.12. Distribution packages follow the base image's snapshot, so they
# are not pinned one by one (the base image tag is the pin).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git build-essential \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The heavy, rarely changing layer first, so that editing the project does not reinstall CUDA wheels.
# TransformerEngine builds against the installed torch, hence --no-build-isolation.
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" "vllm==${VLLM_VERSION}" \
        "megatron-core==${MEGATRON_CORE_VERSION}" \
    && if [ -n "${TE_VERSION}" ]; then \
        pip install --no-cache-dir --no-build-isolation "transformer-engine[pytorch]==${TE_VERSION}"; \
    fi

COPY pyproject.toml README.md /opt/megatron-speed/
COPY megatron_speed /opt/megatron-speed/megatron_speed
COPY tools /opt/megatron-speed/tools
COPY examples /opt/megatron-speed/examples
COPY launch.py /opt/megatron-speed/
# The tests travel with the image, with pytest (the `test` extra's pins, without its CPU-only linters and
# launcher runtime), so the GPU tests run in the image itself: cd /opt/megatron-speed && python -m pytest -m gpu
COPY tests /opt/megatron-speed/tests
# The job runs as an unprivileged user; the installed environment stays root-owned (read-only to it).
RUN pip install --no-cache-dir "/opt/megatron-speed[gpu]" pytest==9.2.0 hypothesis==6.170.17 \
    && groupadd --gid 10001 speed \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash speed
USER 10001:10001
WORKDIR /home/speed
CMD ["python", "/opt/megatron-speed/launch.py", "--list"]
