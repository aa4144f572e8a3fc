#!/usr/bin/env bash
# Checks the Helm chart in deploy/helm/relay:
#   1. finds helm ($RELAY_HELM, PATH, $(go env GOPATH)/bin), else builds it with
#      `go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION` (a few minutes the first time on 2 cores,
#      cached in GOPATH/bin afterwards)
#   2. helm lint --strict with the default values and with each ci/*.yaml
#   3. helm template for the same variants into a temporary directory
#   4. the chart's Go test (deploy/helm/chart_test.go, module deploy/helm/go.mod) with RELAY_HELM set
#      and -race, as make test runs every test: strict decoding into the Kubernetes API types, the
#      rollout/drain/security invariants, and that unknown values keys and a missing existingSecret
#      are rejected
#
# Usage: scripts/helm-check.sh           everything above
#        scripts/helm-check.sh install   only step 1; prints the helm path (for a test script that
#                                        wants helm ready before `go test ./...`)
#
# Settings (environment):
#   RELAY_HELM               helm binary to use instead of searching for one
#   RELAY_HELM_VERSION       version to `go install` when helm is missing (v3.22.0)
#   RELAY_HELM_KEEP_RENDERS  1: keep the rendered manifests (their directory is printed)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

CHART=deploy/helm/relay
HELM_VERSION="${RELAY_HELM_VERSION:-v3.22.0}"
# A helm built by `go install` assumes Kubernetes v1.20 for .Capabilities; the chart needs >= 1.30
# (preStop sleep action). The Go test uses the same version.
KUBE_VERSION=1.34.0
# Lint and the default render need the one required value; ci/*.yaml files set it themselves.
REQUIRED_SET=(--set existingSecret.name=relay-secrets)

find_helm() {
	local gopath_bin
	if [ -n "${RELAY_HELM:-}" ]; then
		[ -x "$RELAY_HELM" ] || { echo "helm-check: RELAY_HELM=$RELAY_HELM is not executable" >&2; return 1; }
		echo "$RELAY_HELM"
		return 0
	fi
	if command -v helm >/dev/null 2>&1; then
		command -v helm
		return 0
	fi
	gopath_bin="$(go env GOPATH | cut -d: -f1)/bin"
	if [ -x "$gopath_bin/helm" ]; then
		echo "$gopath_bin/helm"
		return 0
	fi
	return 1
}

install_helm() {
	local helm t0=$SECONDS
	if helm="$(find_helm)"; then
		echo "$helm"
		return 0
	fi
	echo "helm-check: helm not found; go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION (a few minutes the first time)" >&2
	# pkg@version builds outside the relay's module: its go.mod and go.sum are not touched.
	(cd / && go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") >&2
	echo "helm-check: helm built in $((SECONDS - t0))s" >&2
	find_helm
}

if [ "${1:-}" = install ]; then
	install_helm
	exit 0
fi
[ $# -eq 0 ] || { echo "usage: $0 [install]" >&2; exit 2; }

HELM="$(install_helm)"
echo "helm-check: using $HELM ($("$HELM" version --short 2>/dev/null || echo unknown version))"

shopt -s nullglob
VARIANTS=("$CHART"/ci/*.yaml)
shopt -u nullglob
[ "${#VARIANTS[@]}" -gt 0 ] || { echo "helm-check: no $CHART/ci/*.yaml variants" >&2; exit 1; }

OUT="$(mktemp -d "${TMPDIR:-/tmp}/relay-helm.XXXXXX")"
if [ "${RELAY_HELM_KEEP_RENDERS:-}" = 1 ]; then
	echo "helm-check: renders kept in $OUT"
else
	trap 'rm -rf "$OUT"' EXIT
fi

echo "==> helm lint --strict"
echo "-- default values"
"$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" "${REQUIRED_SET[@]}"
for f in "${VARIANTS[@]}"; do
	echo "-- values $f"
	"$HELM" lint --strict --kube-version "$KUBE_VERSION" "$CHART" -f "$f"
done

echo "==> helm template"
"$HELM" template relay "$CHART" --namespace decnet --kube-version "$KUBE_VERSION" "${REQUIRED_SET[@]}" >"$OUT/default.yaml"
echo "rendered default: $(grep -c '^kind:' "$OUT/default.yaml") objects"
for f in "${VARIANTS[@]}"; do
	name="$(basename "$f" .yaml)"
	"$HELM" template relay "$CHART" --namespace decnet --kube-version "$KUBE_VERSION" -f "$f" >"$OUT/$name.yaml"
	echo "rendered $name: $(grep -c '^kind:' "$OUT/$name.yaml") objects"
done

echo "==> go test in deploy/helm (a module of its own)"
RELAY_HELM="$HELM" RELAY_TEST_REQUIRE_SERVICES=1 go -C deploy/helm test -race -count=1 ./...
echo "helm-check: all checks passed"
