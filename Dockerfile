# syntax=docker/dockerfile:1
# Captioner's image: one image for every role (dashboard, workers, beat, Flower, migrations).
#
#   docker build --target app --build-arg FLAVOR=cpu  -t captioner .        # CPU only
#   docker build --target app --build-arg FLAVOR=cuda -t captioner-cuda .   # NVIDIA GPUs
#
# The CUDA flavour starts from NVIDIA's CUDA runtime image; PyTorch's wheels bring their own
# CUDA libraries, the host brings the driver (NVIDIA Container Toolkit). To use another wheel
# index for torch (a CPU-only build, a mirror), pass --build-arg PIP_EXTRA_INDEX_URL=...

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- base-cpu: Debian's slim Python ----------------------------------------------------------
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

# --- app: the project on the chosen base -------------------------------------------------------
FROM base-${FLAVOR} AS app
ARG PIP_EXTRA_INDEX_URL=""
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPTIONER_DATA_DIR=/var/lib/captioner \
    CAPTIONER_LOG_FORMAT=json
WORKDIR /app
# Dependencies first (cached while only the code changes).
COPY pyproject.toml README.md ./
RUN mkdir -p core_model captioner workers dashboard \
    && touch core_model/__init__.py captioner/__init__.py workers/__init__.py dashboard/__init__.py \
    && pip install . \
    && pip uninstall -y captioner
COPY core_model ./core_model
COPY captioner ./captioner
COPY workers ./workers
COPY dashboard ./dashboard
COPY migrations ./migrations
# Editable, so `captioner db upgrade` finds migrations/ beside the package. gunicorn serves the
# dashboard, flower watches Celery (pinned here until pyproject has a `deploy` extra).
RUN pip install --no-deps -e . && pip install gunicorn==27.0.1 flower==2.2.0
RUN useradd --system --uid 10001 --home /var/lib/captioner captioner \
    && mkdir -p /var/lib/captioner /models \
    && chown -R captioner /var/lib/captioner /models
USER captioner
EXPOSE 8000 5555 9100
ENTRYPOINT ["tini", "--"]
CMD ["captioner", "--help"]
