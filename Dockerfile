# syntax=docker/dockerfile:1
#
# One image for every meshserve component: `meshserve gateway`, `meshserve
# worker`, `meshserve registry`, and the tools (`meshserve demo-models`, ...).
# Models are never baked in: mount a model repository at /models.
#
#   docker build -t meshserve:cpu .                          # python:3.11-slim base
#   docker build -t meshserve:cuda --build-arg DEVICE=cuda . # + CUDA and cuDNN from pip
#
#   docker run --rm -v $PWD/models:/models:ro meshserve:cpu \
#       meshserve worker --model-repository /models --registry consul://consul:8500 --port 8001

ARG DEVICE=cpu

FROM python:3.11-slim-bookworm AS base-cpu

# onnxruntime-gpu's CUDA provider needs the CUDA and cuDNN user-space libraries of
# the CUDA major version it was built for (1.31: CUDA 13). A CUDA base image fixes
# that version apart from the one pip resolves; the `cuda` extra installs the
# matching libraries as pip packages instead, and the worker loads them at start.
# The host's NVIDIA container toolkit mounts the driver.
FROM python:3.11-slim-bookworm AS base-cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM base-${DEVICE} AS build
ARG DEVICE
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/meshserve
WORKDIR /src
COPY pyproject.toml README.md ./
# The dependencies first, in a layer of their own, from pyproject.toml alone
# (the packages as empty stubs): a code change then reinstalls meshserve only,
# not ~0.5 GB (CPU) or ~3 GB (CUDA) of dependencies.
# pyproject picks onnxruntime-gpu on Linux x86_64; the CPU image swaps it for
# the much smaller CPU build of the same release (same `onnxruntime` module).
RUN if [ "$DEVICE" = "cuda" ]; then extras="[cuda]"; else extras=""; fi \
    && packages="protos worker registry loadbalancer gateway meshserve" \
    && for p in $packages; do mkdir "$p" && touch "$p/__init__.py"; done \
    && /opt/meshserve/bin/pip install ".${extras}" \
    && /opt/meshserve/bin/pip uninstall -y meshserve \
    && rm -rf $packages build ./*.egg-info \
    && gpu=$(/opt/meshserve/bin/pip show onnxruntime-gpu 2>/dev/null | sed -n 's/^Version: //p') \
    && if [ "$DEVICE" = "cpu" ] && [ -n "$gpu" ]; then \
        /opt/meshserve/bin/pip uninstall -y onnxruntime-gpu && /opt/meshserve/bin/pip install "onnxruntime==$gpu"; \
    fi
COPY protos ./protos
COPY worker ./worker
COPY registry ./registry
COPY loadbalancer ./loadbalancer
COPY gateway ./gateway
COPY meshserve ./meshserve
RUN /opt/meshserve/bin/pip install --no-deps .

FROM base-${DEVICE}
ARG DEVICE
COPY --from=build /opt/meshserve /opt/meshserve
COPY deploy/healthcheck.py /opt/meshserve/healthcheck.py
# /models exists and belongs to the service user, so a fresh named volume
# mounted there is writable by `meshserve demo-models`.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/meshserve meshserve \
    && mkdir -p /models \
    && chown meshserve:meshserve /models
ENV PATH=/opt/meshserve/bin:$PATH \
    PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="meshserve" \
      org.opencontainers.image.description="gRPC serving mesh for ONNX models (${DEVICE} build)"
USER meshserve
WORKDIR /home/meshserve
VOLUME ["/models"]
# 8001: gRPC (gateway or worker), 8002: Prometheus /metrics.
EXPOSE 8001 8002
# gRPC health of the process on 127.0.0.1:$MESHSERVE_PORT (default 8001).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/meshserve/healthcheck.py"]
STOPSIGNAL SIGTERM
CMD ["meshserve", "--help"]
