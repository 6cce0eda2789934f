# syntax=docker/dockerfile:1
# Captioner's two images, both from one wheel built once:
#
#   dashboard  the web side: dashboard (gunicorn), migrations, beat, Flower, `captioner user`.
#              The project's dependencies without the model stack (no torch): it never imports it.
#   worker     caption and training workers: every dependency, torch included, CPU or CUDA.
#
#   docker build --target dashboard -t captioner .
#   docker build --target worker --build-arg FLAVOR=cpu  -t captioner-worker .       # CPU only
#   docker build --target worker --build-arg FLAVOR=cuda -t captioner-worker-cuda .  # NVIDIA GPUs
#
# The CUDA flavour starts from NVIDIA's CUDA runtime image; PyTorch's wheels bring their own
# CUDA libraries, the host brings the driver (NVIDIA Container Toolkit). To use another wheel
# index for torch (a CPU-only build, a mirror), pass --build-arg PIP_EXTRA_INDEX_URL=...

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- requirements: the two pinned lists, from pyproject.toml alone ------------------------------
# Only pyproject.toml is copied, so the dependency layers below stay cached while code changes.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
# What only the workers import (core_model's model stack); the dashboard image leaves it out.
# tests/test_compose.py runs the dashboard's commands with these packages unimportable.
ARG MODEL_PACKAGES="torch torchvision timm safetensors tokenizers pycocoevalcap"
RUN python - <<'EOF'
import os
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
model = set(os.environ["MODEL_PACKAGES"].split())


def name(requirement):
    return re.split(r"[\s\[=<>!~;]", requirement, maxsplit=1)[0].lower()


web = [r for r in project["dependencies"] if name(r) not in model] + extras["deploy"]
worker = project["dependencies"] + extras["hub"]
for filename, requirements in (("web.txt", web), ("worker.txt", worker)):
    with open(filename, "w") as f:
        f.write("\n".join(requirements) + "\n")
EOF

# --- wheel: the project, built once for both images --------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY core_model ./core_model
COPY captioner ./captioner
COPY workers ./workers
COPY dashboard ./dashboard
COPY migrations ./migrations
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# --- base-cpu: Debian's slim Python ------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV CAPTIONER_DEVICE=cpu

# --- base-cuda: NVIDIA's CUDA runtime with the distribution's Python --------------------------
FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CAPTIONER_DEVICE=auto

# --- dashboard: the web side, without torch ---------------------------------------------------
FROM base-cpu AS dashboard
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPTIONER_DATA_DIR=/var/lib/captioner \
    CAPTIONER_LOG_FORMAT=json
COPY --from=requirements /src/web.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
# The wheel without its dependencies: the list above is all of them but the model stack.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/captioner-*.whl
RUN useradd --system --uid 10001 --home /var/lib/captioner captioner \
    && mkdir -p /var/lib/captioner /models \
    && chown -R captioner /var/lib/captioner /models
USER captioner
EXPOSE 8000 5555
ENTRYPOINT ["tini", "--"]
CMD ["captioner", "--help"]

# --- worker: every dependency, torch included, on the chosen base ------------------------------
FROM base-${FLAVOR} AS worker
ARG PIP_EXTRA_INDEX_URL=""
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPTIONER_DATA_DIR=/var/lib/captioner \
    CAPTIONER_LOG_FORMAT=json
COPY --from=requirements /src/worker.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/captioner-*.whl
RUN useradd --system --uid 10001 --home /var/lib/captioner captioner \
    && mkdir -p /var/lib/captioner /models \
    && chown -R captioner /var/lib/captioner /models
USER captioner
EXPOSE 9100
ENTRYPOINT ["tini", "--"]
CMD ["captioner", "--help"]
