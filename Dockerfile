# The sidecar daemon. Build: docker build -t sidecar:0.1.0 .
# Two stages: the first installs the package into a virtualenv (compiling the proxy's hot path with
# mypyc, setup.py), the second copies only that virtualenv onto a clean slim base and removes the base's
# own pip, so no pip, pip cache, build tree or compiler ends up in the image. .dockerignore keeps the
# build context to what the first stage copies (never a host's compiled .so or bytecode).
# Optional: --build-arg REVISION=$(git rev-parse HEAD) --build-arg CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/sidecar
COPY pyproject.toml setup.py README.md ./
COPY sidecar ./sidecar
RUN /opt/sidecar/bin/pip install --no-cache-dir . \
    && /opt/sidecar/bin/pip uninstall --yes pip setuptools

FROM python:3.11-slim-bookworm
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="Discovery and routing sidecar for networks of AI agents: etcd registry, DNS, HTTP proxy, health" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
# The base image's pip, setuptools and wheel (/usr/local): the virtualenv never used them, nothing here
# installs anything. Then uid/gid 1337, as the injected container's securityContext expects.
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 1337 sidecar \
    && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sidecar
COPY --from=build /opt/sidecar /opt/sidecar
# Bytecode was compiled at install time; a read-only root filesystem needs nothing written at run time.
ENV PATH=/opt/sidecar/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 1337:1337
# admin, proxy, DNS (UDP+TCP; 53 in a pod), gRPC
EXPOSE 15000 15001 15053/udp 15053/tcp 15010
# The admin API's liveness endpoint, on the port CMD gives it (no curl in a slim image: Python does it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:15000/healthz', timeout=2)"]
ENTRYPOINT ["sidecar"]
# The admin API on every interface so that Prometheus and probes reach it; the rest stays on loopback.
CMD ["run", "--admin-listen", "0.0.0.0:15000"]
