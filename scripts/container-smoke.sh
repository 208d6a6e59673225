#!/usr/bin/env bash
# Build the project's Dockerfile and smoke-test the image, without a Docker engine.
#
#   scripts/container-smoke.sh
#
# What it does (each step fails the script with a "container-smoke: FAIL: ..." line):
#   1. installs buildah, podman, runc and debootstrap with apt if any is missing (needs root);
#   2. writes a private containers storage/config under $GATEWAY_OCI_ROOT (overlay driver, runc +
#      cgroupfs, ulimits within the current hard limits, file events logger);
#   3. makes a stand-in for the Dockerfile's base image `python:3.11-slim` with debootstrap
#      (Debian bookworm + python3, the host's CA bundle for pip) and tags it
#      docker.io/library/python:3.11-slim, because no container registry is reachable here.
#      Re-runs reuse it (delete it with GATEWAY_OCI_REBASE=1);
#   4. `buildah bud --pull=never --format docker` (docker format keeps HEALTHCHECK);
#   5. checks the baked-in /etc/gateway/gateway.yaml with `gateway check-config`;
#   6. runs `gateway demo` in the image (host network, read-only root filesystem, no tmpfs),
#      waits for /healthz, runs the image's HEALTHCHECK, sends an authorised request (200 with
#      X-Auth-Subject: alice at the echo upstream) and one without a token (401), checks the
#      process runs as a non-root user, then stops it with SIGTERM (must exit 0) and removes it.
#
# Environment:
#   GATEWAY_OCI_ROOT   scratch dir for storage, configs and the stand-in base (/var/tmp/gateway-oci)
#   GATEWAY_IMAGE      tag of the image built (localhost/authlete-gateway:smoke)
#   GATEWAY_OCI_REBASE 1 = rebuild the stand-in base image even if present
#   SMOKE_TIMEOUT      seconds to wait for the container to become healthy (60)
#
# The demo binds 127.0.0.1:8080, 9090, 18400 and 18401 on the host network: they must be free.
# Only loopback traffic at run time; the build itself reaches PyPI (pip) and the Debian mirror.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OCI_ROOT="${GATEWAY_OCI_ROOT:-/var/tmp/gateway-oci}"
IMAGE="${GATEWAY_IMAGE:-localhost/authlete-gateway:smoke}"
BASE_TAG="docker.io/library/python:3.11-slim"
BASE_RECIPE="1"   # bump when the stand-in recipe below changes, to force a rebuild
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-60}"
DEMO_PORTS=(8080 9090 18400 18401)
CA_BUNDLE="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

started=$SECONDS
say() { printf 'container-smoke: [%3ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf 'container-smoke: FAIL: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------------------ 1. tools
missing=()
for tool in buildah podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; install them (apt-get install buildah podman runc debootstrap) or run as root"
  say "installing ${missing[*]} with apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends buildah podman runc debootstrap >/dev/null \
    || die "apt-get install buildah podman runc debootstrap failed"
fi
command -v curl >/dev/null 2>&1 || die "curl is needed on the host"
command -v python3 >/dev/null 2>&1 || die "python3 is needed on the host"

# ------------------------------------------------------------------------------ 2. ports
busy=()
for port in "${DEMO_PORTS[@]}"; do
  python3 - "$port" <<'PY' || busy+=("$port")
import socket, sys
s = socket.socket()
# like the servers: SO_REUSEADDR, so connections in TIME-WAIT do not count, a listener does
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
done
if ((${#busy[@]})); then
  die "port(s) ${busy[*]} on 127.0.0.1 already in use; the demo in the container needs ${DEMO_PORTS[*]} free (is a \`gateway demo\` running?)"
fi

# ------------------------------------------------------------------------------ 3. storage
mkdir -p "$OCI_ROOT"
OCI_ROOT="$(cd "$OCI_ROOT" && pwd)"
cat >"$OCI_ROOT/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$OCI_ROOT/storage"
runroot = "$OCI_ROOT/run"
CONF
# crun fails on hybrid cgroup v1 hosts -> runc + cgroupfs; without CAP_SYS_RESOURCE the default
# rlimits cannot be raised -> stay under the hard limits; no systemd -> file events logger.
cat >"$OCI_ROOT/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$OCI_ROOT/containers.conf" CONTAINERS_STORAGE_CONF="$OCI_ROOT/storage.conf"

# ------------------------------------------------------------------------------ 4. base image
grep -Eq '^FROM[[:space:]]+python:3\.11-slim([[:space:]]|$)' "$ROOT/Dockerfile" \
  || die "the Dockerfile's FROM is not python:3.11-slim; the stand-in base below would not match"
have_base() {
  [ "$(podman image inspect --format '{{index .Labels "gateway.smoke.stand-in"}}' "$BASE_TAG" 2>/dev/null)" = "$BASE_RECIPE" ]
}
if [ "${GATEWAY_OCI_REBASE:-0}" = 1 ] || ! have_base; then
  say "making the stand-in base image $BASE_TAG with debootstrap (about a minute)"
  podman rmi -f "$BASE_TAG" >/dev/null 2>&1 || true
  rootfs="$OCI_ROOT/rootfs"
  rm -rf "$rootfs"
  # no mirror argument: debootstrap's default Debian mirror is the one apt uses here
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" >"$OCI_ROOT/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $OCI_ROOT/debootstrap.log"
  # Mimic the official python:3.11-slim: python/pip on PATH under /usr/local/bin, system-wide pip
  # allowed. (Debian's python is 3.11.2 under /usr; the official image's is 3.11.x under
  # /usr/local. This checks that the Dockerfile builds and runs, not a byte-identical image.)
  rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python3"
  ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
  # Registry TLS here is signed by a CA only the host's bundle has.
  cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL gateway.smoke.stand-in=$BASE_RECIPE" \
    --change 'CMD ["python3"]' - "$BASE_TAG" >"$OCI_ROOT/import.log" 2>&1 \
    || { cat "$OCI_ROOT/import.log" >&2; die "podman import of the stand-in base failed"; }
  rm -rf "$rootfs"
  have_base || die "stand-in base image $BASE_TAG missing after import"
else
  say "reusing the stand-in base image $BASE_TAG"
fi

# ------------------------------------------------------------------------------ 5. build
say "building $IMAGE"
build() {  # build [extra buildah args]
  buildah bud --isolation chroot --pull=never --network host --format docker --layers \
    -f "$ROOT/Dockerfile" "$@" "$ROOT" >>"$OCI_ROOT/build.log" 2>&1 \
    || { tail -n 40 "$OCI_ROOT/build.log" >&2; die "image build failed; full log in $OCI_ROOT/build.log"; }
}
: >"$OCI_ROOT/build.log"
# The builder stage gets a tag of its own so that the prune below keeps its cached layers
# (dependencies installed from pyproject.toml); the full build then reuses them.
build --target builder -t "${IMAGE}-builder"
build -t "$IMAGE"
# Drop what earlier builds left behind (replaced images, old builder results); the tagged
# images above and their layers stay.
podman image prune -f >/dev/null 2>&1 || true
say "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

healthcheck="$(podman image inspect --format '{{json .HealthCheck}}' "$IMAGE" 2>/dev/null || true)"
case "$healthcheck" in *healthz*) ;; *) die "the image has no HEALTHCHECK on /healthz (got: ${healthcheck:-nothing})" ;; esac
user="$(podman image inspect --format '{{.User}}' "$IMAGE")"
case "${user%%:*}" in ''|0|root) die "the image's USER is '${user}', not a non-root user" ;; esac

# ------------------------------------------------------------------------------ 6. default config
out="$(podman run --rm --network none --read-only --read-only-tmpfs=false \
  -e AUTHLETE_ACCESS_TOKEN=smoke-dummy "$IMAGE" check-config --config /etc/gateway/gateway.yaml 2>&1)" \
  || die "the image's default config is rejected: $out"
say "default /etc/gateway/gateway.yaml accepted"
rc=0
out="$(podman run --rm --network none --read-only "$IMAGE" check-config --config /etc/gateway/gateway.yaml 2>&1)" || rc=$?
if [ "$rc" != 2 ] || ! grep -q AUTHLETE_ACCESS_TOKEN <<<"$out"; then
  die "without AUTHLETE_ACCESS_TOKEN the default config should be refused with exit 2 naming it (got $rc: $out)"
fi

# ------------------------------------------------------------------------------ 7. run the demo
cid=""
cleanup() {
  if [ -n "$cid" ]; then
    podman rm -f -t 2 "$cid" >/dev/null 2>&1 || true
    echo "container-smoke: removed container ${cid:0:12}" >&2
  fi
}
trap cleanup EXIT
# --read-only-tmpfs=false: not even /tmp is writable, as with readOnlyRootFilesystem in Kubernetes.
# --health-interval=disable: no systemd here for the periodic timer; `podman healthcheck run`
# below runs the image's HEALTHCHECK command once by hand.
cid="$(podman run -d --network host --read-only --read-only-tmpfs=false \
  --health-interval=disable "$IMAGE" demo 2>"$OCI_ROOT/run.log")" \
  || { cat "$OCI_ROOT/run.log" >&2; die "podman run failed"; }
say "container ${cid:0:12} started; waiting for /healthz"
deadline=$((SECONDS + SMOKE_TIMEOUT))
until curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:9090/healthz 2>/dev/null; do
  if [ "$(podman inspect --format '{{.State.Running}}' "$cid" 2>/dev/null)" != true ]; then
    podman logs "$cid" >&2 || true
    die "the container exited before /healthz answered"
  fi
  if ((SECONDS > deadline)); then
    podman logs "$cid" >&2 || true
    die "/healthz did not answer within ${SMOKE_TIMEOUT}s"
  fi
  sleep 0.5
done
curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:9090/readyz || die "/readyz is not 200"
curl -fsS --max-time 2 http://127.0.0.1:9090/metrics | grep -q '^gateway_build_info' \
  || die "/metrics does not show gateway_build_info"

podman healthcheck run "$cid" >/dev/null || die "podman healthcheck run (the image's HEALTHCHECK) failed"
say "HEALTHCHECK passed"

body="$OCI_ROOT/response.txt"
code="$(curl -sS -o "$body" -w '%{http_code}' --max-time 5 \
  -H 'Authorization: Bearer demo-valid-token' http://127.0.0.1:8080/orders/1)" \
  || die "authorised request failed to complete"
[ "$code" = 200 ] || die "authorised request: expected 200, got $code: $(head -c 500 "$body")"
seen_alice() {
  python3 - "$body" <<'PY'
import json, sys
headers = json.load(open(sys.argv[1]))["headers"]
sys.exit(0 if ["X-Auth-Subject", "alice"] in headers else 1)
PY
}
seen_alice || die "authorised request: the echo upstream did not see X-Auth-Subject: alice: $(head -c 500 "$body")"
code="$(curl -sS -o "$body" -w '%{http_code}' --max-time 5 http://127.0.0.1:8080/orders/1)" \
  || die "request without a token failed to complete"
[ "$code" = 401 ] || die "request without a token: expected 401, got $code"
say "proxy answers: 200 with identity headers, 401 without a token"

uid="$(podman exec "$cid" id -u)" || die "podman exec id -u failed"
[ "$uid" != 0 ] || die "the container runs as root (uid 0)"
say "runs as uid $uid"

# Graceful stop: SIGTERM must drain and exit 0 (the process is PID 1 in the container).
podman stop -t 20 "$cid" >/dev/null 2>>"$OCI_ROOT/run.log" || { cat "$OCI_ROOT/run.log" >&2; die "podman stop failed"; }
status="$(podman inspect --format '{{.State.ExitCode}}' "$cid")"
[ "$status" = 0 ] || { podman logs "$cid" >&2 || true; die "exit code after SIGTERM was $status, not 0"; }
podman rm "$cid" >/dev/null 2>>"$OCI_ROOT/run.log" || die "podman rm failed"
cid=""
rm -f "$body"
say "OK: $IMAGE builds, is healthy, proxies, runs as non-root and stops cleanly"
