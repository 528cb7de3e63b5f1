# syntax=docker/dockerfile:1
# One image for every kvr service; the command picks the service:
#   docker build -t kvr:dev .                    the router image (default target `runtime`)
#   docker run kvr:dev indexer | scheduler | epp-bridge | relay | mock-workers ...
#   docker build --target sim -t kvr:dev-sim .   + the `kvr[sim]` extra, for `kvr replay` / `kvr dev` jobs
# Configuration is by KVR_* environment variables (see `kvr config-table`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: resolve and install into a self-contained virtualenv ------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Compilers live only in this stage: every dependency ships wheels for amd64/arm64 today, but a
# platform without one must still build, and none of this reaches the runtime image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/kvr
WORKDIR /src
# Dependencies first (cached layer): the runtime dependencies of pyproject.toml, pinned to the
# versions of requirements.lock (the lock also pins the dev extras, which stay out of the image).
COPY pyproject.toml requirements.lock README.md ./
COPY schemas ./schemas
COPY services ./services
# xds-protos (ext_proc's Envoy protos) ships an old copy of opentelemetry/proto/ over the files of
# opentelemetry-proto, which the OTLP trace exporters need: reinstall the latter last, then import both.
RUN /opt/kvr/bin/pip install --constraint requirements.lock . \
 && /opt/kvr/bin/pip install --no-deps --force-reinstall --constraint requirements.lock opentelemetry-proto \
 && /opt/kvr/bin/python -c "import opentelemetry.exporter.otlp.proto.http.trace_exporter, opentelemetry.exporter.otlp.proto.grpc.trace_exporter" \
 && /opt/kvr/bin/kvr --help >/dev/null \
 && /opt/kvr/bin/kvr schemas check

# ---- build-sim: the same virtualenv plus the simulation extra (numpy, matplotlib, rich) ---------
FROM build AS build-sim
RUN /opt/kvr/bin/pip install --constraint requirements.lock ".[sim]" \
 && /opt/kvr/bin/kvr replay --help >/dev/null

# ---- base: what both images share (slim, no compilers, non-root); no virtualenv yet ----------
FROM ${PYTHON_IMAGE} AS base
LABEL org.opencontainers.image.title="kvr" \
      org.opencontainers.image.description="KV-cache-aware router for LLM inference fleets (NATS JetStream)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kvr \
 && useradd --system --uid 10001 --gid kvr --home-dir /home/kvr --create-home --shell /usr/sbin/nologin kvr
# The Mooncake traces (~1 MB gzipped, with their provenance and license notice) so that `kvr replay
# data/...` and `kvr dev` work in the container as in a checkout; compose may mount another folder here.
COPY data /home/kvr/data
ENV PATH=/opt/kvr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KVR_HTTP_PORT=8080 \
    KVR_LOG_FORMAT=json
WORKDIR /home/kvr
USER 10001:10001
# 8080: /healthz /readyz /metrics; 9002: the EPP bridge's ext_proc gRPC port (epp-bridge --grpc-port 9002)
EXPOSE 8080 9002
# Liveness of the process's HTTP server (/healthz on KVR_HTTP_PORT); readiness (/readyz) is left
# to the orchestrator because a service is healthy long before it has caught up with its streams.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KVR_HTTP_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["kvr"]
CMD ["--help"]

# ---- sim: replay / dev jobs (compose's `replay` service builds this target) -------------------
FROM base AS sim
COPY --from=build-sim /opt/kvr /opt/kvr

# ---- runtime (default, last): the router image, without the simulation extra ------------------
FROM base AS runtime
COPY --from=build /opt/kvr /opt/kvr
