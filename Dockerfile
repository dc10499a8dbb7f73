# Minimal image: the sidecar daemon. Kubernetes manifests and injection come with their own issue.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install --no-cache-dir . && useradd --system --uid 1337 sidecar
USER 1337
# admin, proxy, DNS (UDP+TCP), gRPC
EXPOSE 15000 15001 15053/udp 15053/tcp 15010
ENTRYPOINT ["sidecar"]
CMD ["run", "--admin-listen", "0.0.0.0:15000"]
