#!/usr/bin/env bash
# Builds what a single-node Kubernetes needs that Debian does not package,
# from the Go module proxy, into a cache outside the repository:
#   $RELAY_K8S_CACHE/k8s-$K8S_VERSION/bin   kube-apiserver, kube-controller-manager,
#       kube-scheduler, kubelet, kube-proxy, kubectl
#   $RELAY_K8S_CACHE/coredns-$COREDNS_VERSION/bin/coredns
#       with only the plugins cluster DNS needs (no forward: the cluster's
#       namespace has no way out)
#   helm (go install, as scripts/test.sh does)
# A piece already built is kept; its directory appears only once complete.
# Kubernetes' own module replaces its k8s.io/* staging modules with local
# paths, so it is built from a scratch module that requires it and replaces
# each with its published v0.x (see ../shared/k8s/NOTES.md).
#
# Settings: RELAY_K8S_CACHE (~/.cache/relay-k8s).
set -euo pipefail

K8S_VERSION=v1.32.13
COREDNS_VERSION=v1.15.0
HELM_VERSION=v3.22.0
CACHE="${RELAY_K8S_CACHE:-$HOME/.cache/relay-k8s}"
K8S_DIR="$CACHE/k8s-$K8S_VERSION"
DNS_DIR="$CACHE/coredns-$COREDNS_VERSION"
mkdir -p "$CACHE"
# One build at a time: a second would start over in the same directories.
exec 9>"$CACHE/.lock"
flock 9
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { printf '%s build: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

build_k8s() {
	[[ -x "$K8S_DIR/bin/kubectl" ]] && return 0
	local src="$CACHE/src-k8s-$K8S_VERSION" minor=${K8S_VERSION#v1.}
	local staging="v0.${minor}"
	rm -rf "$src" "$K8S_DIR.tmp" && mkdir -p "$src" "$K8S_DIR.tmp/bin"
	log "kubernetes $K8S_VERSION: scratch module in $src"
	(
		cd "$src"
		go mod init relay-k8s-build >/dev/null 2>&1
		go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
		# Every staging module kubernetes' go.mod points at ./staging, at its
		# published version; the proxy lacks endpointslice's .13 (.12 works)
		# and the sample-* modules are not linked.
		local mod
		mod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
		local m v
		while read -r m; do
			case "$m" in k8s.io/sample-*) continue ;; esac
			v="$staging"
			[[ "$m" == k8s.io/endpointslice ]] && v="v0.${minor%.*}.$(( ${minor#*.} - 1 ))"
			go mod edit -replace="$m=$m@$v"
		done < <(sed -n 's#^\t\(k8s.io/[a-z-]*\) => ./staging/.*#\1#p' "$mod")
		cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
		log "go mod tidy"
		go mod tidy >/dev/null
		local major=1 minornum=${minor%%.*}
		local ld="-s -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minornum"
		ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minornum"
		for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
			local t0=$SECONDS
			go build -trimpath -ldflags="$ld" -o "$K8S_DIR.tmp/bin/$c" "k8s.io/kubernetes/cmd/$c"
			log "$c built in $((SECONDS - t0)) s"
		done
	)
	rm -rf "$K8S_DIR" && mv "$K8S_DIR.tmp" "$K8S_DIR"
}

build_coredns() {
	[[ -x "$DNS_DIR/bin/coredns" ]] && return 0
	local src="$CACHE/src-coredns-$COREDNS_VERSION" t0=$SECONDS
	rm -rf "$src" "$DNS_DIR.tmp" && mkdir -p "$src" "$DNS_DIR.tmp/bin"
	(
		cd "$src"
		go mod init relay-coredns-build >/dev/null 2>&1
		go mod edit -require="github.com/coredns/coredns@$COREDNS_VERSION"
		# CoreDNS' own main links every plugin; this one only those the
		# Corefile of scripts/cluster/up.sh names, in the order plugin.cfg gives.
		cat >main.go <<'GO'
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	_ "github.com/coredns/coredns/core/plugin"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "log", "errors", "cache", "kubernetes"}
}

func main() { coremain.Run() }
GO
		go mod tidy >/dev/null
		go build -trimpath -ldflags=-s -o "$DNS_DIR.tmp/bin/coredns" .
	)
	rm -rf "$DNS_DIR" && mv "$DNS_DIR.tmp" "$DNS_DIR"
	log "coredns built in $((SECONDS - t0)) s"
}

build_helm() {
	command -v helm >/dev/null 2>&1 && return 0
	[[ -x "$(go env GOPATH)/bin/helm" ]] && return 0
	go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

T0=$SECONDS
case "${1:-all}" in
k8s) build_k8s ;;
coredns) build_coredns ;;
all) build_helm; build_k8s; build_coredns ;;
*) echo "usage: $0 [all|k8s|coredns]" >&2; exit 2 ;;
esac
log "done in $((SECONDS - T0)) s: $K8S_DIR/bin, $DNS_DIR/bin"
