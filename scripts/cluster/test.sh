#!/usr/bin/env bash
# make cluster-test: the Helm chart on a live Kubernetes, under viewers that
# behave like browsers (deploy/helm/clustertest, go test -tags cluster).
#
# Without KUBECONFIG it makes everything itself and removes it at the end,
# whatever happens (an interrupted or failed start included), then prints
# the leftovers check:
#   1. a single-node cluster (scripts/cluster/cluster.sh up; its build is
#      cached in ~/.cache/relay-k8s)
#   2. PostgreSQL and Kafka (scripts/pg.sh and kafka.sh) inside the
#      cluster's network namespace, on the node's address
#   3. the relay's image from the same cmd/relay binary as `make build`
#      (static), and a second tag of it for the upgrade scenario, imported
#      into the node's containerd
#   4. the scenarios, run inside the namespace (they reach the Service's
#      ClusterIP like any client in the cluster's network)
#
# With KUBECONFIG set it uses that cluster and starts nothing; it then needs
# (see the README, "Kubernetes"): RELAY_CT_IMAGE and RELAY_CT_IMAGE_NEXT, two
# tags of the relay's image the cluster can pull; RELAY_TEST_DATABASE_URL
# (a PostgreSQL with internal/store/schema.sql applied) and
# RELAY_TEST_KAFKA_BROKERS reachable from the pods and from here (or
# RELAY_CT_POD_DATABASE_URL / RELAY_CT_POD_KAFKA_BROKERS for the pods'
# view); the Service's ClusterIP reachable from here, or RELAY_CT_URL; and
# RELAY_TEST_KAFKA_SCRIPT / RELAY_TEST_PG_SCRIPT to stop and start them, or
# the two outage scenarios are skipped. Other settings: the header of
# deploy/helm/clustertest/scenarios_test.go.
#
# Settings: RELAY_CT_RUN (go test -run filter of the scenarios, e.g.
# 'TestCluster/(install|rollout)'), RELAY_CT_TIMEOUT (go test -timeout, 40m),
# plus those of scripts/cluster/cluster.sh.
set -uo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
CT="$REPO/deploy/helm/clustertest"
CLUSTER="$SCRIPT_DIR/cluster.sh"
T0=$SECONDS
log() { printf '%s cluster-test: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

HELM="$(command -v helm || echo "$(go env GOPATH)/bin/helm")"
REPORT="$(mktemp "${TMPDIR:-/tmp}/relay-cluster-report.XXXXXX")"
GO_TEST=(go -C "$CT" test -tags cluster -count=1 -v -timeout "${RELAY_CT_TIMEOUT:-40m}" -run "${RELAY_CT_RUN:-TestCluster}" .)

if [[ -n "${KUBECONFIG:-}" ]]; then
	log "using the cluster of KUBECONFIG=$KUBECONFIG"
	RELAY_CT_REPORT="$REPORT" PATH="$(dirname "$HELM"):$PATH" "${GO_TEST[@]}"
	rc=$?
	cat "$REPORT"
	rm -f "$REPORT"
	exit $rc
fi

teardown() {
	local rc=$?
	trap - EXIT INT TERM
	log "tearing down (status so far $rc)"
	bash "$CLUSTER" down || rc=1
	[[ -s "$REPORT" ]] && { echo; echo "On a real cluster:"; cat "$REPORT"; }
	rm -f "$REPORT"
	log "done in $((SECONDS - T0)) s, status $rc"
	exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

set -e
KUBECONFIG="$(bash "$CLUSTER" up | tail -n 1)"
eval "$(bash "$CLUSTER" env)"
export KUBECONFIG
log "cluster up after $((SECONDS - T0)) s"

# PostgreSQL and Kafka in the cluster's namespace, on the node's address
# (installed and fetched outside it: it has no way out).
bash "$REPO/scripts/pg.sh" install
bash "$REPO/scripts/kafka.sh" fetch
STATE="${RELAY_CLUSTER_STATE:-/tmp/relay-cluster}"
export RELAY_TEST_STATE="$STATE/services" RELAY_TEST_PG_HOST="$RELAY_CLUSTER_NODE" RELAY_TEST_PG_PORT=5432 \
	RELAY_TEST_KAFKA_HOST="$RELAY_CLUSTER_NODE" RELAY_TEST_KAFKA_PORT=9092 RELAY_TEST_KAFKA_CONTROLLER_PORT=9093
bash "$CLUSTER" exec bash "$REPO/scripts/pg.sh" start >/dev/null
bash "$CLUSTER" exec bash "$REPO/scripts/kafka.sh" start >/dev/null
eval "$(bash "$REPO/scripts/pg.sh" env)"
eval "$(bash "$REPO/scripts/kafka.sh" env)"
export RELAY_TEST_DATABASE_URL RELAY_TEST_PG_SCRIPT RELAY_TEST_KAFKA_BROKERS RELAY_TEST_KAFKA_SCRIPT
log "PostgreSQL and Kafka up after $((SECONDS - T0)) s"

# The relay's image: the binary `make build` makes, static.
IMAGES="$STATE/images"
CGO_ENABLED=0 go -C "$REPO" build -trimpath -ldflags='-s -w' -o "$IMAGES/relay" ./cmd/relay
for tag in 1 2; do
	go -C "$CT" run ./cmd/image -binary "$IMAGES/relay" -ref "relay.local/identity-relay:$tag" -out "$IMAGES/relay-$tag.tar"
done
bash "$CLUSTER" import "$IMAGES/relay-1.tar" "$IMAGES/relay-2.tar"
export RELAY_CT_IMAGE=relay.local/identity-relay:1 RELAY_CT_IMAGE_NEXT=relay.local/identity-relay:2 RELAY_CT_PULL_POLICY=Never
export RELAY_CT_KUBECTL="$RELAY_CLUSTER_K8S_BIN/kubectl" RELAY_CT_REPORT="$REPORT"
log "images imported after $((SECONDS - T0)) s; scenarios"

# The test binary is built outside the namespace (the module cache may need
# the network) and run inside it.
go -C "$CT" test -tags cluster -c -o "$STATE/clustertest.test" .
set +e
(cd "$CT" && PATH="$(dirname "$HELM"):$PATH" bash "$CLUSTER" exec "$STATE/clustertest.test" \
	-test.v -test.count=1 -test.timeout "${RELAY_CT_TIMEOUT:-40m}" -test.run "${RELAY_CT_RUN:-TestCluster}")
