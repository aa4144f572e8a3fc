#!/usr/bin/env bash
# The whole test suite (make test, and CI through .ci/run):
#   1. start a fresh PostgreSQL (scripts/pg.sh) and Kafka (scripts/kafka.sh),
#      stopped again on exit whatever happens
#   2. go vet ./... in every module of the repository (the relay's at the
#      root, tools/relay-load, deploy/helm: each directory with a go.mod)
#   3. helm ready for deploy/helm's test (scripts/helm-check.sh install), if
#      that script exists
#   4. go test -race ./... of every module with the services required (no
#      skipping), test binaries compiled in parallel first, then run one
#      package at a time
#   5. a short run of every fuzz target, one at a time
#   6. scripts/helm-check.sh, if present
# Every step runs even after an earlier one failed; the exit status is
# non-zero when any failed.
#
# Settings (environment):
#   RELAY_TEST_FUZZTIME    per fuzz target (10s)
#   RELAY_TEST_GO_P        go test -p: test binaries run at once (1, because
#                          fault tests stop and start the shared services)
#   RELAY_TEST_TIMEOUT     go test -timeout (15m)
#   RELAY_TEST_KEEP_STATE  1: keep the services' previous data instead of
#                          starting from empty ones
# plus those of scripts/pg.sh and scripts/kafka.sh (RELAY_TEST_STATE, ports).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1

FUZZTIME="${RELAY_TEST_FUZZTIME:-10s}"
GO_P="${RELAY_TEST_GO_P:-1}"
GO_TIMEOUT="${RELAY_TEST_TIMEOUT:-15m}"

T_START=$SECONDS

# Every Go module of the repository, the relay's (.) first.
mapfile -t MODULES < <(find . -name .git -prune -o -name go.mod -printf '%h\n' | sort)

# in_modules CMD...: run CMD in every module's directory; fails if any fails.
in_modules() {
	local m rc=0
	for m in "${MODULES[@]}"; do
		(cd "$m" && "$@") || rc=1
	done
	return "$rc"
}
declare -a SUMMARY=()
FAILED=0

banner() { printf '\n==> %s\n' "$*"; }

# step NAME CMD...: run, time, record.
step() {
	local name="$1" t0=$SECONDS rc
	shift
	banner "$name"
	"$@"
	rc=$?
	local dt=$((SECONDS - t0))
	if [ "$rc" -eq 0 ]; then
		SUMMARY+=("$(printf '%-44s ok      %4ds' "$name" "$dt")")
	else
		SUMMARY+=("$(printf '%-44s FAILED  %4ds (exit %d)' "$name" "$dt" "$rc")")
		FAILED=1
	fi
	echo "--- $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in ${dt}s"
	return "$rc"
}

print_summary() {
	banner "summary"
	local line
	for line in "${SUMMARY[@]}"; do echo "  $line"; done
	echo "  total $((SECONDS - T_START))s"
}

cleanup() {
	local rc=$?
	banner "stopping services"
	bash "$REPO/scripts/kafka.sh" stop || true
	bash "$REPO/scripts/pg.sh" stop || true
	exit "$rc"
}
trap cleanup EXIT
trap 'echo "scripts/test.sh: interrupted" >&2; exit 130' INT TERM

start_services() {
	if [ "${RELAY_TEST_KEEP_STATE:-}" != 1 ]; then
		bash scripts/kafka.sh wipe && bash scripts/pg.sh wipe || return 1
	fi
	bash scripts/pg.sh start >/dev/null || return 1
	bash scripts/kafka.sh start >/dev/null || return 1
	eval "$(bash scripts/pg.sh env)"
	eval "$(bash scripts/kafka.sh env)"
	export RELAY_TEST_DATABASE_URL RELAY_TEST_KAFKA_BROKERS RELAY_TEST_PG_SCRIPT RELAY_TEST_KAFKA_SCRIPT
	export RELAY_TEST_REQUIRE_SERVICES=1
	env | grep '^RELAY_TEST_' | sort
}

# Build every test binary with -race at full parallelism (-exec /bin/true:
# nothing runs), so the -p 1 run below only links and runs. Output is shown
# on failure only; go test would print the same errors again anyway.
compile_tests() {
	local out rc
	out="$(in_modules go test -race -count=1 -run '^$' -exec /bin/true ./... 2>&1)"
	rc=$?
	[ "$rc" -eq 0 ] || echo "$out" | grep -vE '^(ok|\?) ' | head -100
	return "$rc"
}

# helm for deploy/helm's Go test (built with go install the first time).
install_helm() {
	local helm
	helm="$(bash scripts/helm-check.sh install | tail -n 1)" || return 1
	[ -x "$helm" ] || { echo "scripts/helm-check.sh install printed no helm path" >&2; return 1; }
	export RELAY_HELM="$helm"
	echo "RELAY_HELM=$RELAY_HELM"
}

go_test() {
	in_modules go test -race -count=1 -p "$GO_P" -timeout "$GO_TIMEOUT" ./...
}

# Fuzz targets: "dir FuzzName" per line (dir: the package's directory, which
# go test -fuzz must be run from within the package's module).
list_fuzz_targets() {
	local dir
	# Only packages whose test files declare a Fuzz function pay for the
	# test binary build that go test -list needs.
	in_modules go list -f '{{.Dir}}' ./... 2>/dev/null | while read -r dir; do
		grep -qsE '^func Fuzz' "$dir"/*_test.go || continue
		(cd "$dir" && go test -list '^Fuzz' .) 2>/dev/null | grep -E '^Fuzz[A-Za-z0-9_]*$' | sed "s#^#$dir #"
	done
}

fuzz_all() {
	local targets n=0 fails=0 dir name
	targets="$(list_fuzz_targets)"
	if [ -z "$targets" ]; then
		echo "no fuzz targets found"
		return 0
	fi
	echo "$targets" | sed 's/^/  /'
	while read -r dir name; do
		[ -n "$name" ] || continue
		n=$((n + 1))
		local t0=$SECONDS
		echo "--- fuzz ${dir#"$REPO"/} $name ($FUZZTIME)"
		if (cd "$dir" && go test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" .); then
			echo "--- fuzz $name ok in $((SECONDS - t0))s"
		else
			echo "--- fuzz $name FAILED in $((SECONDS - t0))s (a failing input is saved under the package's testdata/fuzz/$name)"
			fails=$((fails + 1))
		fi
	done <<<"$targets"
	echo "fuzz targets: $((n - fails)) ok, $fails failing"
	[ "$fails" -eq 0 ]
}

banner "environment"
go version
echo "repo $REPO, CI=${CI:-}, $(nproc) cores"

if ! step "fetch Apache Kafka (cached after the first run)" bash scripts/kafka.sh fetch; then
	print_summary
	echo "scripts/test.sh: no Kafka to test against; nothing tested" >&2
	exit 1
fi
if ! step "start PostgreSQL and Kafka" start_services; then
	print_summary
	echo "scripts/test.sh: services did not start; nothing tested" >&2
	exit 1
fi
step "go vet ./... (${MODULES[*]})" in_modules go vet ./...
if [ -f scripts/helm-check.sh ]; then
	step "helm (scripts/helm-check.sh install)" install_helm
fi
step "compile tests with -race" compile_tests
step "go test -race ./... (${MODULES[*]}; -p $GO_P)" go_test
step "fuzz (each target $FUZZTIME)" fuzz_all
if [ -f scripts/helm-check.sh ]; then
	step "scripts/helm-check.sh" bash scripts/helm-check.sh
fi

print_summary
if [ "$FAILED" -ne 0 ]; then
	echo "scripts/test.sh: FAILED" >&2
	exit 1
fi
echo "scripts/test.sh: all steps passed"
