#!/usr/bin/env bash
# The whole test suite (make test, and CI through .ci/run), over every Go
# module of the repository: the relay's (the root), tools/relay-load and
# deploy/helm (each directory with a go.mod).
#
# Most of the time goes to the tests of the relay's packages that use the
# real PostgreSQL and Kafka (they import internal/testenv). They wait far
# more than they compute, and fault tests among them stop and start the
# services, so a package must have its services to itself. Hence three
# lanes at once, each step timed and listed in the summary:
#   services 1  cmd/relay's end-to-end tests (about 3/4 of the services'
#               test time) on PostgreSQL and Kafka as scripts/pg.sh and
#               scripts/kafka.sh are set (RELAY_TEST_STATE, ports)
#   services 2  the relay's other packages using services, one at a time,
#               on a second PostgreSQL and Kafka (ports below); among them
#               internal/browsertest, whose tests also drive Chromium
#   others      from the start, niced: helm (built with go install the
#               first time); a run of every fuzz target, one at a time;
#               go vet -race ./... of every module; go test -race of every
#               other package (the relay's packages without services, the
#               tool modules); scripts/helm-check.sh, which runs deploy/helm's
#               test with -race
# Before the services lanes, Chromium is installed if absent (for the
# browser tests, scripts/chromium.sh) and both sets of services are fetched,
# wiped and started while their test binaries compile with -race; on exit the
# services are stopped whatever happens. The lanes "services 2" and "others" write to
# log files, named when they start and printed when they end.
# Every step runs even after an earlier one failed; the exit status is
# non-zero when any failed.
#
# Settings (environment):
#   RELAY_TEST_FUZZTIME       per fuzz target (20s)
#   RELAY_TEST_FUZZ_WORKERS   go test -parallel of the fuzzing: worker
#                             processes (1, so that one core is left to the
#                             services lanes; 20 s of one worker is the work
#                             of the 10 s of two that fuzzing alone had)
#   RELAY_TEST_GO_P           go test -p of the services lanes (1, because
#                             fault tests stop and start the services)
#   RELAY_TEST_TIMEOUT        go test -timeout (15m)
#   RELAY_TEST_KEEP_STATE     1: keep the services' previous data instead of
#                             starting from empty ones
#   RELAY_TEST_PG_PORT_2, RELAY_TEST_KAFKA_PORT_2,
#   RELAY_TEST_KAFKA_CONTROLLER_PORT_2
#                             the second set's ports (those of the first + 1,
#                             + 2, + 2); its state is in $RELAY_TEST_STATE/second
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
# One line per finished step, appended by any lane.
SUMMARY="$WORK/summary"
: >"$SUMMARY"
BG_PIDS=()

# The second set of services: the first one's settings, moved (the numbers
# are scripts/pg.sh's and scripts/kafka.sh's defaults).
STATE_1="${RELAY_TEST_STATE:-/tmp/relay-test}"
SET_2=(
	RELAY_TEST_STATE="$STATE_1/second"
	RELAY_TEST_PG_PORT="${RELAY_TEST_PG_PORT_2:-$((${RELAY_TEST_PG_PORT:-25432} + 1))}"
	RELAY_TEST_KAFKA_PORT="${RELAY_TEST_KAFKA_PORT_2:-$((${RELAY_TEST_KAFKA_PORT:-29092} + 2))}"
	RELAY_TEST_KAFKA_CONTROLLER_PORT="${RELAY_TEST_KAFKA_CONTROLLER_PORT_2:-$((${RELAY_TEST_KAFKA_CONTROLLER_PORT:-29093} + 2))}"
)
# Packages that get the first set to themselves: cmd/relay's end-to-end
# tests take about 3/4 of the services' test time.
OWN_SET_PACKAGES=" github.com/decnet/identity-relay/cmd/relay "

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
	local rc=$? pid
	# Lanes still running (interrupted): end them and what they started.
	for pid in "${BG_PIDS[@]}"; do
		kill -0 "$pid" 2>/dev/null || continue
		pkill -TERM -P "$pid" 2>/dev/null
		kill -TERM "$pid" 2>/dev/null
	done
	banner "stopping services"
	bash "$REPO/scripts/kafka.sh" stop || true
	bash "$REPO/scripts/pg.sh" stop || true
	env "${SET_2[@]}" bash "$REPO/scripts/kafka.sh" stop || true
	env "${SET_2[@]}" bash "$REPO/scripts/pg.sh" stop || true
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
	eval "$(bash scripts/chromium.sh env)"
	export RELAY_TEST_DATABASE_URL RELAY_TEST_KAFKA_BROKERS RELAY_TEST_PG_SCRIPT RELAY_TEST_KAFKA_SCRIPT RELAY_TEST_CHROMIUM
	env | grep '^RELAY_TEST_' | sort
}

# Build the services lanes' test binaries with -race at full parallelism
# (-exec /bin/true: nothing runs), where go test -p 1 would compile one
# package at a time. Output is shown on failure only; go test would print the
# same errors again anyway.
compile_tests() {
	local out rc
	# shellcheck disable=SC2046
	out="$(go test -race -count=1 -run '^$' -exec /bin/true $(packages S1 S2) 2>&1)"
	rc=$?
	[ "$rc" -eq 0 ] || echo "$out" | grep -vE '^(ok|\?) ' | head -100
	return "$rc"
}

# packages LANE...: the relay's packages with tests of those lanes: S1 (on
# the first set of services: OWN_SET_PACKAGES), S2 (the others whose test
# binary depends on internal/testenv: on the second set), F (no services).
packages() {
	go list -test -f '{{if eq .Name "main"}}{{.ImportPath}} {{join .Deps " "}}{{end}}' ./... |
		awk -v own="$OWN_SET_PACKAGES" -v want=" $* " '$1 ~ /\.test$/ {
			pkg = substr($1, 1, length($1) - 5)
			lane = "F"
			for (i = 2; i <= NF; i++) if ($i ~ /\/internal\/testenv$/) lane = "S2"
			if (lane == "S2" && index(own, " " pkg " ")) lane = "S1"
			if (index(want, " " lane " ")) print pkg
		}'
}

# go_test_race LANE: go test -race the relay's packages of that lane.
go_test_race() {
	local pkgs
	pkgs="$(packages "$1")" || return 1
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
		local found="$dir/testdata/fuzz/$name" before after out="$WORK/fuzz-$name.log"
		before="$(ls "$found" 2>/dev/null | wc -l)"
		if (cd "$dir" && go test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" -parallel "$FUZZ_WORKERS" .) 2>&1 | tee "$out"; then
			echo "--- fuzz $name ok in $((SECONDS - t0))s"
			continue
		fi
		after="$(ls "$found" 2>/dev/null | wc -l)"
		# Go 1.26's fuzzing coordinator can fail a target with a bare
		# "context deadline exceeded" when -fuzztime ends while a starved
		# worker is mid-call (golang/go#75804, fixed in Go 1.27): no input
		# failed and none is written. Only a written input is a finding.
		if [ "$after" -eq "$before" ] && grep -qx '    context deadline exceeded' "$out"; then
			echo "--- fuzz $name ok in $((SECONDS - t0))s (its end hit golang/go#75804; no failing input)"
			continue
		fi
		echo "--- fuzz $name FAILED in $((SECONDS - t0))s (a failing input is saved under the package's testdata/fuzz/$name)"
		fails=$((fails + 1))
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

# The second services lane, on the second set.
services_2_lane() {
	export "${SET_2[@]}"
	export_services_env
	step "go test -race: other packages using services (second set, -p $GO_P)" go_test_race S2
}

# The lane beside the services' tests: nothing in it uses the services. It
# runs from the start at a lower priority: the services lanes (their compile,
# then their tests, which wait on timers) get a core when they need one, and
# this lane the rest. First what shares no compiled package with the -race
# build of the services lanes (helm, fuzzing: their own builds), so that two
# go commands do not compile the same package at once; then the -race work.
others_lane() {
	local helm_ok=0
	renice -n 10 -p "$BASHPID" >/dev/null
	if [ -f scripts/helm-check.sh ]; then
		step "helm (scripts/helm-check.sh install)" install_helm && helm_ok=1
	fi
	step "fuzz (each target $FUZZTIME, workers: $FUZZ_WORKERS)" fuzz_all
	# -race: vet reads the packages the tests compiled instead of compiling
	# every one once more without it (no file of ours depends on the race tag).
	step "go vet -race ./... (${MODULES[*]})" in_modules go vet -race ./...
	step "go test -race: the relay's packages without services" go_test_race F
	step "go test -race: tool modules" go_test_tool_modules
	[ "$helm_ok" = 1 ] && step "scripts/helm-check.sh" bash scripts/helm-check.sh
}

banner "environment"
go version
echo "repo $REPO, CI=${CI:-}, $(nproc) cores, modules: ${MODULES[*]}"

# start_all_services: install Chromium and fetch Kafka once (one apt-get at
# a time), then start both sets at once; each set's exit status goes to
# $WORK/set-N.rc, its output to $WORK/set-N.log. Without Chromium the browser
# tests fail; the other tests still run.
start_all_services() {
	step "install Chromium if absent (scripts/chromium.sh)" bash scripts/chromium.sh install
	if ! step "fetch Apache Kafka (cached after the first run)" bash scripts/kafka.sh fetch; then
		echo 1 >"$WORK/set-1.rc"
		echo 1 >"$WORK/set-2.rc"
		return
	fi
	(step "start PostgreSQL and Kafka" start_services >"$WORK/set-1.log" 2>&1; echo $? >"$WORK/set-1.rc") &
	(export "${SET_2[@]}" && step "start the second PostgreSQL and Kafka" start_services >"$WORK/set-2.log" 2>&1; echo $? >"$WORK/set-2.rc")
	wait
}

lane() { # lane NAME FUNCTION: start FUNCTION in the background, output to a log
	echo "lane $1 runs meanwhile; its log: $WORK/$1.log"
	"$2" >"$WORK/$1.log" 2>&1 &
	BG_PIDS+=($!)
}

lane others others_lane

# 1. Both sets of services start (mostly waiting) while the services lanes'
# test binaries compile.
start_all_services >"$WORK/fetch.log" 2>&1 &
SERVICES_PID=$!
BG_PIDS+=("$SERVICES_PID")
step "compile the services lanes' tests with -race" compile_tests
wait "$SERVICES_PID"
cat "$WORK/fetch.log" "$WORK"/set-[12].log 2>/dev/null
SERVICES_1_RC="$(cat "$WORK/set-1.rc")"
SERVICES_2_RC="$(cat "$WORK/set-2.rc")"

# 2. The services lanes.
if [ "$SERVICES_2_RC" -eq 0 ]; then
	lane services-2 services_2_lane
else
	echo "scripts/test.sh: the second services did not start; their packages are not tested" >&2
fi
if [ "$SERVICES_1_RC" -eq 0 ]; then
	export_services_env
	step "go test -race: cmd/relay (first set, -p $GO_P)" go_test_race S1
else
	echo "scripts/test.sh: services did not start; their packages are not tested" >&2
fi
banner "waiting for the other lanes"
wait
BG_PIDS=()
for f in services-2 others; do
	[ -f "$WORK/$f.log" ] && { banner "lane $f"; cat "$WORK/$f.log"; }
done

print_summary
if failed; then
	echo "scripts/test.sh: FAILED" >&2
	exit 1
fi
echo "scripts/test.sh: all steps passed"
