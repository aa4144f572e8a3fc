#!/usr/bin/env bash
# Load benchmarks of the relay: the six standard scenarios, each against a
# freshly started relay process (built with go build -o), with viewers and
# a producer from relay-load (tools/relay-load, a module of its own).
#
#   scripts/bench.sh [--kfake] [--peers | --targets LIST] [--only 1,3,5] [--runs N] [--out DIR]
#
#   1  1,000 viewers, 400 events/s: latency p50/p99
#   2  1,000 viewers, 1,000 events/s: keeps up?, p99, relay CPU-s per million frames
#   3  burst of 20,000 events to 1,000 viewers: frames/s
#      (3a with the relay's defaults; 3b with RELAY_SUBSCRIBER_BUFFER large
#      enough to hold the burst, so that the figure is throughput, not drops)
#   4  9,000 idle viewers: relay RSS per viewer, keepalives on time
#      (RELAY_SSE_KEEPALIVE=5s)
#   5  100 of 1,000 viewers stalled, 100 events/s of 4 KiB: readers' p99
#      against the same run with none stalled (5b); when each stalled viewer
#      was cut; relay RSS over time
#   6  light load: 10 and 100 events/s to 100 viewers (6a, 6b) and to 1,000
#      (6c, 6d): latency p50/p99 (what an event costs when nothing else is
#      waiting)
#
# With --peers every scenario runs, right after the relay, against the two
# peers of issue #13, so that drift on this shared machine hits all alike
# (relay, minimal, centrifugo, relay, ...; their figures are labelled
# "-minimal" and "-centrifugo"):
#   minimal     the minimal Go SSE server kept beside the load tool
#               (tools/relay-load/minimal: one franz-go consumer, a channel
#               per viewer, a write per event, a flush when the channel is
#               empty), with the relay's queue length and keepalive;
#   centrifugo  Centrifugo v6.9.1 (go install into BENCH_CENTRIFUGO's
#               directory on first use, about 2 minutes), from a config file
#               the script writes per scenario into a temporary directory: its
#               Kafka consumer (publication data mode: each record's value is
#               published as is to the channel its centrifugo-channels header
#               names, which relay-load --protocol centrifugo adds) reading the
#               scenario's topic, its uni_sse transport, HS256 tokens with the
#               run's secret (the tool mints them with a channels claim: a
#               server-side subscription), pings every keepalive, and with
#               RELAY_SUBSCRIBER_BUFFER=N a client queue of N KiB (default 1 MiB,
#               about 2,500 frames of this payload); usage stats off (it would
#               send them off the machine after a day).
# --targets LIST runs only the listed ones of relay,minimal,centrifugo, in
# that order (--peers is --targets relay,minimal,centrifugo).
#
# The broker is a real single-node Kafka from scripts/kafka.sh (default), or
# with --kfake franz-go's in-process kfake served by relay-load --kfake.
# PostgreSQL comes from scripts/pg.sh; the script inserts the bench user.
# Each scenario has its own topic, deleted at its end, so that every relay
# starts with an empty replay window (its RSS before viewers is a baseline).
# With --runs N (BENCHMARKS.md uses 3) every selected scenario runs N times,
# each time against a fresh relay, and the recap gives the median and range
# of each figure (relay-load --median). Each scenario prints its figures and
# the exact commands used; everything
# (tables, JSON reports, relay logs, perf profiles) is kept in the output
# directory. The services are left running for the next run; stop them with
#   RELAY_TEST_STATE=... scripts/kafka.sh stop; RELAY_TEST_STATE=... scripts/pg.sh stop
#
# Settings (environment):
#   RELAY_TEST_STATE                 state root of Kafka and PostgreSQL (/tmp/relay-bench)
#   RELAY_TEST_KAFKA_PORT            broker port, also kfake's (61192)
#   RELAY_TEST_KAFKA_CONTROLLER_PORT controller port (61193)
#   RELAY_TEST_PG_PORT               PostgreSQL port (61435)
#   BENCH_RELAY_PORT                 the relay's port (61180)
#   BENCH_DURATION                   measured interval of rate and idle runs (60s)
#   BENCH_WARMUP                     unmeasured start of rate runs (10s)
#   BENCH_PERF                       1: perf record the relay during scenarios 2 and 3
#                                    (needs perf; cpu-clock sampling, call graphs)
#   BENCH_EXTRA                      extra flags for every relay-load run
#   BENCH_PROBE                      N: in the rate runs of the minimal server, N more viewers
#                                    read by tools/relay-load/probe, the calibration's second
#                                    measurement (BENCHMARKS.md), over the records the tool
#                                    measures (chosen by seq); its line follows the tool's report
#   BENCH_RELAY_ENV                  extra settings for every relay, e.g. "RELAY_SSE_KEEPALIVE=5s"
#                                    (RELAY_SUBSCRIBER_BUFFER and RELAY_SSE_KEEPALIVE also reach the peers)
#   BENCH_SERVER_CPUS                CPUs (taskset list, e.g. 1) for the relay or peer under test
#   BENCH_TOOL_CPUS                  CPUs for relay-load and kfake (e.g. 0): with both set the
#                                    tool does not share cores with the server (other work may)
#   BENCH_CENTRIFUGO                 the Centrifugo binary (~/.cache/relay-bench/bin/centrifugo;
#                                    installed there with go install when absent)
#
# The machine should be quiet: the tool and the relay share its cores, and
# every figure moves with whatever else runs. The script prints the load
# average and the busiest other processes before each scenario.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"

# Ports above Linux's default ephemeral range (32768-60999): the relay is
# started again for every run, and a port in that range can be held by any
# connection's TIME_WAIT (bind: address already in use).
export RELAY_TEST_STATE="${RELAY_TEST_STATE:-/tmp/relay-bench}"
export RELAY_TEST_KAFKA_PORT="${RELAY_TEST_KAFKA_PORT:-61192}"
export RELAY_TEST_KAFKA_CONTROLLER_PORT="${RELAY_TEST_KAFKA_CONTROLLER_PORT:-61193}"
export RELAY_TEST_PG_PORT="${RELAY_TEST_PG_PORT:-61435}"
RELAY_PORT="${BENCH_RELAY_PORT:-61180}"
DURATION="${BENCH_DURATION:-60s}"
WARMUP="${BENCH_WARMUP:-10s}"
PERF="${BENCH_PERF:-0}"
EXTRA="${BENCH_EXTRA:-}"
SERVER_PIN=() TOOL_PIN=()
[ -n "${BENCH_SERVER_CPUS:-}" ] && SERVER_PIN=(taskset -c "$BENCH_SERVER_CPUS")
[ -n "${BENCH_TOOL_CPUS:-}" ] && TOOL_PIN=(taskset -c "$BENCH_TOOL_CPUS")

BROKER_MODE=kafka
ONLY="1,2,3,4,5,6"
TARGETS=relay
RUNS=1
OUT=""
while [ $# -gt 0 ]; do
	case "$1" in
	--kfake) BROKER_MODE=kfake ;;
	--peers) TARGETS=relay,minimal,centrifugo ;;
	--targets) TARGETS="$2"; shift ;;
	--only) ONLY="$2"; shift ;;
	--runs) RUNS="$2"; shift ;;
	--out) OUT="$2"; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
	esac
	shift
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
targeted() { [[ ",$TARGETS," == *",$1,"* ]]; }
secs() { # a duration of the form 20s or 2m, in seconds
	case "$1" in
	*[0-9]s) echo "${1%s}" ;;
	*[0-9]m) echo $((${1%m} * 60)) ;;
	*) die "BENCH_PROBE wants durations like 20s or 2m, not $1" ;;
	esac
}
log() { echo "bench.sh: $*" >&2; }
die() { echo "bench.sh: $*" >&2; exit 1; }
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive integer, not $RUNS"
[[ ",$TARGETS," =~ ^(,(relay|minimal|centrifugo))+,$ ]] || die "--targets wants a comma list of relay, minimal, centrifugo, not $TARGETS"
CENTRIFUGO="${BENCH_CENTRIFUGO:-$HOME/.cache/relay-bench/bin/centrifugo}"
CENTRIFUGO_VERSION=v6.9.1

OUT="${OUT:-$RELAY_TEST_STATE/bench-$(date -u +%Y%m%dT%H%M%SZ)}"
BIN="$RELAY_TEST_STATE/bench-bin"
mkdir -p "$OUT" "$BIN"
SECRET="bench-secret-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
USER_ID="bench-viewer"
RELAY_URL="http://127.0.0.1:$RELAY_PORT"
RUN_TAG="$(date -u +%H%M%S)"

RELAY_PID=""
KFAKE_PID=""
CF_DIR="$(mktemp -d)" # Centrifugo's config files: they hold the secret
cleanup() {
	rm -rf "$CF_DIR"
	[ -n "$RELAY_PID" ] && kill -TERM "$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null || true
	[ -n "$KFAKE_PID" ] && kill -TERM "$KFAKE_PID" 2>/dev/null && wait "$KFAKE_PID" 2>/dev/null || true
}
trap cleanup EXIT

# --- build -----------------------------------------------------------------
log "building the relay and relay-load into $BIN"
(cd "$REPO" && go build -o "$BIN/relay" ./cmd/relay && go -C tools/relay-load build -o "$BIN/relay-load" . &&
	go -C tools/relay-load build -o "$BIN/minimal" ./minimal && go -C tools/relay-load build -o "$BIN/probe" ./probe)
# go install sets no version string; the build info names the module's.
centrifugo_ok() { go version -m "$CENTRIFUGO" 2>/dev/null | grep -Eq "^[[:space:]]+mod[[:space:]]+github.com/centrifugal/centrifugo/v6[[:space:]]+$CENTRIFUGO_VERSION[[:space:]]"; }
if targeted centrifugo && ! centrifugo_ok; then
	log "installing Centrifugo $CENTRIFUGO_VERSION into $(dirname "$CENTRIFUGO") (about 2 minutes)"
	(cd /tmp && GOBIN="$(dirname "$CENTRIFUGO")" go install "github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION")
	centrifugo_ok || die "$CENTRIFUGO is not Centrifugo $CENTRIFUGO_VERSION"
fi

# --- PostgreSQL ------------------------------------------------------------
DB_URL="$(bash "$SCRIPT_DIR/pg.sh" start)"
psql -X -q -v ON_ERROR_STOP=1 "$DB_URL" \
	-c "INSERT INTO users (uuid, username, role) VALUES ('$USER_ID', '$USER_ID', 'viewer') ON CONFLICT (uuid) DO UPDATE SET role = 'viewer', must_change_password = false, tokens_valid_from = NULL" >/dev/null

# --- broker ----------------------------------------------------------------
if [ "$BROKER_MODE" = kafka ]; then
	BROKERS="$(bash "$SCRIPT_DIR/kafka.sh" start)"
else
	"${TOOL_PIN[@]}" "$BIN/relay-load" --kfake --kfake-port "$RELAY_TEST_KAFKA_PORT" --kfake-for 6h >"$OUT/kfake.addr" 2>"$OUT/kfake.log" &
	KFAKE_PID=$!
	for _ in $(seq 50); do [ -s "$OUT/kfake.addr" ] && break; sleep 0.1; done
	BROKERS="$(head -n1 "$OUT/kfake.addr")"
	[ -n "$BROKERS" ] || die "kfake did not start (see $OUT/kfake.log)"
fi
log "broker ($BROKER_MODE) at $BROKERS; PostgreSQL at 127.0.0.1:$RELAY_TEST_PG_PORT; output in $OUT"

# --- one scenario ------------------------------------------------------------
# scenario NAME "RELAY_VAR=value ..." relay-load flags...: one run against
# each target, in the order relay, minimal, centrifugo.
scenario() {
	local t
	for t in relay minimal centrifugo; do
		if targeted "$t"; then TARGET=$t run_scenario "$@"; fi
	done
}

# centrifugo_config TOPIC BUFFER KEEPALIVE: Centrifugo's config for one run.
centrifugo_config() {
	local queue=""
	[ -n "$2" ] && queue="\"queue_max_size\": $(($2 * 1024)),"
	cat <<-EOF
		{
		  "http_server": {"address": "127.0.0.1", "port": $RELAY_PORT},
		  "log": {"level": "info"},
		  "health": {"enabled": true},
		  "usage_stats": {"disabled": true},
		  "uni_sse": {"enabled": true},
		  "client": {$queue "token": {"hmac_secret_key": "$SECRET"}, "ping_interval": "$3", "pong_timeout": "1s"},
		  "consumers": [{"name": "bench", "enabled": true, "type": "kafka", "kafka": {
		    "brokers": ["${BROKERS//,/\",\"}"], "topics": ["$1"], "consumer_group": "bench-$1",
		    "publication_data_mode": {"enabled": true, "channels_header": "centrifugo-channels"}}}]
		}
	EOF
}

run_scenario() {
	local name="$1$RUN_SUFFIX" relay_env="$2" protocol=relay ready=readyz
	[ "$TARGET" != relay ] && name="$1-$TARGET$RUN_SUFFIX"
	shift 2
	local topic="identity.bench-$name-$RUN_TAG"
	local env=(
		RELAY_LISTEN_ADDR="127.0.0.1:$RELAY_PORT"
		RELAY_KAFKA_BROKERS="$BROKERS"
		RELAY_DATABASE_URL="$DB_URL"
		RELAY_JWT_SECRET="$SECRET"
		RELAY_SSE_MAX_PER_USER=20000
		RELAY_SSE_MAX_CONNECTIONS=20000
		RELAY_LOG_LEVEL=info
	)
	# shellcheck disable=SC2206
	[ -n "$relay_env" ] && env+=($relay_env)
	# shellcheck disable=SC2206
	[ -n "${BENCH_RELAY_ENV:-}" ] && env+=($BENCH_RELAY_ENV)

	echo
	echo "################ scenario $name ################"
	echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); busiest other processes:"
	ps -eo pcpu,comm --sort=-pcpu | sed -n '2,6p' | sed 's/^/    /'

	# The peers get the relay's queue and keepalive of this scenario.
	local buffer="" keepalive=15s kv
	for kv in $relay_env ${BENCH_RELAY_ENV:-}; do
		case "$kv" in
		RELAY_SUBSCRIBER_BUFFER=*) buffer="${kv#*=}" ;;
		RELAY_SSE_KEEPALIVE=*) keepalive="${kv#*=}" ;;
		esac
	done
	case "$TARGET" in
	minimal)
		"${SERVER_PIN[@]}" "$BIN/minimal" --listen "127.0.0.1:$RELAY_PORT" --brokers "$BROKERS" --buffer "${buffer:-256}" --keepalive "$keepalive" >"$OUT/relay-$name.log" 2>&1 &
		;;
	centrifugo)
		protocol=centrifugo ready=health
		centrifugo_config "$topic" "$buffer" "$keepalive" >"$CF_DIR/$name.json"
		"${SERVER_PIN[@]}" "$CENTRIFUGO" --config "$CF_DIR/$name.json" >"$OUT/relay-$name.log" 2>&1 &
		;;
	*)
		"${SERVER_PIN[@]}" env -i PATH="$PATH" HOME="$HOME" "${env[@]}" "$BIN/relay" >"$OUT/relay-$name.log" 2>&1 &
		;;
	esac
	RELAY_PID=$!
	local ok=""
	for _ in $(seq 200); do
		if curl -fsS "$RELAY_URL/$ready" >/dev/null 2>&1; then ok=1; break; fi
		kill -0 "$RELAY_PID" 2>/dev/null || break
		sleep 0.1
	done
	[ -n "$ok" ] || { tail -n 20 "$OUT/relay-$name.log" >&2; die "relay not ready"; }

	local cmd=("${TOOL_PIN[@]}" "$BIN/relay-load" --url "$RELAY_URL" --user "$USER_ID"
		--brokers "$BROKERS" --topic "$topic" --relay-pid "$RELAY_PID" --label "scenario $name"
		--json-out "$OUT/s$name.json" --delete-topic --protocol "$protocol" "$@")
	# shellcheck disable=SC2206
	[ -n "$EXTRA" ] && cmd+=($EXTRA)

	case "$TARGET" in
	relay) echo "relay:     env $(printf '%s ' "${env[@]}" | sed "s/$SECRET/\$SECRET/g; s#$DB_URL#\$DB_URL#g")$BIN/relay" ;;
	minimal) echo "minimal:   $BIN/minimal --listen 127.0.0.1:$RELAY_PORT --brokers $BROKERS --buffer ${buffer:-256} --keepalive $keepalive" ;;
	centrifugo) echo "centrifugo: $CENTRIFUGO --config (written by centrifugo_config in this script, secret \$SECRET)" ;;
	esac
	echo "command:   RELAY_JWT_SECRET=\$SECRET $(printf '%q ' "${cmd[@]}")"

	local perf_pid=""
	if [ "$PERF" = 1 ] && [[ "$name" == 2* || "$name" == 3* ]] && command -v perf >/dev/null; then
		perf record -e cpu-clock -F 499 -g -p "$RELAY_PID" -o "$OUT/perf-$name.data" >/dev/null 2>&1 &
		perf_pid=$!
	fi
	local probe_pid=""
	if [ -n "${BENCH_PROBE:-}" ] && [ "$TARGET" = minimal ] && [[ " $* " == *" --rate "* ]]; then
		# The records the tool measures, by seq: the tool's 3 partitions
		# take the rate in turn, and its window follows the warm-up.
		local rate="" prev="" a
		for a in "$@"; do [ "$prev" = --rate ] && rate=$a; prev=$a; done
		"$BIN/probe" --url "$RELAY_URL/api/v1/identities/events" --viewers "$BENCH_PROBE" \
			--seq-from "$(awk -v r="$rate" -v w="$(secs "$WARMUP")" 'BEGIN { printf "%d", r * w / 3 }')" \
			--seq-to "$(awk -v r="$rate" -v w="$(secs "$WARMUP")" -v d="$(secs "$DURATION")" 'BEGIN { printf "%d", r * (w + d) / 3 }')" \
			>"$OUT/probe-$name.txt" 2>&1 &
		probe_pid=$!
	fi
	local rc=0
	RELAY_JWT_SECRET="$SECRET" "${cmd[@]}" >"$OUT/s$name.txt" 2>"$OUT/s$name.progress" || rc=$?
	if [ -n "$probe_pid" ]; then
		kill -TERM "$probe_pid" 2>/dev/null || true
		wait "$probe_pid" || true
		cat "$OUT/probe-$name.txt" >>"$OUT/s$name.txt"
	fi
	if [ -n "$perf_pid" ]; then
		kill -INT "$perf_pid" 2>/dev/null || true
		wait "$perf_pid" 2>/dev/null || true
		perf report -i "$OUT/perf-$name.data" --stdio --no-children -g none --sort symbol 2>/dev/null |
			grep -v '^#' | grep -v '^$' | head -n 40 >"$OUT/perf-$name.txt" || true
		echo "perf:      flat profile of the relay (top 40 symbols) in $OUT/perf-$name.txt"
	fi
	cat "$OUT/s$name.txt"
	[ $rc -eq 0 ] || { echo "relay-load exited with $rc:"; tail -n 5 "$OUT/s$name.progress"; }
	echo "relay:     $(grep -ci '"level":"warn"' "$OUT/relay-$name.log" || true) warnings, $(grep -ci '"level":"error"' "$OUT/relay-$name.log" || true) errors in its log"
	# The relay's own counts: why viewers left, frames it queued.
	curl -fsS "$RELAY_URL/metrics" >"$OUT/metrics-$name.txt" 2>/dev/null || true
	echo "relay:     $(grep -E '^relay_(viewer_disconnects_total|events_published_total|frames_delivered_total)' "$OUT/metrics-$name.txt" | tr '\n' ' ')"

	kill -TERM "$RELAY_PID" 2>/dev/null || true
	wait "$RELAY_PID" 2>/dev/null || true
	RELAY_PID=""
	sleep 2 # let the closed connections leave the tables
}

for run in $(seq "$RUNS"); do
	RUN_SUFFIX=""
	[ "$RUNS" -gt 1 ] && RUN_SUFFIX="-r$run"
	want 1 && scenario 1 "" --viewers 1000 --rate 400 --duration "$DURATION" --warmup "$WARMUP"
	want 2 && scenario 2 "" --viewers 1000 --rate 1000 --duration "$DURATION" --warmup "$WARMUP"
	if want 3; then
		# 20 million frames: give the viewers time to receive them all.
		scenario 3a "" --viewers 1000 --burst 20000 --drain 180s
		scenario 3b "RELAY_SUBSCRIBER_BUFFER=20480" --viewers 1000 --burst 20000 --drain 180s
	fi
	want 4 && scenario 4 "RELAY_SSE_KEEPALIVE=5s" --viewers 9000 --duration "$DURATION" --warmup 5s --keepalive 5s
	if want 5; then
		# 4 KiB frames: a 16 KiB read buffer spares the tool a read per frame.
		scenario 5a "" --viewers 1000 --stalled 100 --rate 100 --value-bytes 4096 --read-buffer 16384 --duration "$DURATION" --warmup "$WARMUP"
		scenario 5b "" --viewers 1000 --stalled 0 --rate 100 --value-bytes 4096 --read-buffer 16384 --duration "$DURATION" --warmup "$WARMUP"
	fi
	if want 6; then
		scenario 6a "" --viewers 100 --rate 10 --duration "$DURATION" --warmup "$WARMUP"
		scenario 6b "" --viewers 100 --rate 100 --duration "$DURATION" --warmup "$WARMUP"
		scenario 6c "" --viewers 1000 --rate 10 --duration "$DURATION" --warmup "$WARMUP"
		scenario 6d "" --viewers 1000 --rate 100 --duration "$DURATION" --warmup "$WARMUP"
	fi
done

# --- recap -------------------------------------------------------------------
echo
echo "################ recap ($OUT) ################"
if [ "$RUNS" -gt 1 ]; then
	for f in "$OUT"/s*-r1.json; do
		[ -e "$f" ] || continue
		base="${f%-r1.json}"
		"$BIN/relay-load" --median "$base"-r*.json
	done
	exit 0
fi
for f in "$OUT"/s*.txt; do
	[ -e "$f" ] || continue
	head -n1 "$f"
	grep -E '^  (delivery|latency|relay cpu|relay writes|tool cpu|relay rss|keepalive|stalled|keeps up) ' "$f" || true
done
