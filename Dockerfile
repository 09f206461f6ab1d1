# kwatt exporter image. Build (the version comes from scripts/version):
#   docker build --build-arg VERSION="$(scripts/version)" -t <registry>/kwatt-exporter:"$(scripts/version)" .
# Releases are built for linux/amd64 and linux/arm64 by .github/workflows/release.yml.
# Nothing here is architecture-specific: the base is multi-arch and every dependency has an
# aarch64 wheel (scripts/check-arm64-wheels).
# The base is pinned by tag; pin it by digest too (FROM python:...@sha256:...) where your
# registry policy requires it.

# ---- build: turn the source tree into wheels (kwatt + its runtime dependencies) ----------
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
# Wheels for kwatt, its [project.dependencies] and the otlp extra (--otlp.endpoint): no
# test or build tooling reaches the final image.
RUN pip wheel --wheel-dir /wheels ".[otlp]"

# ---- runtime -------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kwatt-exporter" \
      org.opencontainers.image.description="Prometheus exporter that attributes node CPU, DRAM and GPU energy to Kubernetes workloads" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Installed from the build stage's wheels only (--no-index): the same versions that stage
# resolved, and no compiler or sdist build in this image. pip compiles the .pyc files now,
# so the read-only root filesystem costs nothing at start-up.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "kwatt[otlp]==${VERSION}"
# Non-root by default (nobody). The Helm chart runs it as UID 0 only where RAPL counters
# must be read (they are root-only); see runAsRoot in helm/kwatt/values.yaml.
USER 65534:65534
EXPOSE 9877
ENTRYPOINT ["kwatt-exporter"]
