#!/usr/bin/env bash
# Offline checks of the Helm chart in helm/gateway.
#
#   scripts/check-chart.sh                      default values, values-sidecar.yaml (also with
#                                               the NetworkPolicy on, and with shared state on
#                                               ci/sidecar-shared-values.yaml), ci/full-values.yaml,
#                                               ci/redis-values.yaml, ci/decision-values.yaml
#                                               (decision mode behind an ingress)
#   scripts/check-chart.sh -f my-values.yaml    one render with these extra helm args
#
# For each render: helm lint --strict, helm template, yamllint (duplicate keys, syntax) on the
# output, kubernetes-validate --strict against the Kubernetes $KUBE_VERSION schemas (unknown
# fields fail; CRD kinds such as ServiceMonitor only warn), and `gateway check-config` on the
# rendered gateway.yaml when a `gateway` command exists (with dummies for the variables the
# pod gets from Secrets: AUTHLETE_ACCESS_TOKEN, GATEWAY_REDIS_URL, GATEWAY_SHARED_SECRET,
# GATEWAY_ADMIN_TOKEN; files the pod mounts from Secrets, such as shared.tls.ca_file, are
# pointed at a placeholder).
#
# Tools (found in this order, fetched into the cache when missing):
#   helm:                 $HELM, `helm` on PATH, $GATEWAY_TOOLS/bin/helm, else scripts/get-helm.sh
#   kubernetes-validate:  $KUBERNETES_VALIDATE, on PATH, else $GATEWAY_TOOLS/venv (pip install)
#   gateway:              $GATEWAY, ./.venv/bin/gateway, on PATH (skipped when none)
# GATEWAY_TOOLS defaults to /var/tmp/gateway-tools; KUBE_VERSION to 1.30.0.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CHART="$ROOT/helm/gateway"
TOOLS="${GATEWAY_TOOLS:-/var/tmp/gateway-tools}"
KUBE_VERSION="${KUBE_VERSION:-1.30.0}"
KV_PIN="kubernetes-validate==1.37.0"
YAMLLINT_PIN="yamllint==1.38.0"

die() { echo "check-chart: FAIL: $*" >&2; exit 1; }
say() { echo "check-chart: $*"; }

# ------------------------------------------------------------------------------ tools
if [ -n "${HELM:-}" ]; then
  helm="$HELM"
elif command -v helm >/dev/null 2>&1; then
  helm="$(command -v helm)"
elif [ -x "$TOOLS/bin/helm" ]; then
  helm="$TOOLS/bin/helm"
else
  say "fetching helm into $TOOLS/bin"
  helm="$("$ROOT/scripts/get-helm.sh" "$TOOLS/bin" | tail -n 1)"
fi
[ -x "$helm" ] || die "helm not found at $helm"

venv="$TOOLS/venv"
ensure_venv() {
  if [ ! -x "$venv/bin/$1" ]; then
    say "installing $2 into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || die "python3 -m venv $venv failed"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$2" \
      || die "pip install $2 failed"
  fi
}
if [ -n "${KUBERNETES_VALIDATE:-}" ]; then
  kv="$KUBERNETES_VALIDATE"
elif command -v kubernetes-validate >/dev/null 2>&1; then
  kv="$(command -v kubernetes-validate)"
else
  ensure_venv kubernetes-validate "$KV_PIN"
  kv="$venv/bin/kubernetes-validate"
fi
if command -v yamllint >/dev/null 2>&1; then
  yamllint="$(command -v yamllint)"
else
  ensure_venv yamllint "$YAMLLINT_PIN"
  yamllint="$venv/bin/yamllint"
fi

gateway="${GATEWAY:-}"
if [ -z "$gateway" ]; then
  if [ -x "$ROOT/.venv/bin/gateway" ]; then gateway="$ROOT/.venv/bin/gateway"
  elif command -v gateway >/dev/null 2>&1; then gateway="$(command -v gateway)"
  fi
fi
# a Python that can read YAML, to pull gateway.yaml out of the rendered ConfigMap
pyyaml=""
for py in ${gateway:+"$(dirname "$gateway")/python"} "$venv/bin/python" python3; do
  if "$py" -c 'import yaml' >/dev/null 2>&1; then pyyaml="$py"; break; fi
done

say "$("$helm" version --short), $("$kv" --version 2>&1 | head -n 1 | sed 's/^/kubernetes-validate /'), Kubernetes $KUBE_VERSION"

# ------------------------------------------------------------------------------ checks
out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT

check() {  # check LABEL [helm args...]
  local label="$1"; shift
  say "== $label"
  "$helm" lint --strict "$CHART" "$@" >"$out/lint.txt" 2>&1 \
    || { cat "$out/lint.txt" >&2; die "$label: helm lint --strict failed"; }
  "$helm" template ci-release "$CHART" --namespace ci --kube-version "$KUBE_VERSION" \
    --api-versions monitoring.coreos.com/v1 "$@" >"$out/rendered.yaml" \
    || die "$label: helm template failed"
  "$yamllint" -d '{extends: relaxed, rules: {line-length: disable, indentation: {spaces: consistent, indent-sequences: whatever}}}' "$out/rendered.yaml" \
    || die "$label: rendered YAML has problems (yamllint)"
  # options before file names; --strict rejects unknown fields
  "$kv" --strict --quiet -k "${KUBE_VERSION%.*}" "$out/rendered.yaml" \
    || die "$label: kubernetes-validate --strict rejected a manifest"
  if [ -n "$gateway" ] && [ -n "$pyyaml" ]; then
    "$pyyaml" - "$out/rendered.yaml" "$out" >"$out/gateway.yaml" <<'PY' || die "$label: no ConfigMap with gateway.yaml rendered"
import os, sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "ConfigMap" and "gateway.yaml" in doc.get("data", {}):
        text = doc["data"]["gateway.yaml"]
        cfg = yaml.safe_load(text)
        ca = ((cfg.get("shared") or {}).get("tls") or {}).get("ca_file")
        if ca:  # mounted from a Secret in the pod: a placeholder here
            placeholder = os.path.join(sys.argv[2], "redis-ca.pem")
            open(placeholder, "w").write("placeholder\n")
            text = text.replace(ca, placeholder)
        sys.stdout.write(text)
        sys.exit(0)
sys.exit(1)
PY
    redis_url="redis://redis.invalid:6379/0"
    grep -q 'redis-ca.pem' "$out/gateway.yaml" && redis_url="rediss://redis.invalid:6380/0"
    AUTHLETE_ACCESS_TOKEN=check-chart-dummy GATEWAY_REDIS_URL="$redis_url" \
      GATEWAY_SHARED_SECRET=check-chart-dummy-shared-secret-0123456789 \
      GATEWAY_ADMIN_TOKEN=check-chart-dummy-admin-token \
      "$gateway" check-config --config "$out/gateway.yaml" \
      >"$out/check.txt" 2>&1 || { cat "$out/check.txt" >&2; die "$label: gateway check-config rejected the rendered config"; }
    grep '^warning: ' "$out/check.txt" >&2 || true  # valid, but worth a look
    say "gateway check-config: OK"
  else
    say "gateway check-config skipped (no gateway command or no Python with PyYAML)"
  fi
  say "$label: OK, $(grep -c '^kind:' "$out/rendered.yaml") objects: $(grep '^kind:' "$out/rendered.yaml" | awk '{print $2}' | sort | tr '\n' ' ')"
}

if (($#)); then
  check "helm args: $*" "$@"
else
  check "default values"
  check "values-sidecar.yaml" -f "$CHART/values-sidecar.yaml"
  check "ci/full-values.yaml" -f "$CHART/ci/full-values.yaml"
  check "values-sidecar.yaml + networkPolicy" -f "$CHART/values-sidecar.yaml" \
    --set networkPolicy.enabled=true --set networkPolicy.podSelector.app=orders
  check "ci/redis-values.yaml" -f "$CHART/ci/redis-values.yaml"
  check "values-sidecar.yaml + ci/sidecar-shared-values.yaml" -f "$CHART/values-sidecar.yaml" \
    -f "$CHART/ci/sidecar-shared-values.yaml"
  check "ci/decision-values.yaml" -f "$CHART/ci/decision-values.yaml"
fi
say "all OK"
