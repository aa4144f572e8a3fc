#!/usr/bin/env bash
# Throwaway single-node Apache Kafka (KRaft, broker+controller) for the tests.
#
#   scripts/kafka.sh fetch    download Kafka's jars from Maven Central (cached)
#   scripts/kafka.sh start    fetch, format storage (first time only), start,
#                             wait until the broker answers; idempotent
#   scripts/kafka.sh stop     SIGTERM, wait, then SIGKILL; idempotent
#   scripts/kafka.sh status   exit 0 when the broker is running
#   scripts/kafka.sh env      print the export lines for the Go tests
#   scripts/kafka.sh wipe     stop and delete the broker's state (topics, logs)
#
# stop/start keep the data directory, so a test may stop the broker and start
# it again on the same data (RELAY_TEST_KAFKA_SCRIPT points at this file).
#
# Settings (environment):
#   RELAY_TEST_STATE                 state root      (/tmp/relay-test)
#   RELAY_TEST_KAFKA_PORT            broker port     (29092)
#   RELAY_TEST_KAFKA_CONTROLLER_PORT controller port (29093)
#   RELAY_TEST_KAFKA_HOST            address the broker listens on and
#                                    advertises (127.0.0.1); the controller
#                                    stays on 127.0.0.1
#   RELAY_KAFKA_VERSION              Kafka version   (4.1.2)
#   RELAY_KAFKA_CACHE                jar cache       (${XDG_CACHE_HOME:-$HOME/.cache}/relay-kafka)
#   RELAY_TEST_KAFKA_START_TIMEOUT   seconds to wait for readiness (90)
#   RELAY_TEST_KAFKA_STOP_TIMEOUT    seconds between SIGTERM and SIGKILL (30)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
CONF_DIR="$SCRIPT_DIR/kafka"

KAFKA_VERSION="${RELAY_KAFKA_VERSION:-4.1.2}"
CACHE_ROOT="${RELAY_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/relay-kafka}"
CACHE_DIR="$CACHE_ROOT/$KAFKA_VERSION"
LIBS="$CACHE_DIR/libs"
STATE_ROOT="${RELAY_TEST_STATE:-/tmp/relay-test}"
STATE="$STATE_ROOT/kafka"
PORT="${RELAY_TEST_KAFKA_PORT:-29092}"
CPORT="${RELAY_TEST_KAFKA_CONTROLLER_PORT:-29093}"
START_TIMEOUT="${RELAY_TEST_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${RELAY_TEST_KAFKA_STOP_TIMEOUT:-30}"
PIDFILE="$STATE/kafka.pid"
HOST="${RELAY_TEST_KAFKA_HOST:-127.0.0.1}"
BROKER="$HOST:$PORT"

log() { echo "kafka.sh: $*" >&2; }
die() { echo "kafka.sh: $*" >&2; exit 1; }

# The cache is complete when the marker holds the hash of the pom it was
# fetched with; editing the pom therefore refetches.
pom_hash() { sha256sum "$CONF_DIR/pom.xml" | cut -d' ' -f1; }

ensure_tools() {
	local missing=()
	command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
	command -v mvn >/dev/null 2>&1 || missing+=(maven)
	if [ "${#missing[@]}" -gt 0 ]; then
		log "installing ${missing[*]} with apt-get"
		[ "$(id -u)" = 0 ] || die "need ${missing[*]} (java, mvn); not root, cannot apt-get install"
		export DEBIAN_FRONTEND=noninteractive
		local try
		for try in 1 2; do
			{ apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >&2 && break
			[ "$try" = 2 ] && die "apt-get install ${missing[*]} failed"
			log "apt-get failed; retrying in 5s"
			sleep 5
		done
	fi
}

fetch() {
	if [ -f "$CACHE_DIR/libs.complete" ] && [ "$(cat "$CACHE_DIR/libs.complete")" = "$(pom_hash)" ] &&
		compgen -G "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null; then
		return 0
	fi
	ensure_tools
	mkdir -p "$CACHE_DIR"
	local tmp="$CACHE_DIR/libs.tmp.$$" mvnlog="$CACHE_DIR/fetch.log" t0=$SECONDS
	rm -rf "$tmp"
	log "fetching Apache Kafka $KAFKA_VERSION from Maven Central into $LIBS (log: $mvnlog)"
	if ! mvn -B -ntp -f "$CONF_DIR/pom.xml" \
		-Dkafka.version="$KAFKA_VERSION" -DoutputDirectory="$tmp" \
		org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies >"$mvnlog" 2>&1; then
		rm -rf "$tmp"
		local why
		why="$(grep -m1 -E '^\[ERROR\] ' "$mvnlog" | sed 's/^\[ERROR\] //' | cut -c1-300 || true)"
		echo "kafka.sh: cannot fetch Apache Kafka from Maven Central: ${why:-mvn failed, see $mvnlog}" >&2
		exit 1
	fi
	compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null ||
		die "cannot fetch Apache Kafka from Maven Central: kafka_2.13-$KAFKA_VERSION.jar missing after mvn (see $mvnlog)"
	rm -rf "$LIBS"
	mv "$tmp" "$LIBS"
	pom_hash >"$CACHE_DIR/libs.complete"
	log "fetched $(ls "$LIBS" | wc -l) jars in $((SECONDS - t0))s"
}

# pid of our broker, if it runs; empty otherwise.
running_pid() {
	local pid
	[ -f "$PIDFILE" ] || return 0
	pid="$(cat "$PIDFILE" 2>/dev/null || true)"
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
		tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $STATE/server.properties"; then
		echo "$pid"
	fi
}

port_open() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }

render_config() {
	mkdir -p "$STATE/logs" "$STATE/data"
	sed -e "s#@STATE_DIR@#$STATE#g" -e "s#@HOST@#$HOST#g" -e "s#@BROKER_PORT@#$PORT#g" -e "s#@CONTROLLER_PORT@#$CPORT#g" \
		"$CONF_DIR/server.properties" >"$STATE/server.properties"
	cp "$CONF_DIR/log4j2.properties" "$STATE/log4j2.properties"
}

java_cmd() {
	# Small heap; C1 only for the short-lived tools keeps their start-up fast.
	java -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
		-Dkafka.logs.dir="$STATE/logs" -Dlog4j2.configurationFile="$STATE/log4j2.properties" \
		-cp "$LIBS/*" "$@"
}

format_storage() {
	[ -f "$STATE/data/meta.properties" ] && return 0
	local id
	# A random 16-byte Kafka Uuid in its base64url form. Not one that starts
	# with '-' (1 in 64): the tool would read it as an option and fail, as
	# Kafka's own Uuid.randomUuid avoids it.
	id=-
	while [[ "$id" == -* ]]; do
		id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
	done
	log "formatting storage in $STATE/data (cluster id $id)"
	java_cmd kafka.tools.StorageTool format --ignore-formatted -t "$id" \
		-c "$STATE/server.properties" >"$STATE/logs/format.log" 2>&1 || {
		cat "$STATE/logs/format.log" >&2
		die "storage format failed"
	}
}

# Metadata round trip through the real client protocol.
probe() {
	timeout 30 java -Xmx128m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
		-Dlog4j2.configurationFile="$STATE/log4j2.properties" -Dkafka.logs.dir="$STATE/logs" \
		-cp "$LIBS/*" org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKER" --list \
		>"$STATE/logs/probe.log" 2>&1
}

start() {
	fetch
	local pid
	pid="$(running_pid)"
	if [ -n "$pid" ]; then
		log "already running (pid $pid)"
		echo "$BROKER"
		return 0
	fi
	port_open "$PORT" "$HOST" && die "port $PORT on $HOST is taken by another process; set RELAY_TEST_KAFKA_PORT"
	port_open "$CPORT" && die "port $CPORT on 127.0.0.1 is taken by another process; set RELAY_TEST_KAFKA_CONTROLLER_PORT"
	command -v java >/dev/null 2>&1 || ensure_tools
	render_config
	format_storage
	local t0=$SECONDS out="$STATE/logs/stdout.log" logfile="$STATE/logs/server.log" mark
	mark=$(($(stat -c %s "$logfile" 2>/dev/null || echo 0) + 1))
	# Own session, stdio on files: the caller (a Go test's exec.Cmd, make) does
	# not wait on it and its signals do not reach it.
	setsid java -Xms128m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
		-Dkafka.logs.dir="$STATE/logs" -Dlog4j2.configurationFile="$STATE/log4j2.properties" \
		-cp "$LIBS/*" kafka.Kafka "$STATE/server.properties" \
		</dev/null >>"$out" 2>&1 &
	pid=$!
	echo "$pid" >"$PIDFILE"
	# 1. the broker says it started (it is unfenced by then), 2. a client
	#    gets metadata from it.
	while :; do
		if ! kill -0 "$pid" 2>/dev/null; then
			rm -f "$PIDFILE"
			tail -n 30 "$logfile" "$out" >&2 2>/dev/null || true
			die "broker exited during start-up (logs: $STATE/logs)"
		fi
		if tail -c "+$mark" "$logfile" 2>/dev/null | grep -q 'Kafka Server started'; then
			break
		fi
		if [ $((SECONDS - t0)) -ge "$START_TIMEOUT" ]; then
			tail -n 30 "$logfile" "$out" >&2 2>/dev/null || true
			stop >&2 || true
			die "broker not started after ${START_TIMEOUT}s (logs: $STATE/logs)"
		fi
		sleep 0.2
	done
	until probe; do
		if [ $((SECONDS - t0)) -ge "$START_TIMEOUT" ] || ! kill -0 "$pid" 2>/dev/null; then
			cat "$STATE/logs/probe.log" >&2 || true
			stop >&2 || true
			die "broker does not answer metadata requests after ${START_TIMEOUT}s (logs: $STATE/logs)"
		fi
		sleep 1
	done
	log "ready at $BROKER in $((SECONDS - t0))s (pid $pid, logs $STATE/logs)"
	echo "$BROKER"
}

stop() {
	local pid t0=$SECONDS
	pid="$(running_pid)"
	if [ -z "$pid" ]; then
		rm -f "$PIDFILE"
		log "not running"
		return 0
	fi
	kill -TERM "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null; do
		if [ $((SECONDS - t0)) -ge "$STOP_TIMEOUT" ]; then
			log "pid $pid still alive after ${STOP_TIMEOUT}s, SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			sleep 0.5
			break
		fi
		sleep 0.2
	done
	# The port must be free before a following start.
	local n=0
	while port_open "$PORT" "$HOST" && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
	rm -f "$PIDFILE"
	log "stopped (pid $pid) in $((SECONDS - t0))s"
}

print_env() {
	echo "export RELAY_TEST_KAFKA_BROKERS=$BROKER"
	echo "export RELAY_TEST_KAFKA_SCRIPT=$SCRIPT"
}

case "${1:-}" in
fetch) fetch ;;
start) start ;;
stop) stop ;;
status)
	pid="$(running_pid)"
	[ -n "$pid" ] && echo "running (pid $pid) at $BROKER" && exit 0
	echo "not running"
	exit 1
	;;
env) print_env ;;
wipe)
	stop
	rm -rf "$STATE"
	log "wiped $STATE"
	;;
*)
	echo "usage: $0 fetch|start|stop|status|env|wipe" >&2
	exit 2
	;;
esac
