#!/usr/bin/env bash
# The whole test suite (make test, and CI through .ci/run), over every Go
# module of the repository: the relay's (the root), tools/relay-load and
# deploy/helm (each directory with a go.mod).
#
# Most of the time goes to the tests of the packages that use the real
# PostgreSQL and Kafka, which wait far more than they compute, so the rest
# runs beside them on the other core:
#   1. at once: fetch and start a fresh PostgreSQL (scripts/pg.sh) and Kafka
#      (scripts/kafka.sh), stopped again on exit whatever happens; and
#      compile every module's test binaries with -race at full parallelism
#   2. then two lanes at once:
#      services  go test -race of the relay's packages whose tests use the
#                services (they import internal/testenv), one package at a
#                time, because fault tests stop and start the services
#      others    go vet ./... of every module; go test -race of every other
#                package (the relay's packages that need no service and the
#                tool modules); a run of every fuzz target, one at a time;
#                helm (built with go install the first time) and
#                scripts/helm-check.sh, which runs deploy/helm's test with -race
#   The "others" lane's output is printed when it ends (also in its log file,
#   named at its start).
# Every step runs even after an earlier one failed; the exit status is
# non-zero when any failed.
#
# Settings (environment):
#   RELAY_TEST_FUZZTIME       per fuzz target (20s)
#   RELAY_TEST_FUZZ_WORKERS   go test -parallel of the fuzzing: worker
#                             processes (1, so that one core is left to the
#                             services lane; 20 s of one worker is the work
#                             of the 10 s of two that fuzzing alone had)
#   RELAY_TEST_GO_P           go test -p of the services lane (1, because
#                             fault tests stop and start the shared services)
#   RELAY_TEST_TIMEOUT        go test -timeout (15m)
#   RELAY_TEST_KEEP_STATE     1: keep the services' previous data instead of
#                             starting from empty ones
# plus those of scripts/pg.sh and scripts/kafka.sh (RELAY_TEST_STATE, ports)
# and of scripts/helm-check.sh.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1

FUZZTIME="${RELAY_TEST_FUZZTIME:-20s}"
FUZZ_WORKERS="${RELAY_TEST_FUZZ_WORKERS:-1}"
GO_P="${RELAY_TEST_GO_P:-1}"
GO_TIMEOUT="${RELAY_TEST_TIMEOUT:-15m}"
# A test that finds no service or no helm fails instead of skipping.
export RELAY_TEST_REQUIRE_SERVICES=1

T_START=$SECONDS
WORK="$(mktemp -d "${TMPDIR:-/tmp}/relay-test.XXXXXX")"
# One line per finished step, appended by either lane.
SUMMARY="$WORK/summary"
: >"$SUMMARY"
OTHERS_LOG="$WORK/others.log"
OTHERS_PID=""

# Every Go module of the repository, the relay's (.) first.
mapfile -t MODULES < <(find . -name .git -prune -o -name go.mod -printf '%h\n' | sort)

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
		printf '%-56s ok      %4ds\n' "$name" "$dt" >>"$SUMMARY"
	else
		printf '%-56s FAILED  %4ds (exit %d)\n' "$name" "$dt" "$rc" >>"$SUMMARY"
	fi
	echo "--- $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in ${dt}s"
	return "$rc"
}

failed() { grep -q ' FAILED ' "$SUMMARY"; }

print_summary() {
	banner "summary"
	sed 's/^/  /' "$SUMMARY"
	echo "  total $((SECONDS - T_START))s"
}

cleanup() {
	local rc=$?
	if [ -n "$OTHERS_PID" ] && kill -0 "$OTHERS_PID" 2>/dev/null; then
		pkill -TERM -P "$OTHERS_PID" 2>/dev/null
		kill -TERM "$OTHERS_PID" 2>/dev/null
	fi
	banner "stopping services"
	bash "$REPO/scripts/kafka.sh" stop || true
	bash "$REPO/scripts/pg.sh" stop || true
	rm -rf "$WORK"
	exit "$rc"
}
trap cleanup EXIT
trap 'echo "scripts/test.sh: interrupted" >&2; exit 130' INT TERM

# in_modules CMD...: run CMD in every module's directory; fails if any fails.
in_modules() {
	local m rc=0
	for m in "${MODULES[@]}"; do
		(cd "$m" && "$@") || rc=1
	done
	return "$rc"
}

start_services() {
	bash scripts/kafka.sh fetch || return 1
	if [ "${RELAY_TEST_KEEP_STATE:-}" != 1 ]; then
		bash scripts/kafka.sh wipe && bash scripts/pg.sh wipe || return 1
	fi
	bash scripts/pg.sh start >/dev/null || return 1
	bash scripts/kafka.sh start >/dev/null || return 1
}

# The services' settings for the tests, once they run.
export_services_env() {
	eval "$(bash scripts/pg.sh env)"
	eval "$(bash scripts/kafka.sh env)"
	export RELAY_TEST_DATABASE_URL RELAY_TEST_KAFKA_BROKERS RELAY_TEST_PG_SCRIPT RELAY_TEST_KAFKA_SCRIPT
	env | grep '^RELAY_TEST_' | sort
}

# Build every test binary with -race at full parallelism (-exec /bin/true:
# nothing runs), so that the lanes only link and run. Output is shown on
# failure only; go test would print the same errors again anyway.
compile_tests() {
	local out rc
	out="$(in_modules go test -race -count=1 -run '^$' -exec /bin/true ./... 2>&1)"
	rc=$?
	[ "$rc" -eq 0 ] || echo "$out" | grep -vE '^(ok|\?) ' | head -100
	return "$rc"
}

# The relay's packages with tests, "S importpath" when their tests use the
# services (the test binary depends on internal/testenv), else "F importpath".
classify_packages() {
	go list -test -f '{{if eq .Name "main"}}{{.ImportPath}} {{join .Deps " "}}{{end}}' ./... |
		awk '$1 ~ /\.test$/ {
			s = "F"; for (i = 2; i <= NF; i++) if ($i ~ /\/internal\/testenv$/) s = "S"
			print s, substr($1, 1, length($1) - 5)
		}'
}

# go_test_race CLASS: go test -race the relay's packages of that class.
go_test_race() {
	local class="$1" pkgs
	pkgs="$(classify_packages | awk -v c="$class" '$1 == c { print $2 }')" || return 1
	[ -n "$pkgs" ] || { echo "no packages"; return 0; }
	# shellcheck disable=SC2086
	go test -race -count=1 -p "$GO_P" -timeout "$GO_TIMEOUT" $pkgs
}

# go test -race in the tool modules: all but the relay's (.) and deploy/helm,
# whose test needs helm and runs in scripts/helm-check.sh.
go_test_tool_modules() {
	local m rc=0
	for m in "${MODULES[@]}"; do
		case "$m" in . | ./deploy/helm) continue ;; esac
		echo "-- $m"
		(cd "$m" && go test -race -count=1 -timeout "$GO_TIMEOUT" ./...) || rc=1
	done
	return "$rc"
}

# Fuzz targets: "dir FuzzName" per line (dir: the package's directory; go test
# -fuzz runs within the package's module). Read from the test files, not with
# go test -list, which would build every such package once more.
list_fuzz_targets() {
	local dir
	in_modules go list -f '{{.Dir}}' ./... 2>/dev/null | while read -r dir; do
		sed -nE 's/^func (Fuzz[A-Za-z0-9_]*)\(.*\*testing\.F\).*/\1/p' "$dir"/*_test.go 2>/dev/null |
			sed "s#^#$dir #"
	done
}

fuzz_all() {
	local targets n=0 fails=0 dir name
	targets="$(list_fuzz_targets)"
	if [ -z "$targets" ]; then
		echo "no fuzz targets found"
		return 0
	fi
	echo "$targets" | sed "s#$REPO/##; s/^/  /"
	while read -r dir name; do
		[ -n "$name" ] || continue
		n=$((n + 1))
		local t0=$SECONDS
		echo "--- fuzz ${dir#"$REPO"/} $name ($FUZZTIME, workers: $FUZZ_WORKERS)"
		if (cd "$dir" && go test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" -parallel "$FUZZ_WORKERS" .); then
			echo "--- fuzz $name ok in $((SECONDS - t0))s"
		else
			echo "--- fuzz $name FAILED in $((SECONDS - t0))s (a failing input is saved under the package's testdata/fuzz/$name)"
			fails=$((fails + 1))
		fi
	done <<<"$targets"
	echo "fuzz targets: $((n - fails)) ok, $fails failing"
	[ "$fails" -eq 0 ]
}

# helm for scripts/helm-check.sh (built with go install the first time).
install_helm() {
	local helm
	helm="$(bash scripts/helm-check.sh install | tail -n 1)" || return 1
	[ -x "$helm" ] || { echo "scripts/helm-check.sh install printed no helm path" >&2; return 1; }
	export RELAY_HELM="$helm"
	echo "RELAY_HELM=$RELAY_HELM"
}

# The lane beside the services' tests: nothing in it uses the services.
others_lane() {
	step "go vet ./... (${MODULES[*]})" in_modules go vet ./...
	step "go test -race: the relay's packages without services" go_test_race F
	step "go test -race: tool modules" go_test_tool_modules
	step "fuzz (each target $FUZZTIME, workers: $FUZZ_WORKERS)" fuzz_all
	if [ -f scripts/helm-check.sh ]; then
		step "helm (scripts/helm-check.sh install)" install_helm &&
			step "scripts/helm-check.sh" bash scripts/helm-check.sh
	fi
}

banner "environment"
go version
echo "repo $REPO, CI=${CI:-}, $(nproc) cores, modules: ${MODULES[*]}"

# 1. Services start (mostly waiting) while the test binaries compile.
step "fetch and start PostgreSQL and Kafka" start_services >"$WORK/services.log" 2>&1 &
SERVICES_PID=$!
step "compile tests with -race (${MODULES[*]})" compile_tests
wait "$SERVICES_PID"
SERVICES_RC=$?
cat "$WORK/services.log"

# 2. The two lanes.
echo "the other lane (vet, tests without services, fuzz, helm) runs meanwhile; its log: $OTHERS_LOG"
others_lane >"$OTHERS_LOG" 2>&1 &
OTHERS_PID=$!
if [ "$SERVICES_RC" -eq 0 ]; then
	export_services_env
	step "go test -race: the relay's packages using the services (-p $GO_P)" go_test_race S
else
	echo "scripts/test.sh: services did not start; their packages are not tested" >&2
fi
banner "waiting for the other lane"
wait "$OTHERS_PID"
OTHERS_PID=""
cat "$OTHERS_LOG"

print_summary
if failed; then
	echo "scripts/test.sh: FAILED" >&2
	exit 1
fi
echo "scripts/test.sh: all steps passed"
