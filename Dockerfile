# Authlete gateway container image.
#
#   docker build -t authlete-gateway .
#   docker run --rm -p 8080:8080 -p 9090:9090 --read-only \
#     -e AUTHLETE_ACCESS_TOKEN=... -e AUTHLETE_SERVICE_ID=... -e UPSTREAM_URL=http://app:8000 \
#     authlete-gateway
#   docker run --rm --network host authlete-gateway demo        # the embedded demo on loopback
#
# Without a Docker engine: scripts/container-smoke.sh (buildah + podman).
#
# Keep the base tag exactly `python:3.11-slim`: the offline smoke build tags a stand-in
# image with this name and builds with --pull=never. Pin a digest in your own registry
# mirror if you need byte-for-byte reproducible builds.

# ---------------------------------------------------------------------------- builder
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that this layer stays cached while only
# the package sources change.
COPY pyproject.toml ./
RUN python -m venv /opt/gateway \
 && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > /tmp/requirements.txt \
 && /opt/gateway/bin/pip install --no-cache-dir --requirement /tmp/requirements.txt

# Then the project itself: built into a wheel and installed from it. The final stage copies
# the virtual environment as a whole (no pip, no wheels, no build tools in the runtime
# image). pip precompiles the .pyc files, so nothing needs to be written at run time.
COPY README.md ./
COPY gateway ./gateway
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/gateway/bin/pip install --no-cache-dir --no-deps /wheels/*.whl \
 && /opt/gateway/bin/pip check \
 && /opt/gateway/bin/pip uninstall --yes pip setuptools \
 && /opt/gateway/bin/gateway --version

# ---------------------------------------------------------------------------- runtime
FROM python:3.11-slim

LABEL org.opencontainers.image.title="authlete-gateway" \
      org.opencontainers.image.description="Introspection-caching reverse proxy for Authlete" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric non-root user (Kubernetes runAsNonRoot can check a numeric USER).
RUN groupadd --gid 10001 gateway \
 && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/gateway /opt/gateway
COPY config/gateway.example.yaml /etc/gateway/gateway.yaml

USER 10001:10001

# 8080: proxy listener; 9090: admin listener (/healthz, /readyz, /metrics).
EXPOSE 8080 9090

# Liveness of the admin listener (assumes admin_listen on port 9090). Kubernetes ignores
# HEALTHCHECK and uses the chart's probes instead.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

# The gateway drains in-flight requests on SIGTERM (at most shutdown_timeout seconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/gateway/gateway.yaml"]
